"""bridge's entry points under arbitrary arguments: no crash, no exception outside the documented ones.

The search itself is fuzz/fuzz_bridge.py. It runs in a child process, because a
crash in native code would otherwise take pytest down with it; the child writes
each input before calling, so a crash is reported with the input that caused it.
GRADBRIDGE_FUZZ_SECONDS sets the budget (default 60) for a longer local search.
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


def test_fuzzing_the_entry_points_finds_no_crash_and_no_unexpected_exception(tmp_path: Path) -> None:
    seconds = float(os.environ.get("GRADBRIDGE_FUZZ_SECONDS", "60"))
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
