"""Paper Table 1 (§4.2): Dense, Hash, Switch, GShard and DeepSeekMoE at matched total and activated
parameters.

Default regime: the CPU proxies the crossover study chose (gin/models/proxy/*_base.gin with runs/proxy_base.gin:
1024-piece vocabulary, d = 128, 4 layers, 10M tokens; held-out bits/byte), 3 paired seeds. `--scale tiny`,
`--scale small` and `--scale paper` (the 2B models) switch every member at once."""

from moe_jax.sweep.family import PROXY_SCALES, Family, Member

FAMILY = Family(
    name="table1",
    description="Paper Table 1: 2B validation models (Pile loss after 100B tokens) vs our proxies' held-out "
    "loss on the offline corpus. Paper order: Dense > Hash > Switch > GShard > DeepSeekMoE.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("dense", "dense_base", label="Dense"),
        Member("hash", "hash_base", label="Hash Layer"),
        Member("switch", "switch_base", label="Switch"),
        Member("gshard", "gshard_base", label="GShard"),
        Member("deepseekmoe", "deepseekmoe_base", label="DeepSeekMoE"),
    ),
    paper={
        "dense": {"pile_loss": 2.060, "hellaswag": 38.8},
        "hash": {"pile_loss": 1.932, "hellaswag": 46.2},
        "switch": {"pile_loss": 1.881, "hellaswag": 49.1},
        "gshard": {"pile_loss": 1.867, "hellaswag": 50.5},
        "deepseekmoe": {"pile_loss": 1.808, "hellaswag": 54.8},
    },
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(
        ("hash", "dense"),
        ("switch", "hash"),
        ("gshard", "switch"),
        ("deepseekmoe", "gshard"),
        ("deepseekmoe", "dense"),
    ),
    scales=PROXY_SCALES,
)
