"""bridge's and straight_through's entry points under arbitrary arguments: no crash, no exception outside the documented ones.

The search itself is fuzz/fuzz_bridge.py. It runs in a child process, because a
crash in native code would otherwise take pytest down with it; the child writes
each input before calling, so a crash is reported with the input that caused it.
The fast tier searches for SHORT_SECONDS, whatever the environment says; the full
tier for GRADBRIDGE_FUZZ_SECONDS (default 60), which a longer local search raises.
Both start from the same seed, so the short search is the long one's beginning;
its first chunk alone returns a result through every entry (the harness fails
otherwise), so the short search does not depend on the machine's speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gradbridge_ext

pytest.importorskip("hypothesis")

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_bridge.py"
SEED = 0  # fixed, so that a failure here reproduces with the command in the message
SHORT_SECONDS = 5.0


def test_a_short_search_finds_no_crash_and_no_unexpected_exception(tmp_path: Path) -> None:
    search(tmp_path, SHORT_SECONDS)


@pytest.mark.slow
def test_fuzzing_the_entry_points_finds_no_crash_and_no_unexpected_exception(tmp_path: Path) -> None:
    search(tmp_path, float(os.environ.get("GRADBRIDGE_FUZZ_SECONDS", "60")))


def search(tmp_path: Path, seconds: float) -> None:
    """Run the harness for `seconds` in a child process; fail with the input of any finding, crash or hang."""
    last_input = tmp_path / "last_input.txt"
    command = [sys.executable, "-X", "faulthandler", str(HARNESS), "--seconds", str(seconds), "--seed", str(SEED),
               "--last-input", str(last_input)]  # fmt: skip
    # The child imports the gradbridge_ext this process imported, installed or not.
    package_root = str(Path(gradbridge_ext.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    rerun = f"rerun: PYTHONPATH={package_root} {' '.join(command[:-2])}"

    def last_call() -> str:
        return last_input.read_text() if last_input.exists() else "(none written)"

    try:
        child = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=seconds + 240)
    except subprocess.TimeoutExpired:  # a hang is a finding too; shrinking a failure takes a while, not this long
        pytest.fail(f"the search hung; the call in progress was:\n{last_call()}\n{rerun}")
    output = f"{child.stdout[-8000:]}\n{child.stderr[-8000:]}"
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        pytest.fail(f"the search died from {name} in the call:\n{last_call()}\n{output}\n{rerun}")
    assert child.returncode == 0, f"the search found an unexpected outcome:\n{output}\n{rerun}"
    assert "calls in" in child.stdout  # it did search
    for path in ("results: bridge", "results: straight_through(x, q)", "results: straight_through'",
                 "results: torch.ops.straight_through.Tensor"):  # fmt: skip
        assert path in child.stdout, f"no call returned a result through {path[9:]}:\n{output}"  # the harness says so too
