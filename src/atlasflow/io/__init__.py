"""The one NIfTI reader/writer and atomic file writes."""
