"""The fallback section: per call, the pure-Python fallback beside the native operator, detach() and the PyPI reversal layers.

A process without a compiler runs the fallback (gradbridge_ext.NATIVE is False), and its
import warning says each call runs Python: this section measures what that costs. Both
implementations run in one process, interleaved. No bar: the table is the cost the
warning names. Rows only; report.py formats them.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from measure import Config, Step, make_input, reversal_layers, rows_per_size, time_interleaved

from gradbridge_ext import _fallback, ops

STMTS = {
    "detach": "t.detach()",
    "bridge(t)": "bridge(t)",
    "fallback bridge(t)": "fallback_bridge(t)",
    "bridge(t, -1.0)": "bridge(t, -1.0)",
    "fallback bridge(t, -1.0)": "fallback_bridge(t, -1.0)",
    "straight_through(t, q)": "straight_through(t, q)",
    "fallback straight_through(t, q)": "fallback_straight_through(t, q)",
}


def bench_fallback(sizes: list[int], config: Config, step: Step, device: str, note: Callable[[str], None]) -> list[dict]:
    """Forward per call at the smallest and largest size, t a leaf that requires grad; ratios to detach."""
    layers, names = reversal_layers(note)
    packages = {name: stmt for name, stmt in layers.items() if name in ("pytorch-revgrad", "torch-gradient-reversal")}
    # The Python entry points over the fallback's kernels: what a process without the native operator calls.
    entry = ops.entry_points(ops.Kernels(_fallback.bridge, _fallback.straight_through, _fallback.rotate_to, _fallback.set_strict))
    fallback = {"fallback_bridge": entry.bridge, "fallback_straight_through": entry.straight_through}
    ends = sorted({sizes[0], sizes[-1]})
    timers = {}
    for nbytes in ends:
        t = make_input(nbytes, True, device)
        namespace = dict(names, **fallback, bridge=ops.bridge, straight_through=ops.straight_through, t=t, q=t.detach().round())
        for name, stmt in {**STMTS, **packages}.items():
            timers[(nbytes, name)] = timeit.Timer(stmt, globals=namespace)
    methods = [*STMTS, *packages]
    samples, numbers = time_interleaved(timers, [(s,) for s in ends], methods, device, config, step)
    return rows_per_size(samples, numbers, "detach", "ratio_to_detach")
