"""Synthetic data: the demo cohort (demo), its plan (plan), source images (source), random fields
(fields), tumour model (tumour) and tables (tables)."""
