"""Paper §4.4: the shared : routed ratio at 64 experts with constant total and activated experts.

Default regime: the CPU proxies the crossover study chose (gin/models/proxy/*_base.gin with runs/proxy_base.gin:
1024-piece vocabulary, d = 128, 4 layers, 10M tokens; held-out bits/byte), 3 paired seeds. `--scale tiny`,
`--scale small` and `--scale paper` (the 2B models) switch every member at once."""

from moe_jax.sweep.family import PROXY_SCALES, Family, Member

FAMILY = Family(
    name="shared_ratio",
    description="Paper §4.4: 1, 2 or 4 of the 64 experts isolated as shared (1+7/63, 2+6/62, 4+4/60) give Pile "
    "loss 1.808 / 1.806 / 1.811: the ratio barely matters; 1:3 was kept for scaling up.",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1, 2),
    members=(
        Member("1s_7of63", "ablation_1s_7of63_base", label="1 shared + 7/63"),
        Member("2s_6of62", "ablation_2s_6of62_base", label="2 shared + 6/62"),
        Member("4s_4of60", "ablation_4s_4of60_base", label="4 shared + 4/60"),
    ),
    paper={"1s_7of63": {"pile_loss": 1.808}, "2s_6of62": {"pile_loss": 1.806}, "4s_4of60": {"pile_loss": 1.811}},
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    pairs=(("2s_6of62", "1s_7of63"), ("4s_4of60", "1s_7of63"), ("4s_4of60", "2s_6of62")),
    scales=PROXY_SCALES,
)
