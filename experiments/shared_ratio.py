"""Paper §4.4: the shared : routed ratio at 64 experts with constant total and activated experts."""

from moe_jax.sweep.family import Family, Member, Scale

FAMILY = Family(
    name="shared_ratio",
    description="Paper §4.4: 1, 2 or 4 of the 64 experts isolated as shared (1+7/63, 2+6/62, 4+4/60) give Pile "
    "loss 1.808 / 1.806 / 1.811: the ratio barely matters; 1:3 was kept for scaling up.",
    members=(
        Member("1s_7of63", "ablation_1s_7of63_tiny", label="1 shared + 7/63"),
        Member("2s_6of62", "ablation_2s_6of62_tiny", label="2 shared + 6/62"),
        Member("4s_4of60", "ablation_4s_4of60_tiny", label="4 shared + 4/60"),
    ),
    paper={"1s_7of63": {"pile_loss": 1.808}, "2s_6of62": {"pile_loss": 1.806}, "4s_4of60": {"pile_loss": 1.811}},
    metrics=("heldout_loss", "train_loss"),
    scales={
        "small": Scale(model_suffix=("_tiny", "_small")),
        "base": Scale(model_suffix=("_tiny", "_base"), base=("runs/proxy_base.gin",)),
        "paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",)),
    },
)
