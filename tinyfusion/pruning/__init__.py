"""Depth pruning: N:M masks, Gumbel gates, the learnable search, baselines, surgery."""
