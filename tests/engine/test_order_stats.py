"""Exact streaming order statistics (radix select over float keys)."""

from __future__ import annotations

import math

import pytest
import torch

from mergeforge.engine.order_stats import float_keys, key_value, select, totals


def test_keys_order_like_the_values_and_round_trip() -> None:
    vals = torch.tensor([-math.inf, -3.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 2.0, 3.4e38, math.inf])
    keys = float_keys(vals)
    assert torch.all(keys[1:] >= keys[:-1])
    assert [key_value(int(k)) for k in keys] == vals.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_matches_sorting_the_concatenated_stream(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    chunks = [[torch.randn(n, generator=g) * 10 ** (j - 2) for j, n in enumerate((7, 300, 1, 50))]
              for _ in range(2)]  # fmt: skip
    chunks[1][2] = torch.zeros(40)  # many ties

    def scan(visit) -> None:
        for part in range(4):
            for i in range(2):
                visit(i, float_keys(chunks[i][part]))

    n = totals(scan, 2)
    ranks = [[1, 5, n[0] // 2, n[0]], [1, 100, 200, n[1]]]
    got = select(scan, ranks)
    for i in range(2):
        ordered = torch.cat(chunks[i]).sort().values
        assert got[i] == [float(ordered[r - 1]) for r in ranks[i]]
