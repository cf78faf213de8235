"""Paper §4.5: expert specialization of a trained DeepSeekMoE against GShard x1.5 (the GShard with
DeepSeekMoE's Pile loss). Each member trains, then `moe-jax analyze` measures held-out loss with the
top routed experts disabled (Fig 4), with fewer routed experts activated (Fig 5, DeepSeekMoE) and with
the shared expert disabled (§4.5), and draws the expert-load heatmap (under <member>/analysis/)."""

from moe_jax.sweep.family import Family, FollowUp, Member, Scale

_RATIOS = ("1/16", "2/16", "3/16", "4/16")

FAMILY = Family(
    name="specialization",
    description="Paper §4.5 (Fig 4, Fig 5): disabling the top routed experts hurts DeepSeekMoE more than "
    "GShard x1.5 (less redundancy among its experts); disabling DeepSeekMoE's shared expert "
    "raises the Pile loss 1.808 -> 2.414. Columns disable_top_r: held-out loss with the r "
    "highest-scoring routed experts masked per token.",
    members=(
        Member("deepseekmoe", "deepseekmoe_tiny", label="DeepSeekMoE"),
        Member("gshard_x1.5", "gshard_x1.5_tiny", label="GShard x1.5"),
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
    metrics=("heldout_loss", "analysis_plain", *(f"disable_top_{r}" for r in _RATIOS), "shared_disabled"),
    scales={
        "small": Scale(model_suffix=("_tiny", "_small")),
        "base": Scale(model_suffix=("_tiny", "_base"), base=("runs/proxy_base.gin",)),
        "paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",)),
    },
)
