"""Pairwise registration: the deep engine, the ANTs backend, the one register-and-measure path and its QC."""
