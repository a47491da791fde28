"""Training the registration networks on synthetic pairs."""
