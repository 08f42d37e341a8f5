"""Partition: contiguous, non-empty ranges of global layer indices, one per stage."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Partition:
    """Stage ``s`` owns layers ``bounds[s]`` up to ``bounds[s+1]`` (exclusive).

    ``Partition((0, 5, 9, 16))`` puts layers 0-4 on stage 0, 5-8 on stage 1, 9-15 on stage 2.
    """

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        b = tuple(int(x) for x in self.bounds)
        object.__setattr__(self, "bounds", b)
        if len(b) < 2:
            raise ValueError(f"a partition needs at least one stage, got bounds {b}")
        if b[0] != 0:
            raise ValueError(f"a partition starts at layer 0, got bounds {b}")
        for s in range(len(b) - 1):
            if b[s + 1] <= b[s]:
                raise ValueError(
                    f"stage {s} would be empty (bounds {b[s]}..{b[s + 1]}); "
                    "every stage needs at least one layer"
                )

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        """Number of layers over all stages."""
        return self.bounds[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layers per stage."""
        return tuple(self.bounds[s + 1] - self.bounds[s] for s in range(self.num_stages))

    def layers(self, stage: int) -> range:
        """Global indices of the layers on ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} does not exist (stages 0..{self.num_stages - 1})")
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_of(self, layer: int) -> int:
        """The stage that owns global layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} does not exist (layers 0..{self.num_layers - 1})")
        return bisect.bisect_right(self.bounds, layer) - 1

    def stage_costs(self, costs: Sequence[float]) -> list[float]:
        """Sum of per-layer ``costs`` on each stage."""
        _check_costs(costs, self.num_layers)
        return [math.fsum(costs[a:b]) for a, b in zip(self.bounds, self.bounds[1:], strict=False)]

    def move(self, src: int, dst: int, count: int) -> Partition:
        """Move ``count`` boundary layers from stage ``src`` to its neighbour ``dst``."""
        if abs(src - dst) != 1 or not (0 <= src < self.num_stages and 0 <= dst < self.num_stages):
            raise ValueError(
                f"layers move between neighbouring stages only: {src} -> {dst} "
                f"(stages 0..{self.num_stages - 1})"
            )
        if count < 1:
            raise ValueError(f"move at least one layer, got {count}")
        if count >= self.sizes[src]:
            raise ValueError(
                f"moving {count} layer(s) would leave stage {src} empty (it has {self.sizes[src]})"
            )
        b = list(self.bounds)
        if dst == src + 1:
            b[src + 1] -= count
        else:
            b[src] += count
        return Partition(tuple(b))

    def __str__(self) -> str:
        return " | ".join(
            f"{a}-{b - 1}" for a, b in zip(self.bounds, self.bounds[1:], strict=False)
        )

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> Partition:
        """Partition with ``sizes[s]`` layers on stage ``s``."""
        return cls((0, *accumulate(sizes)))

    @classmethod
    def even(cls, num_layers: int, num_stages: int) -> Partition:
        """Layer counts as equal as possible; earlier stages take the remainder."""
        _check_stage_count(num_layers, num_stages)
        q, r = divmod(num_layers, num_stages)
        return cls.from_sizes([q + (1 if s < r else 0) for s in range(num_stages)])

    @classmethod
    def balanced(
        cls, costs: Sequence[float], num_stages: int, speeds: Sequence[float] | None = None
    ) -> Partition:
        """A contiguous split minimising the most expensive stage (exact).

        ``speeds`` (one per stage, default all 1) scale what a stage's layers cost there: a
        stage at 2.0 takes twice as long for the same layers (a slow device).
        """
        n = len(costs)
        _check_stage_count(n, num_stages)
        _check_costs(costs, n)
        k_of = [1.0] * num_stages if speeds is None else [float(x) for x in speeds]
        if len(k_of) != num_stages:
            raise ValueError(f"{len(k_of)} speeds for {num_stages} stages")
        for s, x in enumerate(k_of):
            if not math.isfinite(x) or x <= 0:
                raise ValueError(f"speed of stage {s} must be a finite number > 0, got {x}")
        uniform = len(set(k_of)) == 1
        prefix = [0.0, *accumulate(float(c) for c in costs)]
        # best[k][j]: least max-stage cost splitting layers 0..j-1 into k+1 non-empty stages.
        best = [k_of[0] * prefix[j] for j in range(n + 1)]
        cuts: list[list[int]] = []
        for k in range(1, num_stages):
            new = [math.inf] * (n + 1)
            cut = [0] * (n + 1)
            speed = k_of[k]
            for j in range(k + 1, n + 1):
                if uniform:
                    # best[i] rises with i and the last stage's cost falls: the optimum is
                    # where they cross; check both sides of the crossing.
                    lo, hi = k, j - 1
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if best[mid] >= speed * (prefix[j] - prefix[mid]):
                            hi = mid
                        else:
                            lo = mid + 1
                    candidates: Iterable[int] = (i for i in (lo - 1, lo) if k <= i <= j - 1)
                else:
                    # With unequal speeds best[i] need not rise with i (one more layer can let
                    # a fast stage take a slow one's load): scan every first layer, earliest
                    # wins ties.
                    candidates = range(k, j)
                for i in candidates:
                    val = max(best[i], speed * (prefix[j] - prefix[i]))
                    if val < new[j]:
                        new[j], cut[j] = val, i
            best = new
            cuts.append(cut)
        bounds = [n]
        for cut in reversed(cuts):
            bounds.append(cut[bounds[-1]])
        bounds.append(0)
        return cls(tuple(reversed(bounds)))


def _check_stage_count(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"need at least 1 stage, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} stages but only {num_layers} layers: "
            "every stage needs at least one layer"
        )


def _check_costs(costs: Sequence[float], num_layers: int) -> None:
    if len(costs) != num_layers:
        raise ValueError(f"expected {num_layers} per-layer costs, got {len(costs)}")
    for i, c in enumerate(costs):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"cost of layer {i} must be a finite number >= 0, got {c}")
