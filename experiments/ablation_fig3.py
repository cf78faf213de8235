"""Paper Fig 3 (§4.4): from GShard (0 shared + 2/16) to DeepSeekMoE (1 shared + 7/63) one step at a time:
shared expert isolation, then finer segmentation (m = 2, 4). Same total and activated parameters."""

from moe_jax.sweep.family import Family, Member, Scale

FAMILY = Family(
    name="ablation_fig3",
    description="Paper Fig 3 (normalised to 1+7/63 = 1.000; HellaSwag shown): each step of fine-grained "
    "segmentation and shared expert isolation improves the model.",
    members=(
        Member("0s_2of16", "ablation_0s_2of16_tiny", label="0 shared + 2/16 (GShard)"),
        Member("1s_1of15", "ablation_1s_1of15_tiny", label="1 shared + 1/15"),
        Member("1s_3of31", "ablation_1s_3of31_tiny", label="1 shared + 3/31"),
        Member("1s_7of63", "ablation_1s_7of63_tiny", label="1 shared + 7/63 (DeepSeekMoE)"),
    ),
    paper={
        "0s_2of16": {"hellaswag_norm": 0.922, "triviaqa_norm": 0.614},
        "1s_1of15": {"hellaswag_norm": 0.956, "triviaqa_norm": 0.849},
        "1s_3of31": {"hellaswag_norm": 0.980, "triviaqa_norm": 0.934},
        "1s_7of63": {"hellaswag_norm": 1.000, "triviaqa_norm": 1.000},
    },
    metrics=("heldout_loss", "train_loss"),
    scales={
        "small": Scale(model_suffix=("_tiny", "_small")),
        "base": Scale(model_suffix=("_tiny", "_base"), base=("runs/proxy_base.gin",)),
        "paper": Scale(model_suffix=("_tiny", "_2b"), base=("runs/pretrain_2b.gin",)),
    },
)
