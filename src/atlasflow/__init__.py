"""atlasflow: cohort brain MRI preprocessing, deep registration, atlases and tumour-growth maps."""

__version__ = "0.1.0"
