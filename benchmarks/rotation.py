"""The rotation section: ``gradbridge_ext.rotate_to`` against vector-quantize-pytorch's ``rotate_to``.

The library's function (vector_quantize_pytorch, where installed; the section is skipped,
with a note, where it is not) computes the rotation trick's map in the forward; ours is
``q`` itself forward and the rotated gradient in the backward. Per call, forward +
backward (``torch.autograd.backward`` on the result, ``x`` a leaf that requires grad), at
several shapes and dtypes; one forward's bytes, ops and kernels; and the library's
``VectorQuantize`` training step with each, time and peak memory, interleaved. Rows only;
report.py formats them and checks the bars.
"""

from __future__ import annotations

import importlib
import timeit
from collections.abc import Callable

import torch

import gradbridge_ext
from measure import Config, Step, call_cost, cpu_allocations, cuda_allocations, paired_ratio, profiled, quartiles
from measure import synchronize, time_interleaved

LIBRARY = "rotate_to (vector-quantize-pytorch)"
OURS = "gradbridge_ext.rotate_to"
# (rows, dim, dtype); the bar is decided at the first.
SHAPES = {"16384x256 float32": (16384, 256, torch.float32), "16384x256 bfloat16": (16384, 256, torch.bfloat16),
          "65536x32 float32": (65536, 32, torch.float32), "2048x256 float32": (2048, 256, torch.float32)}  # fmt: skip
BAR_SHAPE = "16384x256 float32"
STEP = {"dim": 256, "codebook_size": 512, "batch": 64, "tokens": 256}  # VectorQuantize's step: (64, 256, 256) input


def library() -> object | None:
    """vector_quantize_pytorch's module holding rotate_to, or None where the package is not installed."""
    try:
        return importlib.import_module("vector_quantize_pytorch.vector_quantize_pytorch")
    except ImportError:
        return None


def _inputs(rows: int, dim: int, dtype: torch.dtype, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=generator).to(device, dtype).requires_grad_()
    q = torch.randn(rows, dim, generator=generator).to(device, dtype)
    return {"x": x, "q": q, "g": torch.ones_like(q)}


def bench_rotation(device: str, config: Config, step: Step, note: Callable[[str], None]) -> dict:
    """Per call (forward + backward), one forward's cost per shape, and VectorQuantize's step with each."""
    module = library()
    if module is None:
        note("rotation: vector-quantize-pytorch is not installed (pip install vector-quantize-pytorch); section skipped")
        return {}
    functions = {LIBRARY: module.rotate_to, OURS: gradbridge_ext.rotate_to}
    timers, forward = {}, []
    for name, (rows, dim, dtype) in SHAPES.items():
        namespace = {"backward": torch.autograd.backward, **functions, **_inputs(rows, dim, dtype, device)}
        for method in functions:
            fn = functions[method]
            timers[(name, method)] = timeit.Timer(lambda fn=fn, ns=namespace: ns["backward"](fn(ns["x"], ns["q"]), ns["g"]))
            one = lambda fn=fn, ns=namespace: fn(ns["x"], ns["q"])  # noqa: E731
            one()
            forward.append({"shape": name, "method": method, **call_cost(one, device)})
        synchronize(device)
    samples, numbers = time_interleaved(timers, [(name,) for name in SHAPES], list(functions), device, config, step)
    per_call = []
    for (name, method), ns in samples.items():
        q1, median, q3 = quartiles(ns)
        per_call.append({"shape": name, "method": method, "median_ns": median, "q1_ns": q1, "q3_ns": q3,
                         "ratio_to_library": paired_ratio(ns, samples[(name, LIBRARY)]),
                         "calls_per_repeat": numbers[(name, method)], "samples_ns": ns})  # fmt: skip
    return {"per_call": per_call, "forward": forward, "step": _bench_step(module, functions, device, config, step)}


def _bench_step(module: object, functions: dict, device: str, config: Config, step: Step) -> list[dict]:
    """VectorQuantize's training step (forward, backward, Adam), its rotate_to swapped for each, interleaved."""
    torch.manual_seed(0)
    vq = module.VectorQuantize(dim=STEP["dim"], codebook_size=STEP["codebook_size"]).to(device)
    encoder = torch.nn.Linear(STEP["dim"], STEP["dim"]).to(device)  # upstream: what the rotated gradient trains
    optimizer = torch.optim.Adam([*encoder.parameters(), *vq.parameters()], lr=1e-3)  # the codebook is EMA, no parameter
    x = torch.randn(STEP["batch"], STEP["tokens"], STEP["dim"], device=device)
    original = module.rotate_to

    def train(method: str) -> None:
        module.rotate_to = functions[method]
        try:
            out, _, loss = vq(encoder(x))
            (out.square().mean() + loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            module.rotate_to = original

    for method in functions:
        train(method)  # warm-up
    timers = {("step", method): timeit.Timer(lambda m=method: train(m)) for method in functions}
    samples, _ = time_interleaved(timers, [("step",)], list(functions), device, config, step)
    rows = []
    for method in functions:
        ns = samples[("step", method)]
        if device == "cuda":
            allocated, peak = cuda_allocations(lambda m=method: train(m))
        else:
            allocated, peak = cpu_allocations(profiled(lambda m=method: train(m), device))
        rows.append({"method": method, "median_ns": quartiles(ns)[1], "peak_bytes": peak,
                     "ratio_to_library": paired_ratio(ns, samples[("step", LIBRARY)]), "samples_ns": ns})  # fmt: skip
    return rows
