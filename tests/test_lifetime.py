"""bridge(t) and straight_through(x, q) leak nothing: memory stays flat over a million calls, storages and saved
scales die with their last owner, no cycles.

The million-call and 10,000-step loops are the full tier's (slow); the fast tier
runs 100,000 calls of one setting of each operator, still enough to see a leak
of 8 bytes a call (test_the_measurement_sees_an_8_byte_leak_per_call).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import weakref

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import gradbridge_ext
from gradbridge_ext import bridge, straight_through
from helpers import SETTINGS, ternary
from st_settings import ST_SETTINGS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# A loop that frees what it makes leaves the memory in use where it was once
# warmed up: 0 bytes over a million calls here, by each count below. glibc's
# smallest heap chunk is 32 bytes, so leaking even one 8-byte malloc per call
# adds 32 bytes a call: 32 MB over 1,000,000 calls, 3.2 MB over the fast tier's
# 100,000, above the bound (test_the_measurement_sees_an_8_byte_leak_per_call shows it).
# The bound leaves 256 pages for the allocators' rounding (glibc trims and maps
# in steps of 128 KiB).
LEAK_BOUND = 1 << 20
WARMUP = 10_000
# The entry points that cost several microseconds a call run fewer calls.
CALLS = dict.fromkeys(["cut", "reversal", "attach", "strict cut"], 1_000_000) | dict.fromkeys(
    ["torch.ops cut", "torch.ops reversal", "BridgeFunction", "Bridge module"], 200_000
)
ST_CALLS = dict.fromkeys(["straight_through", "grad_scale", "grad_scale keyword", "zero grad_scale"], 1_000_000) | dict.fromkeys(
    ["tensor grad_scale", "mask", "torch.ops", "torch.ops tensor"], 200_000
)
# The fast tier's loop: one setting of each operator, each building a node a call.
FAST_CALLS = 100_000
FAST = {"bridge": ("reversal", SETTINGS), "straight_through": ("straight_through", ST_SETTINGS)}
PAGE = os.sysconf("SC_PAGE_SIZE")
LIBC = ctypes.CDLL(None)
LIBC.malloc.restype, LIBC.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
LIBC.free.argtypes = [ctypes.c_void_p]


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


if hasattr(LIBC, "mallinfo2"):  # glibc 2.33+
    LIBC.mallinfo2.restype = MallInfo2


def memory_in_use() -> dict[str, int]:
    """Bytes in use, counted three ways, each seeing what another can miss.

    resident: RSS, once malloc has handed its free pages back, so that memory
        earlier tests freed cannot hide a leak;
    malloc: bytes malloc handed out and did not get back; a leak raises it even
        where it refills freed memory that is still resident (fragments);
    python: Python's small-object blocks, 16 bytes at least, which live in
        arenas malloc does not see.
    """
    gc.collect()
    LIBC.malloc_trim(0)
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * PAGE
    info = LIBC.mallinfo2()
    return {"resident": resident, "malloc": info.uordblks + info.hblkhd, "python": 16 * sys.getallocatedblocks()}


def memory_growth(call, calls: int, warmup: int = WARMUP) -> int:
    """The most memory any count gained over `calls` calls, after a warm-up fills free lists and caches."""
    for _ in range(warmup):
        call()
    before = memory_in_use()
    for _ in range(calls):
        call()
    after = memory_in_use()
    return max(after[count] - before[count] for count in before)


def source(device: str = "cpu") -> torch.Tensor:
    """A non-leaf in a graph, so the attached settings build a node each call."""
    return torch.randn(64, device=device, requires_grad=True) * 2


linux_only = pytest.mark.skipif(
    not (os.path.exists("/proc/self/statm") and hasattr(LIBC, "mallinfo2")), reason="reads Linux's and glibc's counters"
)


def reference_counts(t: torch.Tensor) -> tuple[int, int, int]:
    """t's Python references, TensorImpl owners and storage owners: a leaked reference costs no memory but keeps t alive."""
    return sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_a_million_calls_leave_memory_flat(setting: str) -> None:
    t, make = source(), SETTINGS[setting]
    if setting == "strict cut":
        make = bridge  # strict() entered once below: its context manager would dominate the loop
    counts = sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    with gradbridge_ext.strict(setting == "strict cut"):
        growth = memory_growth(lambda: make(t), CALLS[setting])
    assert growth < LEAK_BOUND, f"{growth / CALLS[setting]:.1f} bytes a call"
    # A leaked reference costs no memory here but keeps t alive forever.
    assert (sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)) == counts


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_a_million_straight_through_calls_leave_memory_flat(setting: str) -> None:
    # x fixed and requiring grad, so that every call builds a node; q fixed.
    x, q, make = torch.randn(64, requires_grad=True), torch.randn(64), ST_SETTINGS[setting]
    counts = reference_counts(x), reference_counts(q)
    growth = memory_growth(lambda: make(x, q), ST_CALLS[setting])
    assert growth < LEAK_BOUND, f"{growth / ST_CALLS[setting]:.1f} bytes a call"
    assert (reference_counts(x), reference_counts(q)) == counts


@linux_only
@pytest.mark.parametrize("op", FAST)
def test_100_000_calls_leave_memory_flat(op: str) -> None:
    # The fast tier's version of the two tests above, for one setting of each operator.
    setting, table = FAST[op]
    x, q = source(), torch.randn(64)
    args = (x,) if op == "bridge" else (x, q)
    counts = [reference_counts(t) for t in args]
    growth = memory_growth(lambda: table[setting](*args), FAST_CALLS)
    assert growth < LEAK_BOUND, f"{growth / FAST_CALLS:.1f} bytes a call"
    assert [reference_counts(t) for t in args] == counts


def training_step(setting: str, x: torch.Tensor, w: torch.Tensor) -> None:
    """B's output feeds C through the bridge; the gradients accumulate in place into x.grad and w.grad."""
    b = x * 2
    c = SETTINGS[setting](b) * w
    (b.sum() + c.sum()).backward()


def straight_through_step(setting: str, x: torch.Tensor, w: torch.Tensor) -> None:
    """C multiplies by x's ternary form through the STE; the gradients accumulate in place into x.grad and w.grad."""
    c = ST_SETTINGS[setting](x, ternary(x.detach())) * w
    c.sum().backward()


STEPS = {"reversal": training_step, "attach": training_step, "straight_through": straight_through_step,
         "mask": straight_through_step}  # fmt: skip


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("setting", STEPS)
def test_forward_and_backward_loops_leave_memory_flat(setting: str) -> None:
    # ~150 us a step, so 10,000 steps: the bound catches 105 bytes a step, less
    # than any leaked tensor (a TensorImpl alone) or autograd node.
    x, w = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    growth = memory_growth(lambda: STEPS[setting](setting, x, w), 10_000, warmup=1_000)
    assert growth < LEAK_BOUND, f"{growth / 10_000:.1f} bytes a step"


@linux_only
def test_the_measurement_sees_kept_results() -> None:
    # The control: keeping each result (a TensorImpl and its Python object) for
    # 100,000 calls must break the bound, or the tests above prove nothing.
    t, kept = source(), []
    assert memory_growth(lambda: kept.append(bridge(t)), 100_000) > LEAK_BOUND


@linux_only
def test_the_measurement_sees_an_8_byte_leak_per_call() -> None:
    calls = min(FAST_CALLS, *CALLS.values(), *ST_CALLS.values())  # the fewest calls any test above makes
    # Where the leaked pointers go, touched first so that only the leak grows RSS.
    leaked = (ctypes.c_void_p * (WARMUP + calls))()
    ctypes.memset(leaked, 0, ctypes.sizeof(leaked))
    slots = iter(range(WARMUP + calls))
    t = source()

    def leaky_cut() -> torch.Tensor:
        leaked[next(slots)] = LIBC.malloc(8)
        return bridge(t)

    try:
        assert memory_growth(leaky_cut, calls) > LEAK_BOUND
    finally:
        for pointer in leaked:
            LIBC.free(pointer)


@cuda
@pytest.mark.slow
@pytest.mark.parametrize("setting", ["cut", "reversal", "attach", "strict cut", "straight_through", "grad_scale"])
def test_cuda_memory_stays_at_baseline_over_a_million_calls(setting: str) -> None:
    t, q = source("cuda"), torch.randn(64, device="cuda")
    make = SETTINGS[setting] if setting in SETTINGS else lambda t: ST_SETTINGS[setting](t, q)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(1_000_000):
        make(t)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert torch.cuda.max_memory_allocated() == baseline  # no call allocated anything, even briefly


@cuda
@pytest.mark.slow
@pytest.mark.parametrize("setting", ["cut", "reversal", "attach", "straight_through", "mask"])
def test_cuda_memory_returns_to_baseline_after_training_steps(setting: str) -> None:
    x, w = torch.randn(1024, device="cuda", requires_grad=True), torch.randn(1024, device="cuda", requires_grad=True)
    step = straight_through_step if setting in ST_SETTINGS else training_step
    step(setting, x, w)  # allocates x.grad and w.grad, which later steps add to in place
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for _ in range(10_000):
        step(setting, x, w)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


@pytest.mark.parametrize("first", ["t", "result"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_storage_is_freed_with_its_last_alias(setting: str, first: str, device: str) -> None:
    objects = {"t": source(device)}
    storage = StorageWeakRef(objects["t"].untyped_storage())
    objects["result"] = SETTINGS[setting](objects["t"])
    last = "result" if first == "t" else "t"
    del objects[first]
    assert not storage.expired()
    assert objects[last].isfinite().all()  # the survivor still reads valid memory
    del objects[last]
    assert storage.expired()


@pytest.mark.parametrize("first", ["q", "result"])
@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_qs_storage_is_freed_with_its_last_alias(setting: str, first: str, device: str) -> None:
    x = torch.randn(64, device=device, requires_grad=True)
    objects = {"q": source(device).detach()}
    storage = StorageWeakRef(objects["q"].untyped_storage())
    objects["result"] = ST_SETTINGS[setting](x, objects["q"])
    last = "result" if first == "q" else "q"
    del objects[first]
    assert not storage.expired()
    assert objects[last].isfinite().all()  # the survivor still reads valid memory
    del objects[last]
    assert storage.expired()  # x, which gets the gradient, keeps nothing of q's alive


SCALES = {"0-dim": lambda device: torch.tensor(-0.5, device=device), "mask": lambda device: torch.rand(64, device=device)}
OPS = {"bridge": lambda t, scale: bridge(t, scale), "straight_through": lambda t, scale: straight_through(t, t.detach().round(), scale)}


@pytest.mark.parametrize("backward", [True, False], ids=["backward", "graph dropped unused"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("op", OPS)
def test_a_tensor_grad_scale_dies_with_the_graph(op: str, scale: str, backward: bool, device: str) -> None:
    # The node saves the scale for the backward (an in-place change between steps
    # is a schedule); it may keep it only as long as the graph is alive.
    t = torch.randn(64, device=device, requires_grad=True)
    grad_scale = SCALES[scale](device)
    expected = grad_scale.expand(t.shape).clone()  # the gradient to t, per unit of incoming gradient
    scale_storage, t_storage = StorageWeakRef(grad_scale.untyped_storage()), StorageWeakRef(t.untyped_storage())
    result = OPS[op](t, grad_scale)
    del grad_scale
    assert not scale_storage.expired()  # saved: the graph still needs it
    if backward:
        result.sum().backward()
        assert torch.equal(t.grad, expected)
    del result
    assert scale_storage.expired()
    del t
    assert t_storage.expired()


class Hook:
    """A weakly referenceable hook: it dies with the autograd node that holds it."""

    def __call__(self, *args: object) -> None:
        pass


def leftovers_without_gc(scenario, *args, storage_of: str = "t") -> tuple[list[str], bool, int]:
    """Run scenario with the cyclic collector off; what reference counting alone did not free.

    Returns the names of the objects still alive, whether the storage of the
    object `storage_of` names (the result's source) is still alive, and how many
    of torch's objects gc.collect() then found unreachable. NB: only torch's: the
    collector also finds what other threads made meanwhile (pytest-xdist's
    execnet thread does), which is no cycle of the scenario's.
    """
    scenario(*args)  # first calls may leave lazily built state (autograd, caches) for gc
    # Garbage made before the scenario is not its own; freeing some (finalizers, weakref callbacks)
    # makes more, so collect until a pass finds none.
    while gc.collect():
        pass
    gc.disable()
    try:
        objects = scenario(*args)
        refs = {name: weakref.ref(o) for name, o in objects.items()}
        storage = StorageWeakRef(objects[storage_of].untyped_storage())
        hook = Hook()
        if objects["result"].grad_fn is not None:
            objects["result"].grad_fn.register_hook(hook)
            refs["result.grad_fn"] = weakref.ref(hook)
        del objects, hook
        alive = [name for name, ref in refs.items() if ref() is not None]
        storage_alive = not storage.expired()
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage, to be looked at
        try:
            gc.collect()
            found = sum(type(o).__module__.split(".")[0] == "torch" or isinstance(o, torch.Tensor) for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    return alive, storage_alive, found


def bridged_model(make, backward: bool, device: str) -> dict[str, torch.Tensor]:
    x, w = torch.randn(8, device=device, requires_grad=True), torch.randn(8, device=device, requires_grad=True)
    t = x * 2
    result = make(t)
    loss = t.sum() + (result * w).sum()
    if backward:
        loss.backward()
    return {"x": x, "w": w, "t": t, "result": result, "loss": loss}


@pytest.mark.parametrize("backward", [True, False], ids=["backward", "graph dropped unused"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_reference_counting_alone_frees_everything(setting: str, backward: bool, device: str) -> None:
    assert leftovers_without_gc(bridged_model, SETTINGS[setting], backward, device) == ([], False, 0)


def straight_through_model(make, backward: bool, device: str) -> dict[str, torch.Tensor]:
    """A BitNet-style layer: x's ternary form q gives the values, x gets the gradient."""
    x, w = torch.randn(8, device=device, requires_grad=True), torch.randn(8, device=device, requires_grad=True)
    t = x * 2
    q = ternary(t.detach())
    result = make(t, q)
    loss = t.sum() + (result * w).sum()
    if backward:
        loss.backward()
    return {"x": x, "w": w, "t": t, "q": q, "result": result, "loss": loss}


@pytest.mark.parametrize("backward", [True, False], ids=["backward", "graph dropped unused"])
@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_reference_counting_alone_frees_everything_straight_through(setting: str, backward: bool, device: str) -> None:
    found = leftovers_without_gc(straight_through_model, ST_SETTINGS[setting], backward, device, storage_of="q")
    assert found == ([], False, 0)


class LeakyReversal(torch.autograd.Function):
    """The control: keeping the output on ctx is the classic cycle, output -> grad_fn (ctx) -> output."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.output = bridge(t)
        return ctx.output

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def test_the_check_sees_a_reference_cycle() -> None:
    alive, storage_alive, found = leftovers_without_gc(bridged_model, LeakyReversal.apply, True, "cpu")
    assert "result" in alive and "result.grad_fn" in alive
    assert storage_alive
    assert found > 0  # ... and only the cyclic collector frees them
