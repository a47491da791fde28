"""`atlasflow <params.argv>` run in Snakemake's script process, for the cohort-wide rules.

Their file lists grow with the cohort, and Linux caps one argument, the `bash -c` command a
`shell:` rule runs, at 128 KiB (about 600 atlas members' paths); here the lists never pass
through a command line. Output and errors go to the rule's log, as with `> {log} 2>&1`.
"""

import sys
from contextlib import redirect_stderr, redirect_stdout

from atlasflow.cli import main

with open(snakemake.log[0], "w") as log, redirect_stdout(log), redirect_stderr(log):  # noqa: F821
    code = main([str(a) for a in snakemake.params.argv])  # noqa: F821
sys.exit(code)
