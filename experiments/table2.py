"""Paper Table 2 (§4.3): GShard x1.5 and Dense x16 against DeepSeekMoE (and GShard x1.2, Tab 8).

Default regime: the CPU proxies the crossover study chose (gin/models/proxy/*_base.gin with runs/proxy_base.gin:
1024-piece vocabulary, d = 128, 4 layers, 10M tokens; held-out bits/byte), 3 paired seeds. `--scale tiny`,
`--scale small` and `--scale paper` (the 2B models) switch every member at once."""

from moe_jax.sweep.family import PROXY_SCALES, Family, Member

FAMILY = Family(
    name="table2",
    description="Paper Table 2: DeepSeekMoE 2B matches GShard x1.5 (1.5x expert parameters and compute) and "
    "nearly Dense x16 (upper bound) in Pile loss.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("gshard_x1.5", "gshard_x1.5_base", label="GShard x1.5"),
        Member("dense_x16", "dense_x16_base", label="Dense x16", seeds=(0, 1)),
        Member("deepseekmoe", "deepseekmoe_base", label="DeepSeekMoE"),
        Member("gshard_x1.2", "gshard_x1.2_base", label="GShard x1.2"),
    ),
    paper={
        "gshard_x1.2": {"pile_loss": 1.824},
        "gshard_x1.5": {"pile_loss": 1.808},
        "dense_x16": {"pile_loss": 1.806},
        "deepseekmoe": {"pile_loss": 1.808},
    },
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(
        ("deepseekmoe", "gshard_x1.5"),
        ("deepseekmoe", "dense_x16"),
        ("deepseekmoe", "gshard_x1.2"),
        ("gshard_x1.5", "gshard_x1.2"),
    ),
    scales=PROXY_SCALES,
)
