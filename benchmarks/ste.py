"""The straight-through section: straight_through against the trick and its other spellings.

Per call (time, and one forward's bytes, ops and kernels), a BitNet-style MLP's training
step (time, peak memory) in fp32 and bf16, and how often each spelling's values differ
from q. Rows only; report.py formats them and checks the bars.
"""

from __future__ import annotations

import random
import time
import timeit
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import gradbridge_ext
from measure import Config, Step, call_cost, cpu_allocations, make_input, paired_ratio, profiled, quartiles, rows_per_size
from measure import synchronize, time_interleaved

# examples/ is on sys.path (training.py puts it there): the quantizers and model are defined once.
import training  # noqa: F401  (for its sys.path entry)
from straight_through import BitMLP, activation_quant, trick, weight_quant  # noqa: E402

REFERENCE = "bridge(t, -1.0)"  # the bar's reference: our other op that records a node
OURS = "straight_through"
TRICK = "trick"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the training step's
COMPILED_DTYPES = {"float32": torch.float32}  # the compiled training step's (see bench_step)
EXACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class STEFunction(torch.autograd.Function):
    """The straight-through estimator as users write it in Python: q's values, x's gradient."""

    @staticmethod
    def forward(x: Tensor, q: Tensor) -> Tensor:
        return q.view_as(q)  # a new tensor (a view), as users write it, not q itself

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[no-untyped-def]
        return grad, None


def methods(note: Callable[[str], None]) -> tuple[dict[str, str], dict]:
    """Each spelling's statement on x (requires grad) and q, and the names they use."""
    stmts = {TRICK: "x + (q - x).detach()", "autograd.Function": "STEFunction.apply(x, q)"}
    namespace: dict = {"STEFunction": STEFunction, "st": gradbridge_ext.straight_through,
                       "bridge": gradbridge_ext.bridge}  # fmt: skip
    try:
        from vector_quantize_pytorch.vector_quantize_pytorch import straight_through as vq_st

        namespace["vq_st"] = vq_st
        stmts["vector-quantize-pytorch"] = "vq_st(x, q)"
    except ImportError:
        note("vector-quantize-pytorch is not installed: its straight_through left out")
    stmts[OURS] = "st(x, q)"
    stmts[REFERENCE] = "bridge(x, -1.0)"
    return stmts, namespace


def bench_per_call(device: str, sizes: list[int], config: Config, step: Step, note: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Time per call, paired with bridge(t, -1.0), and one forward's cost, at every size."""
    stmts, names = methods(note)
    timers, costs = {}, []
    for nbytes in sizes:
        namespace = dict(names, x=make_input(nbytes, True, device), q=make_input(nbytes, False, device))
        for name, stmt in stmts.items():
            timers[(nbytes, name)] = timeit.Timer(stmt, globals=namespace)
            fn = eval(f"lambda: {stmt}", namespace)
            fn()  # warm-up, so no first-call allocation lands in the measurement
            costs.append({"size_bytes": nbytes, "method": name, **call_cost(fn, device)})
    samples, numbers = time_interleaved(timers, [(s,) for s in sizes], list(stmts), device, config, step)
    return rows_per_size(samples, numbers, REFERENCE, "ratio_to_bridge"), costs


def bench_step(device: str, config: Config, step: Step, compiled: bool = False) -> list[dict]:
    """A BitNet-style MLP (config.depth BitLinear layers of config.width): one SGD step, trick vs ours.

    compiled: both models under torch.compile (inductor, fullgraph), where the
    trick's two kernels fuse and our result is a copy that inductor drops
    (docs/stack.md); in float32 only, since a CPU without bf16 arithmetic
    measures its matmuls, not the estimator.
    """
    rows = []
    stes = {TRICK: trick, OURS: gradbridge_ext.straight_through}
    dtypes = COMPILED_DTYPES if compiled else DTYPES
    for d, (dtype_name, dtype) in enumerate(dtypes.items()):
        torch.manual_seed(0)
        x = torch.randn(config.batch, config.width, device=device, dtype=dtype)
        y = torch.randint(config.width, (config.batch,), device=device)
        models = {}
        for name, ste in stes.items():
            torch.manual_seed(0)  # the same weights for both
            models[name] = BitMLP(ste, (config.width,) * (config.depth + 1)).to(device, dtype)
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-2) for name, m in models.items()}
        forwards = {name: torch.compile(m, fullgraph=True) if compiled else m for name, m in models.items()}

        def train_step(name: str) -> float:
            loss = F.cross_entropy(forwards[name](x), y)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)  # every step starts from parameters only
            return loss.item()

        times: dict[str, list[float]] = {name: [] for name in stes}
        peaks, losses = dict.fromkeys(stes, 0), dict.fromkeys(stes, 0.0)
        for name in stes:
            train_step(name)  # warm-up
        for i in range(config.train_steps):
            for name in random.sample(list(stes), len(stes)):
                synchronize(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                losses[name] = train_step(name)
                times[name].append((time.perf_counter() - start) * 1e3)
                if device == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - before)
            step(d * config.train_steps + i + 1, len(dtypes) * config.train_steps)
        if device == "cpu":  # as training.py: the CPU allocator's peak during one profiled step
            for name in stes:
                peaks[name] = cpu_allocations(profiled(lambda: train_step(name), device))[1]
        for name in stes:
            q1, median, q3 = quartiles(times[name])
            rows.append({
                "dtype": dtype_name, "method": name, "step_ms_median": median, "step_ms_q1": q1,
                "step_ms_q3": q3, "ratio_to_trick": paired_ratio(times[name], times[TRICK]),
                "peak_bytes": peaks[name], "peak_ratio_to_trick": peaks[name] / max(1, peaks[TRICK]),
                "final_loss": losses[name], "step_ms_samples": times[name],
            })  # fmt: skip
    return rows


def bench_compiled_pair(device: str, sizes: list[int], config: Config, step: Step) -> list[dict]:
    """Compiled, the estimate returned beside q, as a VQ layer returns (z_st, z_q): forward time per call.

    There our compiled result is a copy of q that inductor keeps (docs/stack.md),
    where the trick computes x + (q - x); "q, q" is the floor: the pair with no
    estimator at all. q is made inside the compiled function, as a quantizer makes it;
    each compiled for dynamic shapes, so that one graph serves every size.
    """
    pairs = {
        TRICK: lambda x: (lambda q: (trick(x, q), q))(x.detach().round()),
        OURS: lambda x: (lambda q: (gradbridge_ext.straight_through(x, q), q))(x.detach().round()),
        "q, q": lambda x: (lambda q: (q, q))(x.detach().round()),
    }
    timers = {}
    for nbytes in sizes:
        x = make_input(nbytes, True, device)
        for name, pair in pairs.items():
            compiled = torch.compile(pair, fullgraph=True, dynamic=True)  # one graph for every size
            compiled(x)  # compiles here, not in a timed block
            timers[(nbytes, name)] = timeit.Timer(lambda compiled=compiled, x=x: compiled(x))
    samples, numbers = time_interleaved(timers, [(s,) for s in sizes], list(pairs), device, config, step)
    return rows_per_size(samples, numbers, TRICK, "ratio_to_trick")


def quantized_pairs(device: str, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
    """(x, q) for each quantizer: the tensor the gradient goes to, and the values forward should use."""
    g = torch.Generator(device).manual_seed(0)
    w = torch.randn(512, 512, device=device, generator=g).mul(0.02).to(dtype)  # LLM-style init
    a = torch.randn(256, 512, device=device, generator=g).to(dtype)
    z = torch.randn(4096, 8, device=device, generator=g).to(dtype)
    codebook = torch.randn(64, 8, device=device, generator=g).to(dtype)
    logits = torch.randn(4096, 16, device=device, generator=g).to(dtype)
    # F.gumbel_softmax(hard=True)'s computation, with its noise drawn from our generator.
    gumbels = -torch.empty_like(logits).exponential_(generator=g).log()
    y_soft = (logits + gumbels).softmax(-1)
    y_hard = F.one_hot(y_soft.argmax(-1), y_soft.shape[-1]).to(dtype)
    return {
        "ternary weights": (w, weight_quant(w)),
        "int8 activations": (a, activation_quant(a)),
        "VQ lookup": (z, codebook[(z.unsqueeze(-2) - codebook).square().sum(-1).argmin(-1)]),
        "hard gumbel one-hot": (y_soft, y_hard),
    }


def bench_exactness(device: str) -> list[dict]:
    """Share of the result's elements that differ from q, per dtype, quantizer and spelling."""
    rows = []
    for dtype_name, dtype in EXACT_DTYPES.items():
        for quantizer, (x, q) in quantized_pairs(device, dtype).items():
            x = x.requires_grad_()
            spellings = {
                # torch's gumbel_softmax spells the trick y_hard - y_soft.detach() + y_soft.
                TRICK: q - x.detach() + x if quantizer == "hard gumbel one-hot" else trick(x, q),
                OURS: gradbridge_ext.straight_through(x, q),
            }
            for name, result in spellings.items():
                rows.append({"dtype": dtype_name, "quantizer": quantizer, "method": name,
                             "share_differ": (result != q).float().mean().item()})  # fmt: skip
    return rows


def bench_straight_through(device: str, sizes: list[int], config: Config, step: Step, note: Callable[[str], None]) -> dict:
    per_call, forward = bench_per_call(device, sizes, config, step, note)
    return {"per_call": per_call, "forward": forward, "step": bench_step(device, config, step),
            "compiled_step": bench_step(device, config, step, compiled=True),
            "compiled_pair": bench_compiled_pair(device, sizes, config, step),
            "exactness": bench_exactness(device)}  # fmt: skip
