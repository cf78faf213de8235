"""An independent forward pass of DeepSeek's HF layout in plain NumPy (float64): the parity oracle.

It reads only config.json keys and HF tensor names, and follows the semantics of DeepSeek's
`modeling_deepseek.py` (docs/paper.md §1) rather than our Flax model:
  - DeepseekRMSNorm: x * rsqrt(mean(x^2) + eps) * weight;
  - attention: q/k/v/o `nn.Linear` without bias ([out, in] weights), rotate-half RoPE with
    inv_freq = theta^(-arange(0, Dh, 2)/Dh) and emb = cat(freqs, freqs), scores / sqrt(Dh), causal
    mask, softmax;
  - a layer is MoE iff n_routed_experts is not None and l >= first_k_dense_replace and
    l % moe_layer_freq == 0; otherwise DeepseekMLP down(silu(gate(x)) * up(x)) of intermediate_size;
  - MoEGate: scores = softmax(x @ W^T) over the routed experts, top-k, optional renormalisation
    (norm_topk_prob, k > 1); y = sum_k w_k expert_k(x) + shared_experts(x);
  - final norm, lm_head.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [..., d], weight [d]."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """nn.Linear without bias: x [..., in], weight [out, in] -> [..., out]."""
    return x @ weight.T


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def mlp(x: np.ndarray, w: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """DeepseekMLP: down(silu(gate(x)) * up(x))."""
    return linear(
        silu(linear(x, w[f"{prefix}.gate_proj.weight"])) * linear(x, w[f"{prefix}.up_proj.weight"]),
        w[f"{prefix}.down_proj.weight"],
    )


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def attention(x: np.ndarray, w: Mapping[str, np.ndarray], prefix: str, cfg: Mapping) -> np.ndarray:
    """x [B, S, d] -> [B, S, d]; multi-head causal self-attention with RoPE."""
    b, s, _ = x.shape
    heads = int(cfg["num_attention_heads"])
    dh = int(cfg["hidden_size"]) // heads

    def split(t):  # [B, S, H*Dh] -> [B, H, S, Dh]
        return t.reshape(b, s, heads, dh).transpose(0, 2, 1, 3)

    q = split(linear(x, w[f"{prefix}.q_proj.weight"]))
    k = split(linear(x, w[f"{prefix}.k_proj.weight"]))
    v = split(linear(x, w[f"{prefix}.v_proj.weight"]))
    inv_freq = 1.0 / (float(cfg.get("rope_theta", 10000.0)) ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    freqs = np.outer(np.arange(s, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)  # [S, Dh]
    cos, sin = np.cos(emb), np.sin(emb)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)  # [B, H, S, S]
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    out = softmax(scores) @ v  # [B, H, S, Dh]
    return linear(out.transpose(0, 2, 1, 3).reshape(b, s, heads * dh), w[f"{prefix}.o_proj.weight"])


def moe(x: np.ndarray, w: Mapping[str, np.ndarray], prefix: str, cfg: Mapping) -> np.ndarray:
    """DeepseekMoE on x [B, S, d]: gate, top-k routed experts, plus the shared experts."""
    b, s, d = x.shape
    flat = x.reshape(-1, d)
    k = int(cfg["num_experts_per_tok"])
    scores = softmax(linear(flat, w[f"{prefix}.gate.weight"]))  # [T, E]
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]  # [T, k]
    weights = np.take_along_axis(scores, top, axis=-1)
    if k > 1 and cfg.get("norm_topk_prob", False):
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    y = np.zeros_like(flat)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)
        y[rows] += weights[rows, slot, None] * mlp(flat[rows], w, f"{prefix}.experts.{e}")
    if cfg.get("n_shared_experts") is not None:
        y = y + mlp(flat, w, f"{prefix}.shared_experts")
    return y.reshape(b, s, d)


def is_moe_layer(cfg: Mapping, layer: int) -> bool:
    return (
        cfg.get("n_routed_experts") is not None
        and layer >= int(cfg.get("first_k_dense_replace", 0))
        and layer % int(cfg.get("moe_layer_freq", 1)) == 0
    )


def forward(cfg: Mapping, weights: Mapping[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Logits [B, S, V] (float64) of tokens [B, S] for config.json `cfg` and HF tensors `weights`."""
    w = {name: np.asarray(t, np.float64) for name, t in weights.items()}
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    h = w["model.embed_tokens.weight"][np.asarray(tokens)]
    for layer in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{layer}"
        h = h + attention(rms_norm(h, w[f"{p}.input_layernorm.weight"], eps), w, f"{p}.self_attn", cfg)
        x = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
        h = h + (moe(x, w, f"{p}.mlp", cfg) if is_moe_layer(cfg, layer) else mlp(x, w, f"{p}.mlp"))
    h = rms_norm(h, w["model.norm.weight"], eps)
    return linear(h, w["lm_head.weight"])
