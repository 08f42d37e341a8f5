"""Tests for adaptive_pp.partition: exact balancing, validation, moves, lookups."""

from __future__ import annotations

import math
from itertools import combinations, pairwise

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from adaptive_pp.core.partition import Partition

# Includes 0 (free layers) and non-dyadic values (rounding in the prefix sums).
COST_VALUES = [0.0, 0.1, 0.5, 1.0, 2.5, 3.0, 7.0]
costs_st = st.lists(st.sampled_from(COST_VALUES), min_size=1, max_size=9)


def brute_force_min_max(costs: list[float], num_stages: int) -> float:
    """Least possible most-expensive stage over every contiguous split into non-empty stages."""
    n = len(costs)
    best = math.inf
    for cuts in combinations(range(1, n), num_stages - 1):
        bounds = (0, *cuts, n)
        worst = max(math.fsum(costs[a:b]) for a, b in pairwise(bounds))
        best = min(best, worst)
    return best


@st.composite
def partitions(draw: st.DrawFn, max_stages: int = 12) -> Partition:
    """A random valid partition."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=max_stages))
    return Partition.from_sizes(sizes)


# --- balanced ---------------------------------------------------------------------------------


@given(costs=costs_st, data=st.data())
def test_balanced_is_optimal(costs: list[float], data: st.DataObject) -> None:
    num_stages = data.draw(st.integers(1, len(costs)))
    part = Partition.balanced(costs, num_stages)
    assert part.num_stages == num_stages
    assert part.bounds[0] == 0
    assert part.bounds[-1] == len(costs) == part.num_layers
    assert all(size >= 1 for size in part.sizes)
    assert sum(part.sizes) == len(costs)
    worst = max(part.stage_costs(costs))
    assert worst == pytest.approx(brute_force_min_max(costs, num_stages), rel=1e-9, abs=1e-12)


@given(costs=costs_st, data=st.data())
def test_balanced_with_stage_speeds_is_optimal(costs: list[float], data: st.DataObject) -> None:
    """A stage at speed k takes k x its layers' costs; the split minimises the costliest."""
    num_stages = data.draw(st.integers(1, len(costs)))
    speeds = data.draw(
        st.lists(st.sampled_from([0.5, 1.0, 1.5, 3.0]), min_size=num_stages, max_size=num_stages)
    )
    part = Partition.balanced(costs, num_stages, speeds)
    assert part.num_stages == num_stages and part.num_layers == len(costs)

    def worst(p: Partition) -> float:
        return max(k * c for k, c in zip(speeds, p.stage_costs(costs), strict=True))

    n = len(costs)
    brute = min(
        worst(Partition((0, *cuts, n))) for cuts in combinations(range(1, n), num_stages - 1)
    )
    assert worst(part) == pytest.approx(brute, rel=1e-9, abs=1e-12)


def test_balanced_with_speeds_lets_a_fast_stage_take_more() -> None:
    """Stage 0 at twice the speed: [1, 2 | 1 | 1] (1.5) beats every split that gives stage 1 the
    2 (2.0); splitting fewer layers can cost more here, which is why unequal speeds scan."""
    part = Partition.balanced([1.0, 2.0, 1.0, 1.0], 3, [0.5, 1.0, 1.0])
    assert part.bounds == (0, 2, 3, 4)


@pytest.mark.parametrize(
    ("speeds", "pattern"),
    [
        ([1.0], "1 speeds for 2 stages"),
        ([1.0, 0.0], "speed of stage 1"),
        ([math.inf, 1.0], "stage 0"),
    ],
)
def test_balanced_speed_errors(speeds: list[float], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Partition.balanced([1.0, 2.0, 3.0], 2, speeds)


@pytest.mark.parametrize(
    ("costs", "num_stages", "best", "bounds"),
    [
        # One heavy layer gets a stage of its own: with a neighbour (cost 1) it would be 11.
        ([1, 1, 1, 10, 1, 1], 3, 10, None),
        # The best cut is just before the point where the left side outweighs the right:
        # 5 | 4 3 (max 7), not 5 4 | 3 (max 9).
        ([5, 4, 3], 2, 7, (0, 1, 3)),
        # 1 | 5 4 3 = 12, 1 5 | 4 3 = 7, 1 5 4 | 3 = 10.
        ([1, 5, 4, 3], 2, 7, (0, 2, 4)),
        # The 6 is a lower bound, met by 0 0 6 | 1 2 | 2 0 (or with the zeros moved about).
        ([0, 0, 6, 1, 2, 2, 0], 3, 6, None),
        # Equal costs split evenly when the count divides.
        ([2, 2, 2, 2, 2, 2], 3, 4, (0, 2, 4, 6)),
        # One stage takes everything; as many stages as layers take one each.
        ([3, 1, 4, 1, 5], 1, 14, (0, 5)),
        ([3, 1, 4, 1, 5], 5, 5, (0, 1, 2, 3, 4, 5)),
    ],
)
def test_balanced_small_cases(
    costs: list[float], num_stages: int, best: float, bounds: tuple[int, ...] | None
) -> None:
    part = Partition.balanced(costs, num_stages)
    assert max(part.stage_costs(costs)) == best
    if bounds is not None:
        assert part.bounds == bounds
    if best == 10:
        assert part.sizes[part.stage_of(3)] == 1


def test_balanced_all_zero_costs() -> None:
    part = Partition.balanced([0.0] * 7, 3)
    assert part.num_stages == 3
    assert all(size >= 1 for size in part.sizes)
    assert part.stage_costs([0.0] * 7) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("costs", "num_stages", "pattern"),
    [
        ([1.0, 2.0], 3, r"3 stages but only 2 layers"),
        ([], 1, r"1 stages but only 0 layers"),
        ([1.0, 2.0], 0, r"need at least 1 stage, got 0"),
        ([1.0, 2.0], -2, r"need at least 1 stage, got -2"),
        ([1.0, -0.5, 2.0], 2, r"cost of layer 1 must be a finite number >= 0"),
        ([1.0, 2.0, math.nan], 2, r"cost of layer 2 .*nan"),
        ([math.inf, 2.0, 1.0], 2, r"cost of layer 0 .*inf"),
    ],
)
def test_balanced_errors(costs: list[float], num_stages: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Partition.balanced(costs, num_stages)


# --- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounds", "pattern"),
    [
        ((0, 2, 2, 5), r"stage 1 would be empty \(bounds 2\.\.2\)"),
        ((0, 0, 3), r"stage 0 would be empty"),
        ((0, 3, 5, 4), r"stage 2 would be empty"),
        ((1, 3, 5), r"starts at layer 0"),
        ((0,), r"at least one stage"),
        ((), r"at least one stage"),
    ],
)
def test_bad_bounds(bounds: tuple[int, ...], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Partition(bounds)


def test_stage_costs_wrong_number_of_costs() -> None:
    part = Partition((0, 2, 5))
    with pytest.raises(ValueError, match=r"expected 5 per-layer costs, got 4"):
        part.stage_costs([1.0] * 4)
    with pytest.raises(ValueError, match=r"cost of layer 3"):
        part.stage_costs([1.0, 1.0, 1.0, -1.0, 1.0])
    assert part.stage_costs([1.0, 2.0, 3.0, 4.0, 5.0]) == [3.0, 12.0]


def test_docstring_example_and_str() -> None:
    part = Partition((0, 5, 9, 16))
    assert part.num_stages == 3
    assert part.num_layers == 16
    assert part.sizes == (5, 4, 7)
    assert list(part.layers(1)) == [5, 6, 7, 8]
    assert [part.stage_of(x) for x in (0, 4, 5, 8, 9, 15)] == [0, 0, 1, 1, 2, 2]
    assert str(part) == "0-4 | 5-8 | 9-15"


@pytest.mark.parametrize(
    ("num_layers", "num_stages", "sizes"),
    [
        (10, 3, (4, 3, 3)),
        (9, 3, (3, 3, 3)),
        (5, 5, (1, 1, 1, 1, 1)),
        (7, 1, (7,)),
        (8, 3, (3, 3, 2)),
    ],
)
def test_even(num_layers: int, num_stages: int, sizes: tuple[int, ...]) -> None:
    assert Partition.even(num_layers, num_stages).sizes == sizes


@pytest.mark.parametrize(("num_layers", "num_stages"), [(2, 3), (4, 0), (0, 1)])
def test_even_errors(num_layers: int, num_stages: int) -> None:
    with pytest.raises(ValueError, match="stage"):
        Partition.even(num_layers, num_stages)


@given(st.integers(1, 40), st.data())
def test_even_property(num_layers: int, data: st.DataObject) -> None:
    num_stages = data.draw(st.integers(1, num_layers))
    part = Partition.even(num_layers, num_stages)
    assert part.num_layers == num_layers
    assert max(part.sizes) - min(part.sizes) <= 1
    assert list(part.sizes) == sorted(part.sizes, reverse=True)  # remainder goes first


@given(partitions())
def test_lookups_are_consistent(part: Partition) -> None:
    assert Partition.from_sizes(part.sizes) == part
    assert Partition(part.bounds) == part
    covered = [layer for s in range(part.num_stages) for layer in part.layers(s)]
    assert covered == list(range(part.num_layers))
    for s in range(part.num_stages):
        assert len(part.layers(s)) == part.sizes[s]
        for layer in part.layers(s):
            assert part.stage_of(layer) == s
    for bad in (-1, part.num_layers):
        with pytest.raises(IndexError, match=f"layer {bad}"):
            part.stage_of(bad)
    for bad in (-1, part.num_stages):
        with pytest.raises(IndexError, match=f"stage {bad}"):
            part.layers(bad)


def test_from_sizes_rejects_empty_stage() -> None:
    with pytest.raises(ValueError, match="stage 1 would be empty"):
        Partition.from_sizes([2, 0, 3])


def test_bounds_are_normalised_to_ints() -> None:
    part = Partition([0, 2.0, 5])  # type: ignore[arg-type]
    assert part.bounds == (0, 2, 5)
    assert all(type(b) is int for b in part.bounds)


# --- move -------------------------------------------------------------------------------------


def test_move_examples() -> None:
    part = Partition((0, 3, 6, 9))
    assert part.move(1, 0, 2).bounds == (0, 5, 6, 9)  # layers 3, 4 go down to stage 0
    assert part.move(1, 2, 2).bounds == (0, 3, 4, 9)  # layers 4, 5 go up to stage 2
    assert part.move(0, 1, 1).bounds == (0, 2, 6, 9)
    assert part.move(2, 1, 2).bounds == (0, 3, 8, 9)
    wide = Partition((0, 5, 10))
    assert wide.move(0, 1, 4).bounds == (0, 1, 10)
    assert wide.move(1, 0, 4).bounds == (0, 9, 10)
    assert part.bounds == (0, 3, 6, 9)  # the original is unchanged


@pytest.mark.parametrize(
    ("src", "dst", "count", "pattern"),
    [
        (0, 2, 1, r"neighbouring stages only: 0 -> 2"),
        (1, 1, 1, r"neighbouring stages only: 1 -> 1"),
        (-1, 0, 1, r"neighbouring stages only: -1 -> 0"),
        (2, 3, 1, r"neighbouring stages only: 2 -> 3"),
        (1, 0, 0, r"move at least one layer, got 0"),
        (1, 0, -2, r"move at least one layer, got -2"),
        (1, 0, 3, r"would leave stage 1 empty \(it has 3\)"),
        (0, 1, 4, r"would leave stage 0 empty"),
    ],
)
def test_move_errors(src: int, dst: int, count: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Partition((0, 3, 6, 9)).move(src, dst, count)


@given(partitions(), st.data())
def test_move_property(part: Partition, data: st.DataObject) -> None:
    assume(part.num_stages >= 2)
    src = data.draw(st.integers(0, part.num_stages - 1))
    dst = data.draw(st.sampled_from([d for d in (src - 1, src + 1) if 0 <= d < part.num_stages]))
    count = data.draw(st.integers(-1, part.sizes[src] + 1))
    if count < 1 or count >= part.sizes[src]:
        with pytest.raises(ValueError):
            part.move(src, dst, count)
        return
    moved = part.move(src, dst, count)
    assert moved.num_layers == part.num_layers
    assert moved.num_stages == part.num_stages
    assert all(size >= 1 for size in moved.sizes)
    assert moved.sizes[src] == part.sizes[src] - count
    assert moved.sizes[dst] == part.sizes[dst] + count
    for s in range(part.num_stages):
        if s not in (src, dst):
            assert moved.layers(s) == part.layers(s)
    # The layers that moved are the ones on the boundary that src shares with dst.
    src_layers = list(part.layers(src))
    boundary = src_layers[:count] if dst < src else src_layers[-count:]
    changed = [x for x in range(part.num_layers) if moved.stage_of(x) != part.stage_of(x)]
    assert changed == boundary
    assert all(moved.stage_of(x) == dst for x in boundary)
    # Moving them back restores the partition.
    assert moved.move(dst, src, count) == part


@given(partitions(), st.data())
def test_move_to_non_neighbour_always_fails(part: Partition, data: st.DataObject) -> None:
    src = data.draw(st.integers(-2, part.num_stages + 1))
    dst = data.draw(st.integers(-2, part.num_stages + 1))
    assume(abs(src - dst) != 1 or not (0 <= src < part.num_stages and 0 <= dst < part.num_stages))
    with pytest.raises(ValueError, match="neighbouring"):
        part.move(src, dst, 1)
