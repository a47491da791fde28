"""Training the registration networks: synthetic pairs (pairs), the training loop (train),
fine-tuning on a cohort (finetune) and the ``atlasflow train`` / ``finetune`` commands (commands)."""
