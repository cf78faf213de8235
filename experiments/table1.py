"""Paper Table 1 (§4.2): Dense, Hash, Switch, GShard and DeepSeekMoE at matched total and activated
parameters. Default: the tiny CPU proxies (gin/models/proxy/*_tiny.gin, runs/proxy_cpu.gin);
`--scale paper` runs the 2B models with runs/pretrain_2b.gin; `--scale small` the small proxies."""

from moe_jax.sweep.family import Family, Member, Scale

FAMILY = Family(
    name="table1",
    description="Paper Table 1: 2B validation models (Pile loss after 100B tokens) vs our proxies' held-out "
    "loss on the offline corpus. Paper order: Dense > Hash > Switch > GShard > DeepSeekMoE.",
    members=(
        Member("dense", "dense_tiny", label="Dense"),
        Member("hash", "hash_tiny", label="Hash Layer"),
        Member("switch", "switch_tiny", label="Switch"),
        Member("gshard", "gshard_tiny", label="GShard"),
        Member("deepseekmoe", "deepseekmoe_tiny", label="DeepSeekMoE"),
    ),
    paper={
        "dense": {"pile_loss": 2.060, "hellaswag": 38.8},
        "hash": {"pile_loss": 1.932, "hellaswag": 46.2},
        "switch": {"pile_loss": 1.881, "hellaswag": 49.1},
        "gshard": {"pile_loss": 1.867, "hellaswag": 50.5},
        "deepseekmoe": {"pile_loss": 1.808, "hellaswag": 54.8},
    },
    metrics=("heldout_loss", "train_loss", "tokens_per_second"),
    scales={
        "small": Scale(model_suffix=("_tiny", "_small")),
        "base": Scale(model_suffix=("_tiny", "_base"), base=("runs/proxy_base.gin",)),
        "paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",)),
    },
)
