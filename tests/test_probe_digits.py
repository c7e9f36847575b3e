"""Checks for examples/probe_digits.py: a probe learns from B through bridge and costs B nothing."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
import probe_digits as ex  # noqa: E402 (examples/ is on sys.path: conftest)

SCRIPT = Path(__file__).parent.parent / "examples" / "probe_digits.py"
STEPS = 200  # B and C pass 0.9 by then (600 in the example)


pytestmark = pytest.mark.usefixtures("one_thread")  # as the example's main() runs (conftest)


@functools.cache
def _runs() -> dict[str, ex.Run]:
    data = ex.Digits.load()
    return {cut: ex.train(cut, STEPS, data) for cut in ex.CUTS}


def test_the_example_conclusions_hold() -> None:
    checked = ex.conclusions(_runs())
    assert all(holds for _, holds in checked), checked


def test_the_bitwise_check_fails_without_the_cut() -> None:
    # The check can fail: given the no-cut run in place of bridge's, B is another network.
    runs = _runs()
    checked = dict(ex.conclusions({**runs, "bridge": runs["no cut"]}))
    assert not checked["through bridge, B's final parameters are bitwise those of B trained alone"]


@pytest.mark.slow  # the script; its conclusions are checked in process above
def test_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "100"], capture_output=True, text=True, timeout=300, check=True
    )
    assert f"torch {torch.__version__}" in result.stdout
    assert "[NO ]" not in result.stdout and result.stdout.count("[yes]") == 6
