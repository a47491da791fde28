"""Other contrasts of a session: aligned to its T1w, carried into every output space, averaged into atlases."""
