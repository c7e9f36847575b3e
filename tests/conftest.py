import faulthandler
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from gradbridge_ext._extension import torch_at_least  # noqa: F401  (the one place a test asks which torch it runs on)

# The seed's A -> B -> C model is defined once, in examples/independent_layers.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

# CUDA cases are collected everywhere and skipped, visibly, where torch sees no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as the examples' scripts run: small tensors, and threads that spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


# The test device (tests/testdev), or why there is none: loaded by pytest_collection_modifyitems.
TEST_DEVICE: dict[str, str] = {}


# trylast: after -m and -k have deselected, so that a run none of whose tests uses it builds none.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # NB: torch's autograd engine makes its per-device queues at its first backward, for the
    # devices registered by then, and asserts on a device added later. Real plug-in backends
    # are imported first; the test device is loaded after collection, before any test runs.
    if TEST_DEVICE or not any("test_device" in getattr(item, "fixturenames", ()) for item in items):
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        TEST_DEVICE["skip"] = f"the test device is compiled here, and there is no C++ compiler ({compiler}) on PATH"
        return
    import testdev

    TEST_DEVICE["name"] = testdev.load(session.config._tmp_path_factory.mktemp("testdev"))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def test_device() -> str:
    """A device torch does not ship (tests/testdev): an out-of-tree backend over host memory, built once a session."""
    if "skip" in TEST_DEVICE:
        pytest.skip(TEST_DEVICE["skip"])
    return TEST_DEVICE["name"]


@pytest.fixture(params=["native", "fallback"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the native operator, then on the pure-Python fallback, which a process without a
    compiler gets (gradbridge_ext.NATIVE is False): swapped in wherever the package and the test look it up."""
    import gradbridge_ext

    if request.param == "native" and not gradbridge_ext.NATIVE:
        pytest.skip("this process has no native operator (tests/test_fallback.py runs the suite so)")
    if request.param == "fallback":
        marker = request.node.get_closest_marker("native_only")
        if marker is not None:
            pytest.skip(f"the fallback differs, as documented: {marker.args[0]}")
        if "torch.ops" in request.node.name:  # a case named so calls torch.ops.gradbridge
            pytest.skip("a case that names torch.ops calls the operator, which only the native build registers")
        from gradbridge_ext import _fallback, ops

        fallback = ops.entry_points(ops.Kernels(_fallback.bridge, _fallback.straight_through, _fallback.rotate_to, _fallback.set_strict))
        monkeypatch.setattr(ops, "NATIVE", False)
        for module in (gradbridge_ext, ops, request.module, sys.modules.get("helpers")):
            for name, function in fallback._asdict().items():
                if module is not None and hasattr(module, name):
                    monkeypatch.setattr(module, name, function)
        monkeypatch.setattr(gradbridge_ext, "NATIVE", False)
    return request.param



def tiered(names: str, cases: Iterable[tuple], fast: Callable[..., bool]) -> pytest.MarkDecorator:
    """``parametrize(names, cases)``, each case the fast tier does not need marked ``slow``.

    ``fast(*case)`` picks a covering subset: each value of each column at least once.
    """
    return pytest.mark.parametrize(names, [pytest.param(*case, marks=() if fast(*case) else pytest.mark.slow) for case in cases])


def requires_torch(version: str, why: str) -> pytest.MarkDecorator:
    """Skip, naming the reason, where the running torch is older than ``version``."""
    return pytest.mark.skipif(not torch_at_least(version), reason=f"needs torch {version}: {why}")


# --- several processes over gloo (tests/test_ddp.py, tests/test_dtensor.py) --------------

WORLD = 2
# A stuck collective must fail its test, not stall the suite: gloo gives up after
# COLLECTIVE_TIMEOUT; a rank still alive at RANK_DEADLINE_S prints its stack and
# exits; the parent stops waiting a minute later.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
RANK_DEADLINE_S = 180
# What a rank's body made that must outlive it (DDP models): see _rank_main.
KEEP_UNTIL_EXIT: list[object] = []


def _rank_main(rank: int, body: Callable[..., object], args: tuple, init: str, out: str) -> None:
    import torch.distributed as dist

    faulthandler.dump_traceback_later(RANK_DEADLINE_S, exit=True)
    torch.set_num_threads(1)  # the ranks share a 2-core CI machine
    # Loopback, whatever the host name resolves to on the machine running the tests.
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    status = 1
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
        torch.save(body(rank, *args), Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()
        status = 0
    except BaseException:  # noqa: BLE001 (printed here; the parent sees the exit status)
        traceback.print_exc()
    finally:
        # Leave without destructors, while KEEP_UNTIL_EXIT still holds DDP. On
        # torch 2.13 a rank can hang or abort freeing it: the Reducer's last
        # reference drops the gloo group under the GIL, and its dtor joins a
        # worker thread that is freeing an allreduce whose captured thread-local
        # state holds a Python object (the context every backward stashes), which
        # needs the GIL. Seen here: a hang in 1 of 28 runs of the DDP tests, and
        # an abort in 1 of 30 runs of plain DDP without gradbridge_ext.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def on_gloo_ranks(body: Callable[..., object], *args: object, out: Path) -> list:
    """``body(rank, *args)`` on WORLD CPU processes in one gloo group; what each returned."""
    import torch.multiprocessing as mp

    init = f"file://{out / 'rendezvous'}"
    ranks = mp.spawn(_rank_main, args=(body, args, init, str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + RANK_DEADLINE_S + 60
    while not ranks.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {RANK_DEADLINE_S + 60} s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
