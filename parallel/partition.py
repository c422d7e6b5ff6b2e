"""Contiguous layer-to-stage splits that minimise the slowest stage (dynamic programming).

A pipeline runs at the pace of its slowest stage, so the best split of ``L`` layers over ``p``
stages minimises ``max_i cost(i, start_i, stop_i)``. The cost may differ per stage (a faster
device makes the same layers cheaper, so it gets more of them) and may be infinite (the layers
do not fit the stage's memory), which makes the partition memory-aware for free.

``best[i][k]`` = the least bottleneck placing layers ``[0, k)`` on stages ``0..i``:
``best[i][k] = min_j max(best[i-1][j], cost(i, j, k))``; O(p * L^2) cost evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import accumulate

from pydantic import BaseModel, ConfigDict

#: cost(stage, start, stop) of running layers [start, stop) on a stage; math.inf when impossible
StageCost = Callable[[int, int, int], float]


class Split(BaseModel):
    """Stage boundaries ``bounds[i]..bounds[i+1]`` and the cost of the slowest stage."""

    model_config = ConfigDict(frozen=True)

    bounds: tuple[int, ...]
    bottleneck: float

    @property
    def stages(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:], strict=True))

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.bottleneck)


def split_layers(num_layers: int, num_stages: int, cost: StageCost, bound: StageCost | None = None) -> Split:
    """The contiguous split of ``num_layers`` layers into ``num_stages`` non-empty stages with the
    least bottleneck (one of them, if several). No feasible split: bottleneck ``inf``.

    ``bound``, if given, is a lower bound of ``cost`` that does not decrease as a stage grows
    (``bound(i, j - 1, k) >= bound(i, j, k)``): stages are then grown from their end and the
    growing stops once the bound alone is no better than the best found, which keeps the result
    exact and skips most evaluations on long models.
    """
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} non-empty stages")
    inf = math.inf
    # best[k]: least bottleneck of layers [0, k) on the stages placed so far; choice[i][k]: start of stage i
    best = [inf] * (num_layers + 1)
    for k in range(1, num_layers - num_stages + 2):
        best[k] = cost(0, 0, k)
    choice: list[list[int]] = [[0] * (num_layers + 1)]
    for i in range(1, num_stages):
        nxt = [inf] * (num_layers + 1)
        starts = [0] * (num_layers + 1)
        # stage i ends at k, with at least one layer per later stage left over
        for k in range(i + 1, num_layers - (num_stages - 1 - i) + 1):
            for j in range(k - 1, i - 1, -1):
                if best[j] >= nxt[k]:
                    continue  # cannot beat what k already has
                if bound is not None and bound(i, j, k) >= nxt[k]:
                    break  # this stage only gets dearer as it grows
                value = max(best[j], cost(i, j, k))
                if value < nxt[k]:
                    nxt[k], starts[k] = value, j
        best = nxt
        choice.append(starts)
    if not math.isfinite(best[num_layers]):
        # nothing feasible: report an even split, so the bounds still describe a partition
        even = tuple(i * num_layers // num_stages for i in range(num_stages + 1))
        return Split(bounds=even, bottleneck=math.inf)
    bounds = [num_layers]
    for i in range(num_stages - 1, 0, -1):
        bounds.append(choice[i][bounds[-1]])
    bounds.append(0)
    return Split(bounds=tuple(reversed(bounds)), bottleneck=best[num_layers])


def additive_cost(layer_costs: Sequence[Sequence[float]]) -> StageCost:
    """A stage cost that sums per-layer costs: ``layer_costs[stage][layer]`` (prefix sums)."""
    prefix = [[0.0, *accumulate(row)] for row in layer_costs]
    return lambda i, j, k: prefix[i][k] - prefix[i][j]


def proportional_shares(speeds: Sequence[float], num_layers: int) -> list[float]:
    """How many of ``num_layers`` equal layers each stage would get in proportion to its speed."""
    total = sum(speeds)
    return [num_layers * s / total for s in speeds]
