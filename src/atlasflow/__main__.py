"""``python -m atlasflow``: the ``atlasflow`` command, as the workflow's rules run it (the package of
the interpreter that runs Snakemake, whatever ``PATH`` holds)."""

import sys

from atlasflow.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
