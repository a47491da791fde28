"""The `atlasflow` command line: :mod:`~atlasflow.cli.main` (the parser tree and the one error
wrapper), :mod:`~atlasflow.cli.commands` (per-scan imaging commands) and
:mod:`~atlasflow.cli.steps` (atlas and longitudinal steps); the other commands live beside the
stage they run (``cohort.validate``, ``training.commands``, ``reports.report``, ``runtime.*``)."""
