"""Paper §4.5: expert specialization of a trained DeepSeekMoE against GShard x1.5 (the GShard with
DeepSeekMoE's Pile loss). Each member trains, then `moe-jax analyze` measures held-out loss with the
top routed experts disabled (Fig 4), with fewer routed experts activated (Fig 5, DeepSeekMoE) and with
the shared expert disabled (§4.5), and draws the expert-load heatmap (under <member>/analysis/).

Default regime: the CPU proxies the crossover study chose (gin/models/proxy/*_base.gin with runs/proxy_base.gin:
1024-piece vocabulary, d = 128, 4 layers, 10M tokens; held-out bits/byte), 3 paired seeds. `--scale tiny`,
`--scale small` and `--scale paper` (the 2B models) switch every member at once."""

from moe_jax.sweep.family import PROXY_SCALES, Family, FollowUp, Member

_RATIOS = ("1/16", "2/16", "3/16", "4/16")

FAMILY = Family(
    name="specialization",
    description="Paper §4.5 (Fig 4, Fig 5): disabling the top routed experts hurts DeepSeekMoE more than "
    "GShard x1.5 (less redundancy among its experts); disabling DeepSeekMoE's shared expert "
    "raises the Pile loss 1.808 -> 2.414. Columns disable_top_r: held-out loss with the r "
    "highest-scoring routed experts masked per token.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("deepseekmoe", "deepseekmoe_base", label="DeepSeekMoE"),
        Member("gshard_x1.5", "gshard_x1.5_base", label="GShard x1.5"),
        Member("gshard", "gshard_base", label="GShard (Fig 5's reference)"),
    ),
    follow_ups=(
        FollowUp(
            command=("analyze", "--heldout_batches=2", "--heatmap_batches=2"),
            output="analysis/specialization.json",
            metrics="moe_jax.evaluate.analyze:summary_metrics",
        ),
    ),
    paper={
        "deepseekmoe": {
            "analysis_plain": 1.808,
            **{f"disable_top_{r}": v for r, v in zip(_RATIOS, (7.468, 8.196, 8.706, 9.071))},
            "shared_disabled": 2.414,
        },
        "gshard_x1.5": {
            "analysis_plain": 1.808,
            **{f"disable_top_{r}": v for r, v in zip(_RATIOS, (5.586, 7.518, 7.627, 7.721))},
        },
    },
    metrics=(
        "heldout_bits_per_byte",
        "heldout_loss",
        "analysis_plain",
        *(f"disable_top_{r}" for r in _RATIOS),
        "shared_disabled",
    ),
    scales=PROXY_SCALES,
)
