"""DeepSeekMoE's successors' routing on DeepSeekMoE's experts: which router, at equal experts and compute?

Every member is the DeepSeekMoE proxy (1 shared + 63 routed experts of width F/4, 7 active on average)
in the CPU regime (gin/models/proxy/deepseekmoe_base.gin, runs/proxy_base.gin: 1024-piece vocabulary,
d = 128, 4 layers, 10M tokens, held-out bits/byte), 3 paired seeds; only the router changes
(docs/routing.md has each one's equations and knobs):

- softmax: the paper's router (arXiv:2401.06066 Eq 11), raw top-7 gates, expert balance loss 0.01. The
  same run as table1's DeepSeekMoE (reuse it with `--reuse`).
- sigmoid: DeepSeek-V3's gates (arXiv:2412.19437 §2.1.2, Eq 13-15): sigmoid scores, the 7 selected
  renormalised to sum to 1, the same balance loss (with V3's normalised scores, Eq 17-20). Routed
  scaling factor 1: V3's 2.5 belongs to its released 256-expert configuration, not to the method.
- aux_free: V3's auxiliary-loss-free balancing on those sigmoid gates (Eq 16): a per-expert selection
  bias moved by gamma = 0.001 after every step, and V3's tiny sequence-wise balance loss (alpha =
  0.0001) in place of 0.01.
- group_limited: DeepSeek-V2's device-limited routing (arXiv:2405.04434 §2.1.3) with the paper's
  softmax: the 63 routed experts in G = 7 groups of 9 (as if on 7 devices), each token's top-7 taken
  from its M = 3 best groups (V2's M = 3), plus V2's communication balance loss (Eq 29-31, alpha_3 =
  0.02).
- expert_choice: Zhou et al. 2022 (arXiv:2202.09368): each routed expert takes its top-C tokens of each
  sequence, C sized for 7 per token on average (capacity factor 1); no balance loss (balanced by
  construction). Its held-out loss is not a fair next-token loss: a token's routing sees the later
  tokens of its sequence (causal leakage, docs/routing.md), so it is reported, labelled, and not ranked
  with the token-choice routers.

Pairs: each router against the paper's softmax, seed by seed.
"""

from moe_jax.sweep.family import Family, Member

SIGMOID = ("MoEConfig.router_score='sigmoid'", "MoEConfig.renormalize_topk=True")

FAMILY = Family(
    name="routing",
    description="Routers on DeepSeekMoE's experts (1 shared + 7 of 63 routed): the paper's softmax against "
    "DeepSeek-V3's sigmoid gates, V3's auxiliary-loss-free bias, V2's device-limited routing and expert "
    "choice, at equal experts and activated compute.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("softmax", "deepseekmoe_base", label="softmax, raw top-7 gates, balance loss (the paper)"),
        Member("sigmoid", "deepseekmoe_base", bindings=SIGMOID, label="sigmoid, renormalised top-7 (V3 gates)"),
        Member(
            "aux_free",
            "deepseekmoe_base",
            bindings=(
                *SIGMOID,
                "MoEConfig.selection_bias=True",
                "MoEConfig.bias_update_speed=0.001",
                "MoEConfig.expert_balance_alpha=0.0001",
            ),
            label="sigmoid + auxiliary-loss-free bias (V3)",
        ),
        Member(
            "group_limited",
            "deepseekmoe_base",
            bindings=(
                "MoEConfig.topk_groups=3",
                "MoEConfig.num_expert_groups=7",
                "MoEConfig.comm_balance_alpha=0.02",
            ),
            label="softmax, device-limited: top-3 of 7 groups (V2) + communication balance loss",
        ),
        Member(
            "expert_choice",
            "deepseekmoe_base",
            bindings=("MoEConfig.router='expert_choice'",),
            label="expert choice, per sequence (sees later tokens: not a fair next-token loss)",
        ),
    ),
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(
        ("sigmoid", "softmax"),
        ("aux_free", "softmax"),
        ("aux_free", "sigmoid"),
        ("group_limited", "softmax"),
        ("expert_choice", "softmax"),
    ),
)
