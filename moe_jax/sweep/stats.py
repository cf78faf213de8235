"""Mean and sample standard deviation over seeds: the one statistic behind every number of the sweep's
tables (a member's metric over its seeds in the report, the paired per-seed differences of its curves,
and both in the claims table)."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Stats:
    """mean and sample std (0 for n = 1) of n values."""

    n: int
    mean: float
    std: float


def describe(values: Iterable[float]) -> Stats | None:
    """Mean and sample std (ddof 1; 0 for one value) of `values`, summed exactly (math.fsum); None when
    empty."""
    values = [float(v) for v in values]
    if not values:
        return None
    n, mean = len(values), math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stats(n, mean, std)
