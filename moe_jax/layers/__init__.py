"""The basic layers every model is built from: attention with RoPE, the SwiGLU FFN, RMSNorm.

They import nothing else from moe_jax, so `moe` (the MoE layer and its experts) and `model` (the
transformer) both build on them."""
