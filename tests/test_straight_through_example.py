"""Checks for examples/straight_through.py: conclusions (a) and (b) hold at short settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import straight_through as ex  # examples/ is on sys.path (conftest)
import torch


@pytest.fixture(scope="module")
def conclusions() -> Iterator[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs: small steps, a shared machine
    try:
        yield ex.conclusions(steps=20)
    finally:
        torch.set_num_threads(threads)


def test_straight_through_keeps_every_value_on_the_grid(conclusions: dict) -> None:
    exact = conclusions["exact"]
    for dtype in ex.CHECK_DTYPES:
        assert exact[("distinct", dtype, "straight_through")] == [3, 3, 3], dtype
        assert exact[("off codebook", dtype, "straight_through")] == 0, dtype
    assert conclusions["a_ours_on_grid"]


def test_the_trick_leaves_the_grid_in_low_precision(conclusions: dict) -> None:
    # What (a) compares against: were the trick exact too, the example would show nothing.
    assert conclusions["a_trick_off_grid"], conclusions["exact"]


def test_both_train_alike_in_fp32(conclusions: dict) -> None:
    assert conclusions["dtype"] == "float32"
    assert conclusions["b_same_training"], conclusions["final"]
    assert set(conclusions["c_time_ratio"]) == {"BitMLP", "VQ"}  # measured; speed is not a semantic
