"""Per-scan preprocessing: reorientation, N4, brain mask, intensity normalisation, working grid, reference template."""
