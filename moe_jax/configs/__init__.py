"""Gin configuration of the paper's models: loading (`gin_utils`), the paper's printed numbers
(`paper_numbers`) and the `moe-jax params` command (`params_cli`). The parameter and FLOP accounting it
prints lives next to the model it counts, in `moe_jax.model.params`.

Layering: `configs` sits above `model` and `data` and below `train` (see `[tool.importlinter]` in
pyproject.toml). `gin_utils.import_configurables` also imports `moe_jax.model.transformer` and
`moe_jax.train.config` by name, to register their gin configurables before parsing.
"""
