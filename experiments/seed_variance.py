"""Where the seed-to-seed spread of the learned-routing models comes from: the initialisation or the
order of the training batches.

In table1, one seed changes the held-out bits/byte of GShard and DeepSeekMoE by about 0.1 (both in the
same direction at the same seed), while Dense and Hash move by 0.003. `TrainConfig.seed` sets the
initialisation, any stochastic routing and the data order; `TrainConfig.data_seed` sets the data order
alone. The two runs of each model here cross the two: initialisation of seed 0 with the batches of seed
1, and the reverse. With table1's seeds 0 and 1 (linked: the same training) they make a 2 x 2 design,
whose row and column differences are the initialisation's and the data order's effect. Every run also
gets its held-out bits/byte per corpus source (`PER_SOURCE`), to see whether a seed's gain is spread over
every source (an optimisation effect) or sits in the sources its data order shows last; Dense and Hash
(table1's runs, linked) are the reference without a learned router.

Default regime: the CPU proxies of the other families (runs/proxy_base.gin, 10M tokens, held-out
bits/byte)."""

from moe_jax.sweep.family import PROXY_SCALES, Family, FollowUp, Member

# The held-out bits/byte of each corpus source (`moe-jax eval` with no benchmark task): where a seed's
# gain lands, for the report's results.csv (`heldout_bpb/<source>`).
PER_SOURCE = FollowUp(
    ("eval", "--tasks=", "--out={workdir}/heldout_sources.json"),
    "heldout_sources.json",
    "moe_jax.evaluate.heldout:source_metrics",
)


def _crossed(name: str, model: str, label: str) -> tuple[Member, ...]:
    """`name` at seeds 0 and 1 (its own data order), and the two runs with the other seed's data order."""
    crossed = []
    for s, d in ((0, 1), (1, 0)):
        bindings = (f"TrainConfig.data_seed={d}",)
        crossed.append(Member(f"{name}_data{d}", model, bindings, f"{label}: init {s}, data {d}", (s,)))
    return (Member(name, model, label=f"{label}: init s, data s"), *crossed)


FAMILY = Family(
    name="seed_variance",
    description="Not in the paper: the seed spread of the learned-routing models split into what the "
    "initialisation and what the data order contribute (TrainConfig.data_seed).",
    base=("runs/proxy_base.gin",),
    seeds=(0, 1),
    members=(
        *_crossed("gshard", "gshard_base", "GShard"),
        *_crossed("deepseekmoe", "deepseekmoe_base", "DeepSeekMoE"),
        Member("dense", "dense_base", label="Dense: init s, data s (reference, no router)"),
        Member("hash", "hash_base", label="Hash Layer: init s, data s (reference, fixed routing)"),
    ),
    metrics=("heldout_bits_per_byte", "heldout_loss", "train_loss"),
    follow_ups=(PER_SOURCE,),
    scales=PROXY_SCALES,
)
