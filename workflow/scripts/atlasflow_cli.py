"""`atlasflow <params.argv>` for the cohort-wide rules, output and errors to the rule's log.

Their file lists grow with the cohort, and Linux caps one argument, the `bash -c` command a
`shell:` rule runs, at 128 KiB (about 600 atlas members' paths); here the lists never pass
through a command line. The atlas jobs run in the run's warm engine when there is one
(atlasflow.runtime.server); everything else runs in this process.
"""

import sys

from atlasflow.runtime.server import run

sys.exit(run(snakemake.params.argv, snakemake.log[0]))  # noqa: F821
