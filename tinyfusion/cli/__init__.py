"""Flags and helpers shared by the commands (the sampler flags of sample and evaluate)."""
