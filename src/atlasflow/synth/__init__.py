"""Synthetic data: the demo cohort and its tumour model."""
