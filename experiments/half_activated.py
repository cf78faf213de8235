"""Paper Fig 6 (§4.5): DeepSeekMoE with half the activated experts (1 shared + 3/63) trained from
scratch against GShard (0 + 2/16), which activates twice as many expert parameters."""

from moe_jax.sweep.family import Family, Member, Scale

FAMILY = Family(
    name="half_activated",
    description="Paper Fig 6: DeepSeekMoE with 1 shared + 3/63 routed (half the activated expert parameters) "
    "still beats GShard on every benchmark shown.",
    members=(
        Member("gshard", "gshard_tiny", label="GShard 0 + 2/16"),
        Member("1s_3of63", "ablation_1s_3of63_tiny", label="DeepSeekMoE 1 + 3/63 (half activated)"),
    ),
    paper={
        "gshard": {"hellaswag": 50.5, "piqa": 70.6, "arc_e": 43.9},
        "1s_3of63": {"hellaswag": 51.9, "piqa": 71.4, "arc_e": 48.0},
    },
    metrics=("heldout_loss", "train_loss"),
    scales={
        "small": Scale(model_suffix=("_tiny", "_small")),
        "base": Scale(model_suffix=("_tiny", "_base"), base=("runs/proxy_base.gin",)),
        "paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",)),
    },
)
