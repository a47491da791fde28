"""``python -m atlasflow``: the ``atlasflow`` command, as the workflow's rules run it (the package of
the interpreter that runs Snakemake, whatever ``PATH`` holds).

In a local run with ``warm_commands`` on, the command is first offered to the run's warm server
(:mod:`atlasflow.runtime.client`, standard library only); it runs here when there is none."""

import sys

if __name__ == "__main__":
    from atlasflow.runtime.client import handoff

    try:
        code = handoff(sys.argv[1:])
    except KeyboardInterrupt:
        print("atlasflow: interrupted", file=sys.stderr)
        sys.exit(130)
    if code is None:
        from atlasflow.cli.main import main

        code = main()
    sys.exit(code)
