"""The `atlasflow` command line."""
