"""Parameter counts from a model's config alone, the closed form the config tests check the counted models
against (not a test module)."""

from moe_jax.config import ModelConfig


def closed_form_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total, activated and expert parameters from the config alone (the counts arXiv:2401.06066 Tab 1-3 report):
    a SwiGLU FFN of width F has 3 d F parameters, attention 4 d H Dh, a softmax router d N'."""
    d = cfg.d_model
    per_layer = 4 * d * cfg.num_heads * cfg.head_dim + 2 * d  # attention + two RMSNorm scales
    total = 2 * cfg.vocab_size * d + d + cfg.num_layers * per_layer  # untied embedding and head, final norm
    activated, expert, activated_expert = total, 0, 0
    for layer in range(cfg.num_layers):
        if not cfg.is_moe_layer(layer):
            total += 3 * d * cfg.ffn_dim
            activated += 3 * d * cfg.ffn_dim
            continue
        m = cfg.moe
        shared = 3 * d * m.num_shared_experts * m.expert_dim
        routed = 3 * d * m.num_experts * m.expert_dim
        active_routed = 3 * d * m.top_k * m.expert_dim if m.num_experts else 0
        router = d * m.num_experts if m.router == "softmax" else 0
        total += shared + routed + router
        activated += shared + router + active_routed
        expert += shared + routed
        activated_expert += shared + active_routed
    return {"total": total, "activated": activated, "expert": expert, "activated_expert": activated_expert}
