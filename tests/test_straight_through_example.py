"""Checks for examples/straight_through.py: conclusions (a) and (b) hold on the example's own settings."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import straight_through as ex  # examples/ is on sys.path (conftest)
import torch

SCRIPT = Path(__file__).parent.parent / "examples" / "straight_through.py"


@pytest.fixture(scope="module")
def conclusions() -> Iterator[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs: small steps, a shared machine
    try:
        # The example's 80 steps: (b)'s BitMLP bound is about a trained model (at 20 steps
        # its loss is still above 0.5), and a shorter run is not what the example prints.
        yield ex.conclusions(steps=80)
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
    assert conclusions["b_vq_agree"], conclusions["final"]
    assert conclusions["b_bitmlp_trained"], (conclusions["first"], conclusions["final"])
    assert set(conclusions["c_time_ratio"]) == {"BitMLP", "VQ"}  # measured; speed is not a semantic


def test_the_training_check_fails_on_an_untrained_bitmlp() -> None:
    # (b) can fail: after 5 steps the BitMLP's loss is far above the bound.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not ex.conclusions(steps=5)["b_bitmlp_trained"]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # the whole script; its conclusions are checked in process above
def test_script_prints_checked_conclusions() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.count("[yes]") == 4 and "[NO ]" not in result.stdout, result.stdout
