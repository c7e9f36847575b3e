"""What several test modules share: dtypes, the settings table, the alias checks, and the tensors refused by layout."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gradbridge_ext
from conftest import requires_torch, torch_at_least
from gradbridge_ext import Bridge, BridgeFunction, bridge, straight_through
from gradbridge_ext._build import PACKAGE_DIR

REPO = Path(__file__).resolve().parent.parent
# What the build leaves beside the sources, which no copy made for a test may hold.
BUILT = shutil.ignore_patterns("_C*", "__pycache__", "*.so", "*.pyd", "*.egg-info")


def source_copy(destination: Path) -> Path:
    """What a fresh clone gives an install (setup.py, pyproject.toml, the package, csrc/), and nothing
    the working tree's builds left: no build/, no built _C, no .make/. Tests install from this, never REPO."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, destination / name)
    for folder in ("gradbridge_ext", "csrc"):
        shutil.copytree(REPO / folder, destination / folder, ignore=BUILT)
    return destination


def package_copy(destination: Path, with_sources: bool) -> Path:
    """A copy of the imported Python package, as an install lays it out: no binary, and its C++ sources if asked."""
    package = destination / "gradbridge_ext"
    shutil.copytree(PACKAGE_DIR, package, ignore=BUILT)
    if with_sources:
        shutil.copytree(REPO / "csrc", package / "csrc", ignore=BUILT)
    return package

FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]
DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, *FLOAT8,
]  # fmt: skip


def strict_cut(t: torch.Tensor) -> torch.Tensor:
    """bridge(t) made under strict(): a cut that shares t's version counter."""
    with gradbridge_ext.strict():
        return bridge(t)


# Every way to ask for each backward; the attached ones stay in the graph. A
# module takes the rows it needs by name. Each looks its function up when called:
# conftest.implementation swaps in the fallback, whose torch.ops.gradbridge is empty.
SETTINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "cut": lambda t: bridge(t),
    "BridgeFunction": lambda t: BridgeFunction.apply(t),
    "torch.ops cut": lambda t: torch.ops.gradbridge.bridge(t),
    "strict cut": strict_cut,
    "reversal": lambda t: bridge(t, -1.0),
    "torch.ops reversal": lambda t: torch.ops.gradbridge.bridge(t, -1.0),
    "attach": lambda t: bridge(t, attach=True),
    "Bridge module": Bridge(grad_scale=0.5),
}
# The gradient each attached setting sends to t, per unit of incoming gradient.
GRAD_SCALE = {"reversal": -1.0, "torch.ops reversal": -1.0, "attach": 0.0, "Bridge module": 0.5}
# Settings whose result shares t's version counter (detach()'s rule).
SHARES_VERSION = {"strict cut", *GRAD_SCALE}


def native(*calls: Callable) -> tuple[Callable, ...]:
    """The calls of the operator itself (torch.ops.gradbridge), where the native build registered it:
    under the fallback (conftest.implementation) there is none, and the public calls are what is tested."""
    return calls if gradbridge_ext.NATIVE else ()


def metadata(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset()


def random_values(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.randint(0, 100, shape, device=device).to(dtype)
    return torch.randn(shape, device=device).to(dtype)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's elements as bytes, so every dtype (float8, complex, bool) compares exactly."""
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def assert_alias(result: torch.Tensor, t: torch.Tensor) -> None:
    assert result.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    assert result.data_ptr() == t.data_ptr()
    assert result.storage_offset() == t.storage_offset()
    assert result.shape == t.shape
    assert result.stride() == t.stride()
    assert result.dtype == t.dtype
    assert result.device == t.device
    assert result.is_conj() == t.is_conj()
    assert result.is_neg() == t.is_neg()


def assert_view_only_if_recorded(result: torch.Tensor, t: torch.Tensor) -> None:
    """A result in the graph is what autograd.Function returns for a view: a view of t's base."""
    if result.requires_grad:
        assert result._is_view() and result._base is (t if t._base is None else t._base)
    else:
        assert result._base is None and not result._is_view()


def assert_cut(result: torch.Tensor) -> None:
    """Not an autograd view, a leaf, no history."""
    assert result._base is None
    assert not result._is_view()
    assert not result.requires_grad
    assert result.is_leaf
    assert result.grad_fn is None


def layouts(device: str) -> dict[str, torch.Tensor]:
    """Strided tensors of every shape bridge must alias, built on one base of 64 elements."""
    base = torch.arange(64, dtype=torch.float32, device=device)
    return {
        "0-dim": base[5],
        "empty": base[:0].view(0, 4),
        "contiguous": base.view(4, 16),
        "non-contiguous": base.view(8, 8).t(),
        "storage offset": base[10:30].view(4, 5),
        "strided": base[1::3],
        "expanded": base[:4].view(4, 1).expand(4, 6),
        "channels_last": base.view(1, 4, 4, 4).contiguous(memory_format=torch.channels_last),
    }


def ternary(w: Tensor) -> Tensor:
    """BitNet's weight quantizer: ternary, scaled by mean |w|."""
    scale = w.abs().mean().clamp(min=1e-5)
    return (w / scale).round().clamp(-1, 1) * scale


class TernaryLinear(nn.Linear):
    """A Linear that multiplies by its ternary weights, trained through the STE on its parameter (as BitLinear)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, straight_through(self.weight, ternary(self.weight.detach())), self.bias)


# --- tensors with no one strided storage, which bridge and straight_through refuse by name

JAGGED = torch_at_least("2.2")  # torch.jagged, the layout of torch.nested's NJT


def unsupported_tensors() -> dict[str, Tensor]:
    dense = torch.randn(4, 4)
    found = {
        "torch.sparse_coo": dense.to_sparse(),
        "torch.sparse_coo requiring grad": dense.to_sparse().requires_grad_(),
        "torch.sparse_csr": dense.to_sparse_csr(),
        "torch.sparse_csc": dense.to_sparse_csc(),
        "torch.sparse_bsr": dense.to_sparse_bsr((2, 2)),
        "torch.sparse_bsc": dense.to_sparse_bsc((2, 2)),
        "nested": torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        "nested requiring grad": torch.nested.nested_tensor([torch.randn(2), torch.randn(3)], requires_grad=True),
        "quantized": torch.quantize_per_tensor(dense, 0.1, 0, torch.quint8),
    }
    if JAGGED:
        found["nested jagged"] = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)], layout=torch.jagged)
    if torch.backends.mkldnn.is_available():
        found["torch._mkldnn"] = dense.to_mkldnn()
    return found


def unsupported_kinds() -> list:
    """unsupported_tensors()' names, and the jagged case skipped, visibly, where torch lacks it."""
    if JAGGED:
        return list(unsupported_tensors())
    return [*unsupported_tensors(), pytest.param("nested jagged", marks=requires_torch("2.2", "the jagged layout"))]
