"""Checks for examples/domain_adversarial.py: the paper's toy (Ganin et al. 2016, 5.1.1) with Bridge.

The conclusions are checked on the example's own settings (5 seeds, 3000 full-batch steps,
about 40 s of CPU): a shorter run or fewer seeds is not the claim the README makes.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "examples" / "domain_adversarial.py"
PYPI = ("pytorch-revgrad", "torch-gradient-reversal")
PYPI_MODULES = {"pytorch-revgrad": "pytorch_revgrad", "torch-gradient-reversal": "gradient_reversal"}


pytest.importorskip("sklearn")  # the example makes its moons with sklearn.datasets.make_moons


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("domain_adversarial", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


ex = _load()


pytestmark = pytest.mark.usefixtures("one_thread")  # as the example's main() runs (conftest)


@functools.cache
def _trained(reversed_: bool) -> ex.Result:
    return ex.train("bridge" if reversed_ else ex.CONTROL)


def test_lambda_schedule() -> None:
    assert ex.grl_lambda(0.0) == 0.0
    assert ex.grl_lambda(0.5) == pytest.approx(ex.LAMBDA * 0.98661, abs=1e-4)
    assert 0.9999 * ex.LAMBDA < ex.grl_lambda(1.0) < ex.LAMBDA


def test_the_example_conclusions_hold() -> None:
    checked = ex.conclusions(_trained(True), _trained(False))
    assert all(holds for _, holds in checked), checked


def test_the_conclusions_fail_without_the_reversal() -> None:
    # The check can fail: the control against itself, a reversal layer that does not
    # reverse, gains nothing on the target.
    control = _trained(False)
    checked = dict(ex.conclusions(control, control))
    assert not all(checked.values()), checked


@pytest.mark.parametrize("name", PYPI)
def test_pypi_reversal_layers_follow_the_same_trajectory(name: str) -> None:
    pytest.importorskip(PYPI_MODULES[name])
    steps = 60
    ours, theirs = ex.train("bridge", steps=steps), ex.train(name, steps=steps)
    # Each multiplies the gradient by the same float32 -lambda: bitwise the same steps.
    assert theirs.losses == ours.losses
    for (key, value), other in zip(ours.model.named_parameters(), theirs.model.parameters()):
        assert torch.equal(other, value), key
    # ... and the reversal mattered: the control's trajectory is another one.
    assert ex.train(ex.CONTROL, steps=steps).losses != ours.losses


def test_compiled_training_follows_lambda_with_at_most_one_recompile() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    steps = 30
    compiled = ex.train(steps=steps, compile=True, backend=counter)
    eager = ex.train(steps=steps)
    # The first graph, then at most one more once grad_scale stops being one constant;
    # every later step brings a new lambda and must reuse it.
    assert 1 <= counter.frame_count <= 2, counter.frame_count
    # A graph that baked in the first lambda would train differently.
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5, abs=1e-6)
    for (key, value), other in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow  # the script; its conclusions are checked in process above
def test_script_runs() -> None:
    # Too short to hold the conclusions: the script prints them and exits 1.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "30", "--seeds", "2", "--timing-steps", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode in (0, 1), result.stderr
    assert f"torch {torch.__version__}, device cpu" in out
    assert "DANN (Bridge, -lambda)" in out and "control (grad_scale 0)" in out
    assert "Checked on the runs above:" in out
    assert "bridge (eager)" in out
    for name in PYPI:
        assert f"{name} (eager)" in out or f"{name} " in out and "not installed" in out
