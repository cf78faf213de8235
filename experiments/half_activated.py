"""Paper Fig 6 (§4.5): DeepSeekMoE with half the activated experts (1 shared + 3/63) trained from
scratch against GShard (0 + 2/16), which activates twice as many expert parameters.

Default regime: the CPU proxies the crossover study chose (gin/models/proxy/*_base.gin with runs/proxy_base.gin:
1024-piece vocabulary, d = 128, 4 layers, 10M tokens; held-out bits/byte), 3 paired seeds. `--scale tiny`,
`--scale small` and `--scale paper` (the 2B models) switch every member at once."""

from moe_jax.sweep.family import PROXY_SCALES, Family, Member

FAMILY = Family(
    name="half_activated",
    description="Paper Fig 6: DeepSeekMoE with 1 shared + 3/63 routed (half the activated expert parameters) "
    "still beats GShard on every benchmark shown.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("gshard", "gshard_base", label="GShard 0 + 2/16"),
        Member("1s_3of63", "ablation_1s_3of63_base", label="DeepSeekMoE 1 + 3/63 (half activated)"),
    ),
    paper={
        "gshard": {"hellaswag": 50.5, "piqa": 70.6, "arc_e": 43.9},
        "1s_3of63": {"hellaswag": 51.9, "piqa": 71.4, "arc_e": 48.0},
    },
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(("1s_3of63", "gshard"),),
    scales=PROXY_SCALES,
)
