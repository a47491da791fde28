"""Per-subject and cohort HTML reports and their figures."""
