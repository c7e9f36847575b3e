"""Load gradbridge_ext._C built against the torch that is imported, compiling it if needed.

A C++ torch extension is only safe inside the torch it was compiled against. The
ahead-of-time build (`pip install --no-build-isolation .`) records that torch's
version beside the binary; when it is missing or names another torch, the
sources shipped in the package are compiled once against the running torch and
cached per torch version, Python version and source hash.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
TORCH_VERSION_FILE = PACKAGE_DIR / "_C.torch_version"  # written by setup.py
CACHE_ENV = "GRADBRIDGE_EXT_CACHE"
# torch's JIT build passes neither flag; a setup.py build gets both (-DNDEBUG from
# Python's own build flags), so the two builds compile the same code.
CXX_FLAGS = ["-O3", "-DNDEBUG"]
_FIX = (
    "To fix it, install a C++ compiler and ninja (`pip install ninja`) so the operator can "
    "compile on import, or reinstall next to this torch with "
    "`pip install --no-build-isolation <path to gradbridge_ext>`."
)


def load() -> ModuleType:
    """Return the _C module for the imported torch; compile it first if there is none."""
    built_for = TORCH_VERSION_FILE.read_text().strip() if TORCH_VERSION_FILE.exists() else None
    if built_for == torch.__version__:
        return importlib.import_module("gradbridge_ext._C")
    if built_for is None:
        why = "was not compiled at install time"
    else:
        why = f"was compiled against torch {built_for}, but torch {torch.__version__} is imported"
    return _compile(why)


def sources() -> list[Path]:
    """The C++ sources: inside the installed package, or in a source checkout."""
    for folder in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found
    return []


def cache_dir(cpp_sources: list[Path]) -> Path:
    digest = hashlib.sha256()
    for path in sorted(cpp_sources + list(cpp_sources[0].parent.glob("*.h"))):
        digest.update(path.read_bytes())
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gradbridge_ext")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"torch-{torch.__version__}-{python}-{digest.hexdigest()[:16]}"


def _compile(why: str) -> ModuleType:
    cpp_sources = sources()
    if not cpp_sources:
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and its C++ sources are not in "
            f"{PACKAGE_DIR / 'csrc'}. {_FIX}"
        )
    build_dir = cache_dir(cpp_sources)
    if not any(build_dir.glob("_C.so")) and not any(build_dir.glob("_C.pyd")):
        print(
            f"gradbridge_ext: the native operator {why}; compiling it for torch "
            f"{torch.__version__} (once, about a minute; cached in {build_dir})...",
            file=sys.stderr,
            flush=True,
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    try:
        module = cpp_extension.load(
            name="_C",
            sources=[str(path) for path in cpp_sources],
            build_directory=str(build_dir),
            extra_cflags=CXX_FLAGS,
            verbose=False,
        )
    except Exception as error:
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and compiling it failed: {error}\n{_FIX}"
        ) from error
    sys.modules["gradbridge_ext._C"] = module
    return module
