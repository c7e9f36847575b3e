"""The test-device section: per call on a device torch does not ship, bridge against detach() there.

The device is tests/testdev, an out-of-tree backend over host memory plugged in as
PrivateUse1, as Ascend's and other plug-in backends are. It is no bar: the device is host
memory behind the dispatcher, so the table shows only that the device-generic path costs
what detach() costs on such a device. Rows only; report.py formats them.
"""

from __future__ import annotations

import sys
import tempfile
import timeit
from pathlib import Path

from measure import Config, Step, make_input, rows_per_size, time_interleaved

TESTS = Path(__file__).resolve().parents[1] / "tests"
STMTS = {"detach": "t.detach()", "bridge": "bridge(t)", "bridge(t, -1.0)": "bridge(t, -1.0)"}


def bench_test_device(sizes: list[int], config: Config, step: Step) -> list[dict]:
    """Per call at the smallest and largest size, t requiring grad, on the test device; ratios to detach."""
    sys.path.insert(0, str(TESTS))
    import testdev

    from gradbridge_ext import bridge

    with tempfile.TemporaryDirectory() as build:
        device = testdev.load(Path(build))  # loaded, so the folder may go
    ends = sorted({sizes[0], sizes[-1]})
    timers = {}
    for nbytes in ends:
        namespace = {"bridge": bridge, "t": make_input(nbytes, True, device)}
        for name, stmt in STMTS.items():
            timers[(nbytes, name)] = timeit.Timer(stmt, globals=namespace)
    samples, numbers = time_interleaved(timers, [(s,) for s in ends], list(STMTS), device, config, step)
    return rows_per_size(samples, numbers, "detach", "ratio_to_detach")
