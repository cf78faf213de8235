"""A PyTorch forward of DeepSeek's HF layout (`DeepseekForCausalLM`, deepseek-moe-16b-base's
`modeling_deepseek.py` semantics, arXiv:2401.06066), written for the tests: the remote code itself is not
available offline. float32 like transformers; a second oracle next to `moe_jax.export.numpy_reference`
(float64 NumPy), written independently of both it and the Flax model:
  - RMSNorm in float32: w * x * rsqrt(mean(x^2) + eps);
  - attention: `torch.nn.functional.scaled_dot_product_attention` (causal, scale 1/sqrt(Dh)) after
    rotate-half RoPE, inv_freq = theta^(-arange(0, Dh, 2) / Dh);
  - MoEGate: softmax(x W^T) over the routed experts, `torch.topk`, optional renormalisation; routed
    experts applied by a dense one-hot combine; shared experts always on.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def forward(cfg: Mapping, weights: Mapping[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Logits [B, S, V] (float32) of tokens [B, S] for config.json `cfg` and HF tensors `weights`."""
    import torch
    import torch.nn.functional as F

    w = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in weights.items()}
    eps, heads = float(cfg["rms_norm_eps"]), int(cfg["num_attention_heads"])
    dh = int(cfg["hidden_size"]) // heads

    def norm(x, name):
        return w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def mlp(x, p):
        return F.linear(
            F.silu(F.linear(x, w[f"{p}.gate_proj.weight"])) * F.linear(x, w[f"{p}.up_proj.weight"]),
            w[f"{p}.down_proj.weight"],
        )

    def rope(x):  # [B, H, S, Dh]
        inv = 1.0 / (float(cfg["rope_theta"]) ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
        ang = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        rot = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
        return x * emb.cos() + rot * emb.sin()

    def attention(x, p):
        b, s, _ = x.shape
        q, k, v = (F.linear(x, w[f"{p}.{n}_proj.weight"]).view(b, s, heads, dh).transpose(1, 2) for n in "qkv")
        o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(b, s, heads * dh), w[f"{p}.o_proj.weight"])

    def moe(x, p):
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(F.linear(flat, w[f"{p}.gate.weight"]), dim=-1)
        top_w, top_i = torch.topk(probs, int(cfg["num_experts_per_tok"]), dim=-1)
        if cfg.get("norm_topk_prob") and top_w.shape[-1] > 1:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(1, top_i, top_w)  # [T, E]
        y = sum(combine[:, e : e + 1] * mlp(flat, f"{p}.experts.{e}") for e in range(probs.shape[-1]))
        if cfg.get("n_shared_experts") is not None:
            y = y + mlp(flat, f"{p}.shared_experts")
        return y.reshape(x.shape)

    with torch.no_grad():
        h = w["model.embed_tokens.weight"][torch.as_tensor(np.asarray(tokens))]
        for layer in range(int(cfg["num_hidden_layers"])):
            p = f"model.layers.{layer}"
            h = h + attention(norm(h, f"{p}.input_layernorm.weight"), f"{p}.self_attn")
            x = norm(h, f"{p}.post_attention_layernorm.weight")
            is_moe = (
                cfg.get("n_routed_experts") is not None
                and layer >= int(cfg["first_k_dense_replace"])
                and layer % int(cfg["moe_layer_freq"]) == 0
            )
            h = h + (moe(x, f"{p}.mlp") if is_moe else mlp(x, f"{p}.mlp"))
        return F.linear(norm(h, "model.norm.weight"), w["lm_head.weight"]).numpy()
