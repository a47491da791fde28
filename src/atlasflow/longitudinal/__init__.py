"""Follow-up -> baseline registration, change maps and tumour tables."""
