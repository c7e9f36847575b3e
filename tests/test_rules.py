"""Each rule is stated twice, once per language: csrc/ (the operator) and gradbridge_ext/_rules.py.

Every named error, triggered through the native operator and through the
pure-Python fallback, must raise the same type with the same message: the
fallback and the compile stand-ins check with _rules.py, so this is what keeps
the two statements one rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad

import gradbridge_ext
from gradbridge_ext import ops
from helpers import unsupported_tensors

pytestmark = pytest.mark.skipif(not gradbridge_ext.NATIVE, reason="compares the native operator's messages with the fallback's")


def _fallback() -> ops.EntryPoints:
    from gradbridge_ext import _fallback  # the tests may import it; the package's native path never does

    return ops.entry_points(ops.Kernels(_fallback.bridge, _fallback.straight_through, _fallback.rotate_to, _fallback.set_strict))


def _needs_grad() -> torch.Tensor:
    return torch.ones(2, 3, requires_grad=True)


def _with_tangent(call: Callable[[torch.Tensor], Any]) -> Callable[[Any], Any]:
    def run(api: Any) -> Any:
        with forward_ad.dual_level():
            return call(api, forward_ad.make_dual(torch.ones(3, requires_grad=True), torch.ones(3)))

    return run


def _inference_q(api: Any, op: str = "straight_through") -> Any:
    with torch.inference_mode():
        q = torch.ones(3)
    return getattr(api, op)(torch.ones(3, requires_grad=True), q)


NUMBERS = torch.ones(2, 3)
CASES: dict[str, Callable[[Any], Any]] = {
    "bridge: t is not a tensor": lambda api: api.bridge([1.0], -1.0),
    "bridge: attach is not a bool": lambda api: api.bridge(NUMBERS, attach=1),
    "bridge: grad_scale is a bool": lambda api: api.bridge(NUMBERS, True),
    "bridge: grad_scale is a string": lambda api: api.bridge(NUMBERS, "1"),
    "bridge: grad_scale overflows a float": lambda api: api.bridge(NUMBERS, 10**400),
    "bridge: grad_scale is nan": lambda api: api.bridge(NUMBERS, float("nan")),
    "bridge: grad_scale is inf": lambda api: api.bridge(NUMBERS, float("inf")),
    "bridge: grad_scale is -inf": lambda api: api.bridge(NUMBERS, float("-inf")),
    "bridge: attach=False with a nonzero grad_scale": lambda api: api.bridge(NUMBERS, 2.0, attach=False),
    "bridge: attach=False with a grad_scale tensor": lambda api: api.bridge(NUMBERS, torch.ones(3), attach=False),
    "bridge: a grad_scale tensor of ints": lambda api: api.bridge(NUMBERS, torch.ones(3, dtype=torch.long)),
    "bridge: a mask that does not broadcast": lambda api: api.bridge(NUMBERS, torch.ones(4)),
    "bridge: a mask of the leading dimensions": lambda api: api.bridge(NUMBERS, torch.ones(2)),
    "bridge: a mask on another device": lambda api: api.bridge(NUMBERS.to("meta"), torch.ones(3)),
    "bridge: a sparse mask": lambda api: api.bridge(NUMBERS, torch.ones(2, 3).to_sparse()),
    "bridge: forward-mode AD, attached": _with_tangent(lambda api, t: api.bridge(t, -1.0)),
    "straight_through: x is not a tensor": lambda api: api.straight_through(1.0, NUMBERS),
    "straight_through: q is not a tensor": lambda api: api.straight_through(NUMBERS, None),
    "straight_through: grad_scale is a bool": lambda api: api.straight_through(NUMBERS, NUMBERS, False),
    "straight_through: shapes differ": lambda api: api.straight_through(torch.ones(3), torch.ones(2, 3)),
    "straight_through: devices differ": lambda api: api.straight_through(torch.ones(3), torch.ones(3, device="meta")),
    "straight_through: q is an int tensor": lambda api: api.straight_through(torch.ones(3), torch.ones(3, dtype=torch.long)),
    "straight_through: real x, complex q": lambda api: api.straight_through(torch.ones(3), torch.ones(3, dtype=torch.cfloat)),
    "straight_through: grad_scale is nan": lambda api: api.straight_through(NUMBERS, NUMBERS, float("nan")),
    "straight_through: a mask that does not broadcast": lambda api: api.straight_through(NUMBERS, NUMBERS, torch.ones(4)),
    "straight_through: a mask on another device": lambda api: api.straight_through(
        NUMBERS.to("meta"), NUMBERS.to("meta"), torch.ones(3)
    ),
    "straight_through: forward-mode AD": _with_tangent(lambda api, x: api.straight_through(x, x.detach().round())),
    "straight_through: an inference q while x requires grad": _inference_q,
    "rotate_to: x is not a tensor": lambda api: api.rotate_to([1.0], NUMBERS),
    "rotate_to: q is not a tensor": lambda api: api.rotate_to(NUMBERS, None),
    "rotate_to: shapes differ": lambda api: api.rotate_to(torch.ones(3), torch.ones(2, 3)),
    "rotate_to: devices differ": lambda api: api.rotate_to(torch.ones(3), torch.ones(3, device="meta")),
    "rotate_to: q is an int tensor": lambda api: api.rotate_to(torch.ones(3), torch.ones(3, dtype=torch.long)),
    "rotate_to: both complex": lambda api: api.rotate_to(torch.ones(3, dtype=torch.cfloat), torch.ones(3, dtype=torch.cfloat)),
    "rotate_to: 0-dim": lambda api: api.rotate_to(torch.tensor(1.0), torch.tensor(2.0)),
    "rotate_to: forward-mode AD": _with_tangent(lambda api, x: api.rotate_to(x, x.detach().round())),
    "rotate_to: an inference q while x requires grad": lambda api: _inference_q(api, "rotate_to"),
}
for _kind, _tensor in unsupported_tensors().items():
    CASES[f"bridge: t is {_kind}"] = lambda api, t=_tensor: api.bridge(t, -1.0)
    CASES[f"straight_through: q is {_kind}"] = lambda api, q=_tensor: api.straight_through(torch.ones(4, 4), q)
    CASES[f"rotate_to: q is {_kind}"] = lambda api, q=_tensor: api.rotate_to(torch.ones(4, 4), q)


def _raised(call: Callable[[], Any]) -> tuple[type, str]:
    with pytest.raises(Exception) as error:
        call()
    return type(error.value), str(error.value)


@pytest.mark.parametrize("case", CASES)
def test_both_implementations_raise_the_same_error(case: str) -> None:
    native = _raised(lambda: CASES[case](gradbridge_ext))
    fallback = _raised(lambda: CASES[case](_fallback()))
    assert fallback == native
    assert native[1].startswith(("gradbridge::", "bridge()", "straight_through()", "rotate_to()")), native  # ours, named, not torch's


def test_a_changed_message_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the test above sees when one side's wording drifts.
    from gradbridge_ext import _rules

    monkeypatch.setattr(_rules, "check_finite", lambda op, value: (_ for _ in ()).throw(ValueError(f"{op}: not finite")))
    case = CASES["bridge: grad_scale is nan"]
    assert _raised(lambda: case(_fallback())) != _raised(lambda: case(gradbridge_ext))
