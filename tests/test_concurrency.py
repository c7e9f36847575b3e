"""bridge and straight_through from many threads at once, and across CUDA streams, behave as they do alone."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import gradbridge_ext
from gradbridge_ext import bridge
from helpers import SETTINGS, SHARES_VERSION, metadata, ternary
from st_settings import ST_GRAD_SCALE, ST_SETTINGS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

THREADS = 8
STEPS = 30


def run_in_threads(work, count: int = THREADS) -> list:
    """work(index, barrier) in `count` threads; the barrier makes them start together."""
    barrier = threading.Barrier(count, timeout=60)
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: work(i, barrier), range(count)))


def cut_for(index: int):
    """Thread `index`'s bridge: a cut, an attach, or a reversal whose scale is the thread's own."""
    kind = index % 3
    if kind == 0:
        return bridge
    if kind == 1:
        return lambda b: bridge(b, attach=True)
    return lambda b: bridge(b, -(index + 1) / THREADS)


def train(index: int, barrier: threading.Barrier | None = None) -> dict[str, torch.Tensor]:
    """A -> B -> C trained on loss_b + loss_c, C fed through thread `index`'s bridge."""
    # A generator per index, not the global seed, which threads share.
    generator = torch.Generator().manual_seed(index)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / 4)
    x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    a, b_layer, c_layer = model
    cut = cut_for(index)
    if barrier is not None:
        barrier.wait()
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        b = b_layer(a(x))
        c = c_layer(cut(b))
        (b.pow(2).mean() + (c - y).pow(2).mean()).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(p.grad, alpha=0.1)
    named = dict(model.named_parameters())
    return {**{n: p.detach().clone() for n, p in named.items()}, **{f"{n}.grad": p.grad for n, p in named.items()}}


def assert_threads_match_one_thread(train_one: Callable[[int], dict]) -> None:
    """THREADS runs of ``train_one`` at once give, bitwise, what each gives alone."""
    serial = [train_one(i) for i in range(THREADS)]
    threaded = run_in_threads(train_one)
    for index, (alone, together) in enumerate(zip(serial, threaded)):
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=0, msg=f"thread {index}: {name}")


def test_threads_training_at_once_match_one_thread() -> None:
    # Bitwise: every tensor is far below ATen's intra-op grain size (32768
    # elements) and too small for MKL to split a matmul, so each op runs whole
    # on its calling thread, in one order, whichever thread calls it and
    # however many run at once; no set_num_threads needed.
    assert_threads_match_one_thread(train)


def straight_through_for(index: int):
    """Thread `index`'s straight_through(w, q): the fast path, a scale of its own, or a mask of its own."""
    kind = index % 3
    if kind == 0:
        return gradbridge_ext.straight_through
    if kind == 1:
        return lambda w, q: gradbridge_ext.straight_through(w, q, -(index + 1) / THREADS)
    return lambda w, q: gradbridge_ext.straight_through(w, q, torch.arange(16.0) / (index + 1))


def train_ternary(index: int, barrier: threading.Barrier | None = None) -> dict[str, torch.Tensor]:
    """Two BitNet-style layers trained through thread `index`'s straight_through on their weights."""
    generator = torch.Generator().manual_seed(index)
    weights = [(torch.randn(16, 16, generator=generator) / 4).requires_grad_() for _ in range(2)]
    x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    quantize = straight_through_for(index)
    if barrier is not None:
        barrier.wait()
    for _ in range(STEPS):
        for w in weights:
            w.grad = None
        h = x
        for w in weights:
            h = torch.relu(h @ quantize(w, ternary(w.detach())).t())
        (h - y).pow(2).mean().backward()
        with torch.no_grad():
            for w in weights:
                w.sub_(w.grad, alpha=0.1)
    return {**{f"w{i}": w.detach().clone() for i, w in enumerate(weights)}, **{f"w{i}.grad": w.grad for i, w in enumerate(weights)}}


def test_threads_training_through_straight_through_at_once_match_one_thread() -> None:
    # Bitwise, for the reason test_threads_training_at_once_match_one_thread gives.
    assert_threads_match_one_thread(train_ternary)


# The forms bridging one shared tensor; strict() is entered once around the
# threads (toggling it from threads is not supported), so its row is the plain cut.
SHARED = {name: SETTINGS[name] for name in ("cut", "torch.ops cut", "reversal", "attach")} | {"strict cut": bridge}
ROUNDS = 2_000
OPS_PER_ROUND = 4  # unsqueeze_, resize_, as_strided_, add_: each bumps the result's version


@pytest.mark.parametrize("setting", SHARED)
def test_threads_bridging_one_tensor_never_change_its_metadata(setting: str) -> None:
    t = torch.zeros(THREADS, 16)  # row i belongs to thread i
    before = metadata(t), t.data_ptr()
    make = SHARED[setting]

    def work(index: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        for _ in range(ROUNDS):
            result = make(t)
            result.unsqueeze_(0)
            result.resize_(3, 5)  # a shrink: t's storage is untouched
            result.as_strided_((16,), (1,), 16 * index)
            result.add_(1)  # writes through to t's row `index` only

    with gradbridge_ext.strict(setting == "strict cut"):
        run_in_threads(work)
    assert (metadata(t), t.data_ptr()) == before
    assert torch.equal(t, torch.full((THREADS, 16), float(ROUNDS)))
    shares_version = setting in SHARES_VERSION
    # The counter is atomic: every bump of every thread is counted, or none is.
    assert t._version == (THREADS * ROUNDS * OPS_PER_ROUND if shares_version else 0)


def side_stream_reads_then_reallocates(make, record: bool) -> tuple[bool, torch.Tensor]:
    """Read bridge(t) on a busy side stream, drop t, allocate its size again.

    Returns whether the new tensor got t's memory back, and what the side stream read.
    """
    n = 1 << 20
    w = torch.tensor(1.5, device="cuda", requires_grad=True)
    t = w.expand(n).clone()  # in a graph that holds w, not t's memory
    old = t.data_ptr()
    result = make(t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # t's values are written before the side stream reads them
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of ms: everything below is issued before the read
        out = result * 2
    if record:
        result.record_stream(side)
    del t, result
    new = torch.empty(n, device="cuda")
    new.fill_(-1.0)  # on the default stream: would overwrite t's memory before the side stream reads it
    reused = new.data_ptr() == old
    torch.cuda.synchronize()
    return reused, out


@cuda
@pytest.mark.parametrize("setting", ["cut", "reversal"])
def test_record_stream_keeps_the_memory_until_the_side_stream_is_done(setting: str) -> None:
    if torch.cuda.get_allocator_backend() != "native" or os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        pytest.skip("the control needs the native caching allocator, which hands a freed block straight back")
    make = SHARED[setting]
    torch.cuda.synchronize()
    reused, out = side_stream_reads_then_reallocates(make, record=True)
    assert not reused
    assert torch.equal(out, torch.full_like(out, 3.0))
    # The control: without record_stream the allocator hands the same memory
    # straight back to the default stream, so the check above can fail.
    reused, _ = side_stream_reads_then_reallocates(make, record=False)
    assert reused


@pytest.mark.parametrize("setting", ST_SETTINGS)
def test_threads_aliasing_one_q_never_change_its_metadata(setting: str) -> None:
    # x needs no grad, so each result is a plain alias of q (a recorded one
    # refuses in-place ops), which always shares q's version counter.
    q, x = torch.zeros(THREADS, 16), torch.zeros(THREADS, 16)
    before = metadata(q), q.data_ptr()
    make = ST_SETTINGS[setting]

    def work(index: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        for _ in range(ROUNDS):
            result = make(x, q)
            result.unsqueeze_(0)
            result.resize_(3, 5)  # a shrink: q's storage is untouched
            result.as_strided_((16,), (1,), 16 * index)
            result.add_(1)  # writes through to q's row `index` only

    run_in_threads(work)
    assert (metadata(q), q.data_ptr()) == before
    assert torch.equal(q, torch.full((THREADS, 16), float(ROUNDS)))
    # The counter is atomic: every bump of every thread is counted.
    assert q._version == THREADS * ROUNDS * OPS_PER_ROUND and x._version == 0


BACKWARDS = 500


@pytest.mark.parametrize("setting", ["straight_through", "grad_scale", "tensor grad_scale", "mask"])
def test_threads_running_backward_into_one_x_accumulate_every_gradient(setting: str) -> None:
    # Every thread sends its gradient into the same x.grad through results of one
    # q; the values are small integers times a power of two, so any order of the
    # additions gives the same sum: exactly what one thread running all the steps gives.
    make = ST_SETTINGS[setting]

    def run(threaded: bool) -> torch.Tensor:
        x, q = torch.zeros(4, 16, requires_grad=True), torch.ones(4, 16)

        def work(index: int, barrier: threading.Barrier | None = None) -> None:
            upstream = torch.full((4, 16), float(index + 1))
            if barrier is not None:
                barrier.wait()
            for _ in range(BACKWARDS):
                result = make(x, q)
                assert result.data_ptr() == q.data_ptr()
                (result * upstream).sum().backward()

        if threaded:
            run_in_threads(work)
        else:
            for index in range(THREADS):
                work(index)
        return x.grad

    together, alone = run(threaded=True), run(threaded=False)
    assert torch.equal(together, alone)
    assert torch.equal(alone, torch.full((4, 16), ST_GRAD_SCALE[setting] * BACKWARDS * THREADS * (THREADS + 1) / 2))
