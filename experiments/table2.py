"""Paper Table 2 (§4.3): GShard x1.5 and Dense x16 against DeepSeekMoE (and GShard x1.2, Tab 8)."""

from moe_jax.sweep.family import Family, Member, Scale

FAMILY = Family(
    name="table2",
    description="Paper Table 2: DeepSeekMoE 2B matches GShard x1.5 (1.5x expert parameters and compute) and "
    "nearly Dense x16 (upper bound) in Pile loss.",
    members=(
        Member("gshard_x1.2", "gshard_x1.2_tiny", label="GShard x1.2"),
        Member("gshard_x1.5", "gshard_x1.5_tiny", label="GShard x1.5"),
        Member("dense_x16", "dense_x16_tiny", label="Dense x16"),
        Member("deepseekmoe", "deepseekmoe_tiny", label="DeepSeekMoE"),
    ),
    paper={
        "gshard_x1.2": {"pile_loss": 1.824},
        "gshard_x1.5": {"pile_loss": 1.808},
        "dense_x16": {"pile_loss": 1.806},
        "deepseekmoe": {"pile_loss": 1.808},
    },
    metrics=("heldout_loss", "train_loss", "tokens_per_second"),
    scales={
        "small": Scale(model_suffix=("_tiny", "_small")),
        "base": Scale(model_suffix=("_tiny", "_base"), base=("runs/proxy_base.gin",)),
        "paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",)),
    },
)
