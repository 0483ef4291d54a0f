"""recommend's verification as a sequential test on the paired per-window loss increase.

A quantized candidate is measured on the evaluation windows in stages ("looks"). At each look, with
``d_w = NLL_q(w) - NLL_fp(w)`` over the ``n`` windows measured so far, ``dL = mean(d_w)`` and its
paired standard error ``se = sd(d_w) / sqrt(n)``:

- **pass** when the upper bound ``dL + z * se`` is within the budget ``max_dL``;
- **miss** when the lower bound ``dL - z * se`` is above it;
- otherwise measure the next stage; after the protocol's windows (``max_windows``) the test may go on
  to further windows of the same text ("inconclusive, measuring more"); a bound that still straddles
  the budget at the last look is **inconclusive**, which is never reported as verified.

The looks are fixed before measuring: by default a quarter, a half, three quarters and all of the
protocol's windows, then 1.5x and 2x as many when the corpus has them. The critical value uses a
Bonferroni split of the one-sided error over the ``K`` looks, ``z = Phi^-1(1 - (1 - confidence) / K)``,
so the probability of declaring a pass when the true dL is above the budget is at most
``1 - confidence`` whatever the stopping time (union bound over the looks; the normal approximation of
a mean over at least ``min_windows`` windows is the remaining assumption), and the same holds for a
false miss. Without early stopping only the full protocol and the extension looks count (``K`` = 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

PASS, MISS, INCONCLUSIVE, CONTINUE = "pass", "miss", "inconclusive", "continue"


@dataclass(frozen=True)
class SequentialRule:
    looks: tuple[int, ...]  # windows measured at each look, increasing
    confidence: float

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(1 - (1 - self.confidence) / len(self.looks))

    def decide(self, d: list[float], max_dl: float, final: bool = False) -> tuple[str, float, float | None]:
        """(verdict, dL, se) from the per-window differences ``d`` measured so far."""
        n = len(d)
        mean = sum(d) / n
        if n < 2:
            return (INCONCLUSIVE if final else CONTINUE), mean, None
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
        if mean + self.z * se <= max_dl:
            return PASS, mean, se
        if mean - self.z * se > max_dl:
            return MISS, mean, se
        return (INCONCLUSIVE if final else CONTINUE), mean, se


def plan_looks(max_windows: int, available: int, early_stop: bool = True, min_windows: int = 4,
               extend: tuple[float, ...] = (1.5, 2.0)) -> tuple[int, ...]:
    """The looks for ``max_windows`` protocol windows and ``available`` windows in all (protocol + extra)."""
    looks: list[int] = []
    if early_stop:
        for frac in (0.25, 0.5, 0.75):
            n = max(min_windows, int(math.ceil(frac * max_windows)))
            if n < max_windows:
                looks.append(n)
    looks.append(max_windows)
    for f in extend:
        n = min(available, int(math.ceil(f * max_windows)))
        if n > looks[-1]:
            looks.append(n)
    return tuple(sorted(set(looks)))
