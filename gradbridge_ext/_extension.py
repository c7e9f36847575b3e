"""Load gradbridge_ext._C built against the torch that is imported, compiling it if needed.

A C++ torch extension is only safe inside the torch it was compiled against. The
ahead-of-time build (`pip install --no-build-isolation .`) records that torch's
version beside the binary; when it is missing or names another torch, the
sources shipped in the package are compiled once against the running torch and
cached under a key of what determines the binary: the sources' contents, the
flags, torch's version and Python's. Where the sources sit does not matter, so
a second checkout or an install of the same sources loads the cached binary.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
TORCH_VERSION_FILE = PACKAGE_DIR / "_C.torch_version"  # written by setup.py
CACHE_ENV = "GRADBRIDGE_EXT_CACHE"
# The compile flags of both builds (setup.py reads them from here). torch's JIT
# build passes none of them; a setup.py build gets Python's own (-O3 -DNDEBUG,
# and -g, whose debug info costs a third of the compile), so -g0 undoes that.
CXX_FLAGS = ["-O3", "-DNDEBUG", "-g0"]
# The torch releases CI tests (.ci/matrix, oldest and newest); the oldest is
# pyproject.toml's floor.
TESTED_TORCH = ("2.1", "2.15")


def _minor(version: str) -> tuple[int, ...]:
    """``(2, 5)`` for "2.5.1+cu124" or "2.5": what a release of torch is known by."""
    return tuple(int(part) for part in version.split(".")[:2])


def _warn_if_untested_torch() -> None:
    # A newer torch usually works: say it is untested rather than refuse it.
    if _minor(torch.__version__) > _minor(TESTED_TORCH[1]):
        warnings.warn(
            f"gradbridge_ext is tested with torch {TESTED_TORCH[0]} to {TESTED_TORCH[1]}; "
            f"torch {torch.__version__} is newer and untested",
            UserWarning,
            stacklevel=2,
        )


_FIX = (
    "To fix it, install a C++ compiler and ninja (`pip install ninja`) so the operator can "
    "compile on import, or reinstall next to this torch with "
    "`pip install --no-build-isolation <path to gradbridge_ext>`."
)


def load() -> ModuleType:
    """Return the _C module for the imported torch; compile it first if there is none."""
    _warn_if_untested_torch()
    built_for = TORCH_VERSION_FILE.read_text().strip() if TORCH_VERSION_FILE.exists() else None
    if built_for == torch.__version__:
        return importlib.import_module("gradbridge_ext._C")
    if built_for is None:
        why = "was not compiled at install time"
    else:
        why = f"was compiled against torch {built_for}, but torch {torch.__version__} is imported"
    return _load_cached_or_compile(why)


def sources() -> list[Path]:
    """The C++ sources and headers: inside the installed package, or in a source checkout."""
    for folder in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found + sorted(folder.glob("*.h"))
    return []


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gradbridge_ext")


def _prefix() -> str:
    return f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-"


def cache_dir(files: list[Path]) -> Path:
    """The build's folder, named by a hash of what goes into the binary, never of paths."""
    digest = hashlib.sha256(repr(CXX_FLAGS).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return cache_root() / f"{_prefix()}{digest.hexdigest()[:16]}"


def _why_compile_now() -> str:
    """Why this cache has no binary: first use, another torch, or other sources."""
    built = [path.parent.name for path in cache_root().glob("*/_C.so")]
    if any(name.startswith(_prefix()) for name in built):
        return "the sources changed since the cached build"
    if built:
        return f"the cached builds are for another torch or Python (torch {torch.__version__} is imported)"
    return "first use"


def _import_binary(binary: Path) -> ModuleType:
    # Under its package's name, whichever way it was built, so pickles and
    # error messages name gradbridge_ext._C.
    spec = importlib.util.spec_from_file_location("gradbridge_ext._C", binary)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["gradbridge_ext._C"] = module
    return module


def _load_cached_or_compile(why: str) -> ModuleType:
    files = sources()
    if not files:
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and its C++ sources are not in "
            f"{PACKAGE_DIR / 'csrc'}. {_FIX}"
        )
    build_dir = cache_dir(files)
    binary = build_dir / "_C.so"
    if not binary.exists():
        print(
            f"gradbridge_ext: the native operator {why}; compiling it for torch {torch.__version__} "
            f"({_why_compile_now()}; once, under a minute; cached in {build_dir})...",
            file=sys.stderr,
            flush=True,
        )
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils import cpp_extension

        try:
            # is_python_module=False: build and load the library only; the
            # module is imported below by path, under its package's name.
            cpp_extension.load(
                name="_C",
                sources=[str(path) for path in files if path.suffix == ".cpp"],
                build_directory=str(build_dir),
                extra_cflags=CXX_FLAGS,
                is_python_module=False,
                verbose=False,
            )
        except Exception as error:
            raise ImportError(
                f"gradbridge_ext: the native operator {why}, and compiling it failed: {error}\n{_FIX}"
            ) from error
    return _import_binary(binary)
