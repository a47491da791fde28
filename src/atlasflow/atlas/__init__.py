"""Unbiased population atlas: iterations of register -> average -> shape update, label vote."""
