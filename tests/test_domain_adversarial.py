"""Checks for examples/domain_adversarial.py: Bridge as a DANN's gradient reversal layer.

Thresholds were measured on CPU (torch 2.13, one thread), 600 steps, seeds 0-5: reversed,
source accuracy 0.99-1.00 and the domain head's final accuracy 0.48-0.58; the control
(grad_scale 0), domain accuracy 0.97-0.98. The tests use seed 0.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "examples" / "domain_adversarial.py"
STEPS = 600  # the fewest at which the domain head settles near chance for every seed tried
PYPI = ("pytorch-revgrad", "torch-gradient-reversal")
PYPI_MODULES = {"pytorch-revgrad": "pytorch_revgrad", "torch-gradient-reversal": "gradient_reversal"}


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("domain_adversarial", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


ex = _load()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # As the example's main() does: tiny tensors, and threads that spin on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _trained(reversed_: bool) -> ex.History:
    return ex.train(STEPS, reversal="bridge" if reversed_ else ex.NOT_REVERSED)


def test_lambda_schedule() -> None:
    assert ex.grl_lambda(0.0) == 0.0
    assert ex.grl_lambda(0.5) == pytest.approx(0.98661, abs=1e-5)
    assert 0.9999 < ex.grl_lambda(1.0) < 1.0


def test_label_head_learns_the_source() -> None:
    history = _trained(True)
    assert history.source_acc[-1] >= 0.95, history.source_acc  # chance is 0.5


def test_reversal_pushes_the_domain_head_to_chance() -> None:
    reversed_, control = _trained(True), _trained(False)
    # Without reversal the domain head separates the domains (the test can fail) ...
    assert control.domain_acc[-1] >= 0.95, control.domain_acc
    # ... and with it, the features hide the domain from the same head.
    assert abs(reversed_.domain_acc[-1] - 0.5) <= 0.12, reversed_.domain_acc
    assert reversed_.lam[-1] > 0.99


@pytest.mark.parametrize("name", PYPI)
def test_pypi_reversal_layers_follow_the_same_trajectory(name: str) -> None:
    pytest.importorskip(PYPI_MODULES[name])
    steps = 60
    ours, theirs = ex.train(steps, reversal="bridge"), ex.train(steps, reversal=name)
    # Each multiplies the gradient by the same float32 -lambda: bitwise the same steps.
    assert theirs.losses == ours.losses
    assert ours.state.keys() == theirs.state.keys()
    for key, value in ours.state.items():
        assert torch.equal(theirs.state[key], value), key
    # ... and the reversal mattered: the control's trajectory is another one.
    assert ex.train(steps, reversal=ex.NOT_REVERSED).losses != ours.losses


def test_compiled_training_follows_lambda_with_at_most_one_recompile() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    steps = 30
    compiled = ex.train(steps, compile=True, backend=counter)
    eager = ex.train(steps)
    # The first graph, then at most one more once grad_scale stops being one constant;
    # every later step brings a new lambda and must reuse it.
    assert 1 <= counter.frame_count <= 2, counter.frame_count
    # A graph that baked in the first lambda would train differently.
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5, abs=1e-6)
    for key, value in eager.state.items():
        torch.testing.assert_close(compiled.state[key], value, rtol=1e-5, atol=1e-6)


def test_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "30", "--epochs", "2", "--timing-steps", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = result.stdout
    assert f"torch {torch.__version__}, device cpu" in out
    assert out.count("epoch  2  step    30") == 2  # the DANN and the control
    assert "bridge (eager)" in out
    for name in PYPI:
        assert f"{name} (eager)" in out or f"{name} " in out and "not installed" in out
