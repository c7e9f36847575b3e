"""Until gradbridge_ext.rotate_to exists: give the patched library tests/rotation_reference's stand-in.

Imported by train_digits.py (``--impl reference``) and loaded by pytest as a plugin
(``-p standin``), so it runs before the library is imported. It sets
``gradbridge_ext.rotate_to = rotate_to_reference``, loudly. Where gradbridge_ext itself fails
to import (mid-refactor), the library gets a module holding only that function, and the line
printed says so.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def install() -> str:
    # NB: by file path: the library's own tests/ folder would shadow a `tests.` import.
    spec = importlib.util.spec_from_file_location("gradbridge_rotation_reference", REPO / "tests" / "rotation_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    rotate_to_reference = reference.rotate_to_reference

    try:
        import gradbridge_ext
    except Exception as error:  # noqa: BLE001  (any import failure: say it, then stand in)
        gradbridge_ext = types.ModuleType("gradbridge_ext")
        gradbridge_ext.__doc__ = "stand-in holding only rotate_to (the real package failed to import)"
        sys.modules["gradbridge_ext"] = gradbridge_ext
        which = f"RotateToReference in a stand-in gradbridge_ext module (import failed: {type(error).__name__}: {error})"
    else:
        which = "RotateToReference set as gradbridge_ext.rotate_to"
    gradbridge_ext.rotate_to = rotate_to_reference
    print(f"standin: {which}", file=sys.stderr)
    return which


def pytest_configure(config) -> None:  # pytest's hook: runs before collection imports the library
    install()
