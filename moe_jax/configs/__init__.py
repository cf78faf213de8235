"""Gin configuration of the paper's models: loading (`gin_utils`), parameter/FLOP accounting
(`params`), the paper's printed numbers (`paper_numbers`) and the `moe-jax params` command."""
