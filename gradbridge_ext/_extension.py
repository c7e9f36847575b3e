"""The native operator, gradbridge_ext._C, for the imported torch: ``NATIVE`` says whether it serves the calls.

A C++ torch extension is only safe inside the torch it was compiled against. The
ahead-of-time build (`pip install --no-build-isolation .`) records that torch's
version beside the binary; when it is missing or names another torch, _build.py
compiles the shipped sources against the running torch and caches the binary.

Where no native operator can be had (no compiler, a failed build), the import
warns once and ``NATIVE`` is False: the package then runs its pure-Python
fallback (``_fallback.py``), unless ``GRADBRIDGE_EXT_REQUIRE_NATIVE=1`` makes that
an error. Every other module asks this one, and only this one, which it is.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from ._build import BINARY, CACHE_ENV, REQUIRE_NATIVE_ENV, TORCH_VERSION_FILE, flag_from_environment, load_cached_or_compile

__all__ = ["BINARY", "CACHE_ENV", "NATIVE", "REQUIRE_NATIVE_ENV", "TESTED_TORCH", "load", "torch_at_least"]

# The oldest and newest torch CI tests: .ci/torch-versions' matrix, which
# tests/test_install.py holds this and pyproject.toml's floor to.
TESTED_TORCH = ("2.1", "2.15")


def minor_version(version: str) -> tuple[int, ...]:
    """``(2, 5)`` for "2.5.1+cu124" or "2.5": what a release of torch is known by."""
    return tuple(int(part) for part in version.split(".")[:2])


def torch_at_least(version: str) -> bool:
    """Whether the imported torch is ``version`` ("2.6") or newer: the one place the package asks."""
    return minor_version(torch.__version__) >= minor_version(version)


def _warn_if_untested_torch() -> None:
    # A newer torch usually works: say it is untested rather than refuse it.
    if minor_version(torch.__version__) > minor_version(TESTED_TORCH[1]):
        warnings.warn(
            f"gradbridge_ext is tested with torch {TESTED_TORCH[0]} to {TESTED_TORCH[1]}; "
            f"torch {torch.__version__} is newer and untested",
            UserWarning,
            stacklevel=2,
        )



def load() -> ModuleType | None:
    """The _C module for the imported torch, compiled first if there is none.

    None, after one warning, where no native operator can be had: the package
    then runs its pure-Python fallback. With GRADBRIDGE_EXT_REQUIRE_NATIVE=1 the
    reason is raised as an ImportError instead.
    """
    _warn_if_untested_torch()
    required = flag_from_environment(REQUIRE_NATIVE_ENV)  # a bad value is an error with or without a compiler
    try:
        return _load_native()
    except Exception as error:  # whatever stops the native operator (no HOME, a full disk): the import goes on
        if required:
            raise
        warnings.warn(_fallback_warning(error), UserWarning, stacklevel=2)
        return None



def _fallback_warning(error: Exception) -> str:
    # The first line says why; a longer message (a compiler's output) ends with the fix.
    lines = str(error).strip().splitlines() or ["no reason given"]
    why = lines[0].removeprefix("gradbridge_ext: ").rstrip(".")
    if not isinstance(error, ImportError):  # not one of ours: name it
        why = f"{type(error).__name__}: {why}"
    fix = f" {lines[-1]}" if len(lines) > 1 else ""
    return (
        f"gradbridge_ext: using the pure-Python fallback, not the native operator: {why}.{fix} The fallback "
        "gives the same values, aliases and gradients, but each call runs Python: microseconds, as a Python "
        "gradient reversal layer costs, many times the native operator's (the benchmark's fallback section "
        "measures both); a cut shares its input's version counter, and torch.ops.gradbridge is not registered "
        "(docs/semantics.md, 'The pure-Python fallback'). "
        f"Set {REQUIRE_NATIVE_ENV}=1 to make this an error."
    )


def _load_native() -> ModuleType:
    built_for = TORCH_VERSION_FILE.read_text().strip() if TORCH_VERSION_FILE.exists() else None
    if built_for == torch.__version__:
        return importlib.import_module("gradbridge_ext._C")
    if built_for is None:
        why = "was not compiled at install time"
    else:
        why = f"was compiled against torch {built_for}, but torch {torch.__version__} is imported"
    return load_cached_or_compile(why)


_C = load()
NATIVE: bool = _C is not None
