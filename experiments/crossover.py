"""The token-budget (crossover) study: when, in training tokens, does each MoE model overtake Dense?

All members at the CPU regime (gin/models/proxy/*_base.gin, runs/proxy_base.gin: 1024-piece
vocabulary, d = 128, 4 layers, 10M tokens), held-out bits/byte at 25 evaluations during training,
plotted against tokens (log x) with the paired per-seed differences (report/heldout_curves.png) and the
router diagnostics (report/router_diagnostics.png).

Members: the paper's Dense (one FFN of width F: the activated compute of Switch and Hash), a Dense of
the activated compute of GShard and DeepSeekMoE (width 2F), GShard (16 experts of width F, top-2),
DeepSeekMoE (1 shared + 63 routed experts of width F/4, top-7), and GShard with its two gates
renormalised to sum to 1. The paper writes only the generic softmax gate without renormalisation
(arXiv:2401.06066 Eq 5); standard GShard top-2 gating renormalises, so that variant is labelled as
ours. It tests one explanation of the tiny proxy's results: with raw gates a near-uniform router
scales the routed output by about K/N.
"""

from moe_jax.sweep.family import Family, Member

FAMILY = Family(
    name="crossover",
    description="Token budget: held-out bits/byte against training tokens for Dense, Dense x2 (GShard's "
    "activated compute), GShard, GShard with renormalised top-2 gates, and DeepSeekMoE.",
    base=("runs/proxy_base.gin",),
    members=(
        Member("dense", "dense_base", label="Dense (width F)"),
        Member("dense_x2", "dense_x2_base", label="Dense x2 (width 2F: GShard's activated compute)"),
        Member("gshard", "gshard_base", label="GShard (raw top-2 gates)"),
        Member(
            "gshard_renorm",
            "gshard_base",
            bindings=("MoEConfig.renormalize_topk=True",),
            label="GShard, top-2 gates renormalised (standard GShard; ours, not the paper's Eq 5)",
        ),
        Member("deepseekmoe", "deepseekmoe_base", label="DeepSeekMoE"),
    ),
    seeds=(0, 1),
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(
        ("dense_x2", "dense"),
        ("gshard", "dense"),
        ("deepseekmoe", "dense"),
        ("gshard", "dense_x2"),
        ("deepseekmoe", "dense_x2"),
        ("gshard_renorm", "gshard"),
        ("deepseekmoe", "gshard"),
    ),
)
