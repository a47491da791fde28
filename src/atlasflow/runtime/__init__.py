"""Running the commands: the warm engine, resource estimates, provenance."""
