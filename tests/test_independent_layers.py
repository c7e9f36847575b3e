"""Checks for examples/independent_layers.py: every cut agrees, and a cut really cuts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "examples" / "independent_layers.py"
CUTS = ("detach", "set_", "bridge")
MODES = (0, 1, 2)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("independent_layers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load()


def _equal(s: dict[str, torch.Tensor], t: dict[str, torch.Tensor], layers: str = "ABC") -> bool:
    keys = [k for k in s if k[0] in layers]
    assert keys and s.keys() == t.keys()
    return all(torch.equal(s[k], t[k]) for k in keys)


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


def test_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("initial", "none", "detach", "set_", "bridge", "weight"):
        assert word in proc.stdout
    initial = ex.initial_state()
    assert f"{initial['A.weight'][0, 0].item():.4f}" in proc.stdout
