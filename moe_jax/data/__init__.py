"""Offline training data: corpus build, SentencePiece vocabulary, seqio tasks, packed token cache, loader.

Nothing is imported here on purpose: `moe_jax.data.loader` must stay free of TensorFlow/seqio, which only
`moe_jax.data.tasks` imports. See docs/data.md.
"""
