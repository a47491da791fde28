"""The cohort: manifest CSV, BIDS discovery, validation and planning (sessions, baselines, atlas members); torch-free."""
