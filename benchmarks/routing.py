"""The routing section: gradient routing's mask, ``bridge(x, mask)`` against the authors' idiom.

``mask * x + (1 - mask) * x.detach()`` (Cloud et al. 2024; ``idiom`` in
examples/gradient_routing.py) against ``bridge(x, mask)``, at two shapes: the example's
(its (128, 32) float32 encoding, a 0/1 mask per example from its label) and a transformer's
activation ((8, 2048, 4096) bfloat16, a 0/1 mask per example over its features, (8, 1, 4096),
broadcast over the tokens). Per call, the forward and the forward + backward (interleaved, as
every section times), the bytes, ops and kernels of one forward, and the peak bytes of one
forward + backward. Rows only; report.py formats them and checks the bars.
"""

from __future__ import annotations

import timeit

import torch

import gradbridge_ext
from measure import Config, Step, call_cost, cpu_allocations, cuda_allocations, paired_ratio, profiled, quartiles
from measure import synchronize, time_interleaved

# examples/ is on sys.path (training.py puts it there): the example's shape and mask are defined once.
import training  # noqa: F401  (for its sys.path entry)
from gradient_routing import BATCH, LATENT, routing_mask  # noqa: E402

IDIOM = "idiom"
OURS = "bridge(x, mask)"
# The statements timeit runs, so neither pays for a wrapper the other does not; the idiom is
# the example's ``idiom``, written out.
STMTS = {IDIOM: "mask * x + (1 - mask) * x.detach()", OURS: "bridge(x, mask)"}
PHASES = {"forward": "{}", "forward + backward": "backward({}, g)"}
# name -> (x's shape, the mask's shape, dtype)
SHAPES = {
    "example": ((BATCH, LATENT), (BATCH, LATENT), torch.float32),
    "transformer": ((8, 2048, 4096), (8, 1, 4096), torch.bfloat16),
}


def shape_label(name: str) -> str:
    """'example (128, 32) float32, mask (128, 32)': what a row measured, for the tables."""
    shape, mask_shape, dtype = SHAPES[name]
    return f"{name} {tuple(shape)} {str(dtype).removeprefix('torch.')}, mask {tuple(mask_shape)}"


def inputs(name: str, device: str) -> dict:
    """x (a leaf that requires grad), its mask (0/1, per example), and g, the gradient backward is given."""
    shape, mask_shape, dtype = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (shape[0],), generator=generator)
    if name == "example":
        mask = routing_mask(labels)  # the example's own: its group's half of the encoding
    else:  # the same rule over a transformer's features: the first or second half, by label
        mask = torch.zeros(mask_shape)
        mask[labels < 5, ..., : mask_shape[-1] // 2] = 1.0
        mask[labels >= 5, ..., mask_shape[-1] // 2 :] = 1.0
    x = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
    return {"x": x, "mask": mask.to(device, dtype), "g": torch.ones_like(x)}


def bench_routing(device: str, config: Config, step: Step) -> dict:
    """Per call (forward; forward + backward), one forward's cost, and one forward + backward's peak, per shape."""
    timers, forward, peaks = {}, [], []
    for name in SHAPES:
        namespace = {"bridge": gradbridge_ext.bridge, "backward": torch.autograd.backward, **inputs(name, device)}
        for method, stmt in STMTS.items():
            for phase, form in PHASES.items():
                # x.grad is made by the first backward, then accumulated into in place.
                timers[(name, phase, method)] = timeit.Timer(form.format(stmt), globals=namespace)
            fn = eval(f"lambda: {stmt}", namespace)
            fn()  # warm-up, so no first-call allocation lands in the measurement
            forward.append({"shape": name, "method": method, **call_cost(fn, device)})
            both = eval(f"lambda: backward({stmt}, g)", namespace)
            both()
            if device == "cuda":
                allocated, peak = cuda_allocations(both)
            else:
                allocated, peak = cpu_allocations(profiled(both, device))
            peaks.append({"shape": name, "method": method, "allocated_bytes": allocated, "peak_bytes": peak})
        synchronize(device)
    groups = [(name, phase) for name in SHAPES for phase in PHASES]
    samples, numbers = time_interleaved(timers, groups, list(STMTS), device, config, step)
    per_call = []
    for (name, phase, method), ns in samples.items():
        q1, median, q3 = quartiles(ns)
        per_call.append({
            "shape": name, "phase": phase, "method": method, "median_ns": median, "q1_ns": q1, "q3_ns": q3,
            "ratio_to_idiom": paired_ratio(ns, samples[(name, phase, IDIOM)]),
            "calls_per_repeat": numbers[(name, phase, method)], "samples_ns": ns,
        })  # fmt: skip
    shapes = {name: shape_label(name) for name in SHAPES}
    return {"shapes": shapes, "per_call": per_call, "forward": forward, "forward_backward_peak": peaks}
