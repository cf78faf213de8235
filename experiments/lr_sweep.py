"""The learning-rate sweep that chose the CPU regime's one learning rate (runs/proxy_base.gin).

Dense and GShard (the paper's Table 1 extremes of routing: none, and learned top-2) at the regime's
trunk (gin/models/proxy/*_base.gin) and a quarter of its token budget (610 steps of 16 x 256 = 2.5M
tokens, the same schedule shape: 8% warmup, step decay at 80% and 90%), peak learning rates 1e-3,
2e-3 and 4e-3. The rate with the lower held-out bits/byte on both models (or the lower mean rank) is
then used for every member of every family, as the paper trains all its 2B models at one rate
(arXiv:2401.06066 §4.1.3). A quarter budget tends to favour larger rates than the full one: when two
rates are within seed noise, the smaller is chosen.
"""

from moe_jax.sweep.family import Family, Member

RATES = ("1e-3", "2e-3", "4e-3")
STEPS = ("TRAIN_STEPS=610", "WARMUP_STEPS=49")

FAMILY = Family(
    name="lr_sweep",
    description="Peak learning rate for the CPU regime: Dense and GShard at 2.5M tokens.",
    base=("runs/proxy_base.gin",),
    members=tuple(
        Member(
            f"{name}_lr{rate}",
            f"{name}_base",
            bindings=(f"LEARNING_RATE={rate}", *STEPS),
            label=f"{label}, peak LR {rate}",
        )
        for name, label in (("dense", "Dense"), ("gshard", "GShard"))
        for rate in RATES
    ),
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
)
