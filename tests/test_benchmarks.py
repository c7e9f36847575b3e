"""The benchmark runs and measures what it says; the README's tables are the committed results."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_bridge  # noqa: E402
import update_readme  # noqa: E402


def test_readme_tables_are_the_committed_results() -> None:
    for device in ("cpu", "cuda"):
        assert (BENCHMARKS / "results" / device / "results.json").exists()
    readme = update_readme.README.read_text()
    assert update_readme.updated(readme) == readme, "run python benchmarks/update_readme.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    states = random.getstate(), torch.get_rng_state()  # the benchmark seeds both
    try:
        bench_bridge.main(["--device", "cpu", "--quick", "--sizes", "4B,64KB", "--out", str(out)])
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])
    return json.loads((out / "cpu" / "results.json").read_text())


def test_quick_run_covers_every_method_size_and_mode(quick_run: dict) -> None:
    methods = set(bench_bridge.METHODS)
    assert {r["method"] for r in quick_run["latency"]} == methods
    assert {(r["size_bytes"], r["requires_grad"]) for r in quick_run["latency"]} == {
        (4, True), (4, False), (65536, True), (65536, False)
    }  # fmt: skip
    assert {(r["mode"], r["method"]) for r in quick_run["training"]} == {
        (mode, name) for mode in bench_bridge.MODES for name in bench_bridge.CUTS
    }
    assert [b["bar"] for b in quick_run["bars"]] and "errors" not in quick_run
    assert quick_run["environment"]["torch"]


def test_memory_shows_the_copy_of_the_set_trick_and_none_for_the_aliases(quick_run: dict) -> None:
    for r in quick_run["memory"]:
        if r["method"] == "set_ trick":
            assert r["allocated_bytes"] == r["size_bytes"]
        else:
            assert r["allocated_bytes"] == 0, r


def test_every_cut_trains_the_same_model(quick_run: dict) -> None:
    # The methods differ in cost only: the same steps give bitwise the same loss.
    for mode in bench_bridge.MODES:
        losses = {r["method"]: r["final_loss"] for r in quick_run["training"] if r["mode"] == mode}
        assert len({v for name, v in losses.items() if name != "no cut"}) == 1, losses


def test_sizes_parse_and_print_back() -> None:
    for text, nbytes in [("4B", 4), ("64KB", 65536), ("256MB", 2**28), ("1gb", 2**30)]:
        assert bench_bridge.parse_size(text) == nbytes
        assert bench_bridge.format_size(nbytes).upper() == text.upper()
    with pytest.raises(Exception, match="expected a number"):
        bench_bridge.parse_size("4 bytes")
