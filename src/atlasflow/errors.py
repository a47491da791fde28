"""The one exception type users can hit: a message naming the file or row and the problem."""

from __future__ import annotations


class AtlasflowError(Exception):
    """A problem with the user's inputs or configuration, reported as one line without a traceback."""
