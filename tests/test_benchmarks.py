"""The benchmark runs and measures what it says; the README's tables are the committed results."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_bridge  # noqa: E402
import measure  # noqa: E402
import training  # noqa: E402
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


@pytest.mark.slow  # a quick benchmark run
def test_quick_run_covers_every_method_size_and_mode(quick_run: dict) -> None:
    methods = set(measure.METHODS)
    assert {r["method"] for r in quick_run["latency"]} == methods
    assert {(r["size_bytes"], r["requires_grad"]) for r in quick_run["latency"]} == {
        (4, True), (4, False), (65536, True), (65536, False)
    }  # fmt: skip
    assert {(r["mode"], r["method"]) for r in quick_run["training"]} == {
        (mode, name) for mode in training.MODES for name in training.CUTS
    }
    assert [b["bar"] for b in quick_run["bars"]] and "errors" not in quick_run
    # A --quick run decides what it counts (bytes), not what it times.
    # The rotation section runs where vector-quantize-pytorch is installed (the test extra has it).
    rotation = [True, None, None] if quick_run.get("rotation") else []
    assert [b["holds"] for b in quick_run["bars"]] == [None, None, True, None, True, None, None, None, True, None, *rotation]
    assert {(r["size_bytes"], r["method"]) for r in quick_run["test_device"]} == {
        (s, m) for s in (4, 65536) for m in ("detach", "bridge", "bridge(t, -1.0)")
    }  # fmt: skip
    assert quick_run["environment"]["torch"]


@pytest.mark.slow  # a quick benchmark run
def test_memory_shows_the_copy_of_the_set_trick_and_none_for_the_aliases(quick_run: dict) -> None:
    for r in quick_run["memory"]:
        if r["method"] == "set_ trick":
            assert r["allocated_bytes"] == r["size_bytes"]
        else:
            assert r["allocated_bytes"] == 0, r


@pytest.mark.slow  # a quick benchmark run
def test_straight_through_section_is_exact_and_allocates_nothing(quick_run: dict) -> None:
    ste = quick_run["straight_through"]
    names = {"trick", "autograd.Function", "straight_through", "bridge(t, -1.0)"}
    assert names <= {r["method"] for r in ste["per_call"]}
    assert {r["size_bytes"] for r in ste["per_call"]} == {4, 65536}
    for r in ste["forward"]:
        if r["method"] in ("trick", "vector-quantize-pytorch"):  # q - x, then x + that
            assert r["allocated_bytes"] == 2 * r["size_bytes"], r
        elif r["method"] == "straight_through":
            assert r["allocated_bytes"] == 0, r
    assert {(r["dtype"], r["method"]) for r in ste["step"]} == {
        (d, m) for d in ("float32", "bfloat16") for m in ("trick", "straight_through")
    }
    assert {(r["dtype"], r["method"]) for r in ste["compiled_step"]} == {("float32", "trick"), ("float32", "straight_through")}
    assert {(r["size_bytes"], r["method"]) for r in ste["compiled_pair"]} == {
        (s, m) for s in (4, 65536) for m in ("trick", "straight_through", "q, q")
    }  # fmt: skip
    exact = {(r["quantizer"], r["dtype"], r["method"]): r["share_differ"] for r in ste["exactness"]}
    assert all(v == 0 for (_, _, m), v in exact.items() if m == "straight_through")
    assert exact[("VQ lookup", "bfloat16", "trick")] > 0  # what the table is there to show


@pytest.mark.slow  # a quick benchmark run
def test_every_cut_trains_the_same_model(quick_run: dict) -> None:
    # The methods differ in cost only: the same steps give bitwise the same loss.
    for mode in training.MODES:
        losses = {r["method"]: r["final_loss"] for r in quick_run["training"] if r["mode"] == mode}
        assert len({v for name, v in losses.items() if name != "no cut"}) == 1, losses


def test_sizes_parse_and_print_back() -> None:
    for text, nbytes in [("4B", 4), ("64KB", 65536), ("256MB", 2**28), ("1gb", 2**30)]:
        assert measure.parse_size(text) == nbytes
        assert measure.format_size(nbytes).upper() == text.upper()
    with pytest.raises(Exception, match="expected a number"):
        measure.parse_size("4 bytes")


def tracked_state() -> tuple[str, bytes]:
    """git status of benchmarks/ and README.md (untracked files included), and their tracked bytes."""
    root = BENCHMARKS.parent
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", "benchmarks", "README.md"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "benchmarks", "README.md"], cwd=root,
                             capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    return status, b"".join((root / name.decode()).read_bytes() for name in tracked if name)


def test_a_default_run_writes_only_ignored_files() -> None:
    # make bench, then make test: the run must leave the committed results and the README be.
    if subprocess.run(["git", "rev-parse"], cwd=BENCHMARKS, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    assert bench_bridge.LOCAL.parent == bench_bridge.RESULTS
    local = bench_bridge.LOCAL / "cpu" / "results.json"
    kept = local.read_bytes() if local.exists() else None  # a real run's, if any
    before = tracked_state()
    try:
        bench_bridge.main(["--device", "cpu", "--quick", "--sizes", "4B", "--sections", "memory"])
        assert json.loads(local.read_text())["memory"]
        assert tracked_state() == before
    finally:
        if kept is not None:
            local.write_bytes(kept)
