"""Per-subject and cohort HTML reports, their QC verdicts and their figures.

- :mod:`~atlasflow.reports.inputs`: which workflow outputs a report reads (the report rules'
  inputs, imported when the workflow plans) and readers for its tables and logs;
- :mod:`~atlasflow.reports.checks`: one registration's QC numbers, each judged by the rule of
  :mod:`atlasflow.registration.qc`;
- :mod:`~atlasflow.reports.qc`: a subject's verdict (``sub-S_qc.json``) and the cohort's;
- :mod:`~atlasflow.reports.panels`: which files feed which figure, and a visible placeholder
  naming the file and the reason when one cannot be drawn;
- :mod:`~atlasflow.reports.figures` and :mod:`~atlasflow.reports.montage`: drawing them;
- :mod:`~atlasflow.reports.contrasts`: a session's other contrasts (alignment figures and table,
  change figures of follow-ups) and the per-contrast atlases of the cohort page;
- :mod:`~atlasflow.reports.viewer` and :mod:`~atlasflow.reports.volumes`: the interactive viewer
  and the volumes it embeds;
- :mod:`~atlasflow.reports.html`, :mod:`~atlasflow.reports.subject`,
  :mod:`~atlasflow.reports.cohort`: the self-contained pages and the functions that write them;
- :mod:`~atlasflow.reports.report`: the ``atlasflow report`` command.
"""
