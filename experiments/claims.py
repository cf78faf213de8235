"""The paper's seven claims (arXiv:2401.06066) as comparisons of our families' members.

`moe-jax claims experiments/claims.py --write experiments/README.md` turns them into the table at the
top of experiments/README.md (the rule: moe_jax/sweep/claims.py). Each comparison carries the paper's
numbers: Pile loss (nats/token) unless the claim's source says otherwise. Ours are the base regime's
held-out bits/byte (the whole held-out split at the end of training) or, for §4.5, the held-out loss
(nats/token) that `moe-jax analyze` measures on its fixed held-out sample.
"""

from pathlib import Path

from moe_jax.sweep.claims import Claim, Comparison, Metric
from moe_jax.sweep.family import load_family

BPB = "heldout_bits_per_byte"
BPB_TEXT = "held-out bits/byte"
_RATIOS = ("1/16", "2/16", "3/16", "4/16")
# Fig 4's Pile losses, kept once in the specialization family.
_FIG4 = load_family(Path(__file__).with_name("specialization.py")).paper


def _ordered(family: str, pairs, paper) -> tuple[Comparison, ...]:
    """Comparisons member < baseline in held-out bits/byte: pairs of ((name, text), (name, text))."""
    return tuple(
        Comparison(family, m, b, BPB, "lower", f"{mt} < {bt}", paper=(paper[m], paper[b])) for (m, mt), (b, bt) in pairs
    )


def _equal(family: str, pairs, paper) -> tuple[Comparison, ...]:
    """Comparisons member ≈ baseline in held-out bits/byte."""
    return tuple(
        Comparison(family, m, b, BPB, "equal", f"{mt} ≈ {bt}", paper=(paper[m], paper[b])) for (m, mt), (b, bt) in pairs
    )


def _increase(member: str, r: str) -> float:
    return _FIG4[member][f"disable_top_{r}"] - _FIG4[member]["analysis_plain"]


_TABLE1 = [
    ("dense", "Dense"),
    ("hash", "Hash"),
    ("switch", "Switch"),
    ("gshard", "GShard"),
    ("deepseekmoe", "DeepSeekMoE"),
]
_FIG3 = [("0s_2of16", "0+2/16"), ("1s_1of15", "1+1/15"), ("1s_3of31", "1+3/31"), ("1s_7of63", "1+7/63")]
_RATIO = [("1s_7of63", "1+7/63"), ("2s_6of62", "2+6/62"), ("4s_4of60", "4+4/60")]

CLAIMS = (
    Claim(
        1,
        "Table 1 loss order Dense > Hash > Switch > GShard > DeepSeekMoE",
        "Table 1, Pile loss",
        BPB_TEXT,
        _ordered(
            "table1",
            [(_TABLE1[i + 1], _TABLE1[i]) for i in range(4)],
            {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808},
        ),
    ),
    Claim(
        2,
        "DeepSeekMoE about equal to GShard x1.5 and to Dense x16",
        "Table 2, Pile loss",
        BPB_TEXT,
        _equal(
            "table2",
            [
                (("deepseekmoe", "DeepSeekMoE"), ("gshard_x1.5", "GShard x1.5")),
                (("deepseekmoe", "DeepSeekMoE"), ("dense_x16", "Dense x16")),
            ],
            {"gshard_x1.5": 1.808, "dense_x16": 1.806, "deepseekmoe": 1.808},
        ),
    ),
    Claim(
        3,
        "each step lowers the loss: shared expert isolation, then m = 2, then m = 4",
        "Fig 3, HellaSwag normalised to 1+7/63 (higher is better)",
        BPB_TEXT,
        _ordered(
            "ablation_fig3",
            [(_FIG3[i + 1], _FIG3[i]) for i in range(3)],
            {"0s_2of16": 0.922, "1s_1of15": 0.956, "1s_3of31": 0.980, "1s_7of63": 1.000},
        ),
    ),
    Claim(
        4,
        "shared : routed 1:7, 2:6 and 4:4 within noise of each other",
        "§4.4, Pile loss",
        BPB_TEXT,
        _equal(
            "shared_ratio",
            [(_RATIO[1], _RATIO[0]), (_RATIO[2], _RATIO[0]), (_RATIO[2], _RATIO[1])],
            {"1s_7of63": 1.808, "2s_6of62": 1.806, "4s_4of60": 1.811},
        ),
    ),
    Claim(
        5,
        "disabling the top routed experts hurts DeepSeekMoE more than GShard x1.5",
        "Fig 4, Pile loss increase over none disabled: DeepSeekMoE vs GShard x1.5",
        "held-out loss increase (nats/token), `moe-jax analyze`",
        tuple(
            Comparison(
                "specialization",
                "deepseekmoe",
                "gshard_x1.5",
                Metric(f"disable_top_{r}", minus="analysis_plain"),
                "higher",
                f"top {r} disabled",
                paper=(_increase("deepseekmoe", r), _increase("gshard_x1.5", r)),
            )
            for r in _RATIOS
        ),
    ),
    Claim(
        6,
        "DeepSeekMoE with only 4 routed experts active about equals GShard",
        "Fig 5, Pile loss",
        "held-out loss (nats/token), `moe-jax analyze`",
        (
            Comparison(
                "specialization",
                "deepseekmoe",
                "gshard",
                "top_k=4",
                "equal",
                "DeepSeekMoE top-4 ≈ GShard",
                paper=(1.868, 1.867),
                baseline_metric="analysis_plain",
            ),
        ),
    ),
    Claim(
        7,
        "disabling the shared expert (one more routed expert active) raises the loss sharply",
        "§4.5, Pile loss 1.808 -> 2.414",
        "held-out loss increase (nats/token), `moe-jax analyze`",
        (
            Comparison(
                "specialization",
                "deepseekmoe",
                None,
                Metric("shared_disabled", minus="analysis_plain"),
                "higher",
                "DeepSeekMoE, shared disabled: increase > 0",
                paper=(2.414 - 1.808,),
            ),
        ),
    ),
)
