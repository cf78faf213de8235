"""Paper Fig 3 (§4.4): from GShard (0 shared + 2/16) to DeepSeekMoE (1 shared + 7/63) one step at a time:
shared expert isolation, then finer segmentation (m = 2, 4). Same total and activated parameters.

Default regime: the CPU proxies the crossover study chose (gin/models/proxy/*_base.gin with runs/proxy_base.gin:
1024-piece vocabulary, d = 128, 4 layers, 10M tokens; held-out bits/byte), 3 paired seeds. `--scale tiny`,
`--scale small` and `--scale paper` (the 2B models) switch every member at once."""

from moe_jax.sweep.family import PROXY_SCALES, Family, Member

FAMILY = Family(
    name="ablation_fig3",
    description="Paper Fig 3 (normalised to 1+7/63 = 1.000; HellaSwag shown): each step of fine-grained "
    "segmentation and shared expert isolation improves the model.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("0s_2of16", "ablation_0s_2of16_base", label="0 shared + 2/16 (GShard)"),
        Member("1s_1of15", "ablation_1s_1of15_base", label="1 shared + 1/15"),
        Member("1s_3of31", "ablation_1s_3of31_base", label="1 shared + 3/31"),
        Member("1s_7of63", "ablation_1s_7of63_base", label="1 shared + 7/63 (DeepSeekMoE)"),
    ),
    paper={
        "0s_2of16": {"hellaswag_norm": 0.922, "triviaqa_norm": 0.614},
        "1s_1of15": {"hellaswag_norm": 0.956, "triviaqa_norm": 0.849},
        "1s_3of31": {"hellaswag_norm": 0.980, "triviaqa_norm": 0.934},
        "1s_7of63": {"hellaswag_norm": 1.000, "triviaqa_norm": 1.000},
    },
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(("1s_1of15", "0s_2of16"), ("1s_3of31", "1s_1of15"), ("1s_7of63", "1s_3of31"), ("1s_7of63", "0s_2of16")),
    scales=PROXY_SCALES,
)
