"""Checks for examples/independent_layers.py: every cut agrees, and a cut really cuts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import independent_layers as ex  # examples/ is on sys.path (conftest)
import pytest

SCRIPT = Path(__file__).parent.parent / "examples" / "independent_layers.py"
CUTS = ("detach", "set_", "bridge")
MODES = (0, 1, 2)

_equal = ex._same  # the example's own comparison: bitwise, per layer


@pytest.mark.parametrize("mode", MODES)
def test_cuts_agree_bitwise(mode: int) -> None:
    ref = ex.run("detach", mode)
    for cut in CUTS[1:]:
        assert _equal(ex.run(cut, mode), ref), cut


def test_bridge_mode1_trains_only_c() -> None:
    init, after = ex.initial_state(), ex.run("bridge", 1)
    assert _equal(after, init, "AB")
    assert not _equal(after, init, "C")


def test_no_cut_mode1_trains_a_and_b() -> None:
    init, after = ex.initial_state(), ex.run("none", 1)
    assert not _equal(after, init, "A")
    assert not _equal(after, init, "B")


def test_mode0_is_the_same_for_every_method() -> None:
    ref = ex.run("none", 0)
    assert _equal(ref, ex.initial_state(), "C")
    assert not _equal(ref, ex.initial_state(), "AB")
    for cut in CUTS:
        assert _equal(ex.run(cut, 0), ref), cut


@pytest.mark.parametrize("cut", CUTS)
def test_mode2_with_cut_is_mode0_for_ab_and_mode1_for_c(cut: str) -> None:
    both = ex.run(cut, 2)
    assert _equal(both, ex.run(cut, 0), "AB")
    assert _equal(both, ex.run(cut, 1), "C")


@pytest.mark.slow  # the whole script; its conclusions are checked in process above
def test_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("initial", "none", "detach", "set_", "bridge", "weight"):
        assert word in proc.stdout
    assert proc.stdout.count("[yes]") == 5 and "[NO ]" not in proc.stdout
    initial = ex.initial_state()
    assert f"{initial['A.weight'][0, 0].item():.4f}" in proc.stdout


def test_the_printed_conclusions_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    states = {mode: {cut: ex.run(cut, mode) for cut in ex.CUTS} for mode in MODES}
    assert all(holds for _, holds in ex.conclusions(states))
    monkeypatch.setitem(ex.CUTS, "bridge", lambda b: b)  # a bridge that does not cut
    broken = {mode: {cut: ex.run(cut, mode) for cut in ex.CUTS} for mode in MODES}
    failed = [statement for statement, holds in ex.conclusions(broken) if not holds]
    assert "with bridge, C's loss (mode 1) leaves A and B unchanged" in failed
    assert "detach, the set_ trick and bridge give bitwise the same weights in every mode" in failed
