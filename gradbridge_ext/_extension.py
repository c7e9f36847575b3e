"""Load gradbridge_ext._C built against the torch that is imported, compiling it if needed.

A C++ torch extension is only safe inside the torch it was compiled against. The
ahead-of-time build (`pip install --no-build-isolation .`) records that torch's
version beside the binary; when it is missing or names another torch, the
sources shipped in the package are compiled once against the running torch and
cached under a key of what determines the binary: the sources' contents, the
flags, torch's version and Python's. Where the sources sit does not matter, so
a second checkout or an install of the same sources loads the cached binary.

The cache survives crashes and other users (docs/install.md): a build runs in a
private folder, published by an atomic rename, while holding an flock the kernel
drops if the builder dies; a binary is loaded only if its size and hash match what
its build recorded and only this user could have written it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import os
import shutil
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
# What a build recorded about its binary (size and SHA-256), checked before loading.
RECORD = "_C.so.sha256"
# How long an import waits for another process's build of the same folder: a
# cold build takes under a minute, several on a loaded machine.
BUILD_WAIT_S = 600.0


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


def _cache_root_and_setting() -> tuple[Path, str]:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]), f"${CACHE_ENV}"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec ignores a relative path
        return Path(xdg) / "gradbridge_ext", "$XDG_CACHE_HOME"
    return Path.home() / ".cache" / "gradbridge_ext", f"default (neither ${CACHE_ENV} nor $XDG_CACHE_HOME is set)"


def cache_root() -> Path:
    """$GRADBRIDGE_EXT_CACHE, else $XDG_CACHE_HOME/gradbridge_ext, else ~/.cache/gradbridge_ext."""
    return _cache_root_and_setting()[0]


def _prefix() -> str:
    # The uid: users sharing a cache root each build their own, since each
    # trusts only what they wrote.
    return f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-uid{os.getuid()}-"


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


def _cache_error(what: str, path: Path, error: OSError) -> ImportError:
    root, setting = _cache_root_and_setting()
    return ImportError(
        f"gradbridge_ext: cannot {what} {path} ({error.strerror or error}) for the operator's compile "
        f"cache {root}, chosen by {setting}. Set {CACHE_ENV} to a folder you can write."
    )


def _untrusted(path: Path) -> str | None:
    """Why another user may have written ``path``, or None: ssh's rule for its keys."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _record(binary: Path) -> str:
    data = binary.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _verified_binary(build_dir: Path) -> Path | None:
    """The folder's binary if it is whole and only this user could have written it; None if it
    needs building (none yet, or one cut short); ImportError if someone else may have planted it."""
    binary, record = build_dir / "_C.so", build_dir / RECORD
    for path in (build_dir, binary, record):
        why = _untrusted(path) if os.path.lexists(path) else None
        if why:
            raise ImportError(
                f"gradbridge_ext: refusing to load the cached operator in {build_dir}: {path} {why}, so "
                f"another user may have written it. Delete that folder if you can (it is rebuilt), or set "
                f"{CACHE_ENV} to a folder only you can write."
            )
    try:
        # NB: checked by path, then loaded by path: a cache root that others can
        # write (without the sticky bit) leaves a window to swap the folder.
        return binary if record.read_text() == _record(binary) else None
    except OSError:  # none yet; the build says why if it cannot write there either
        return None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build's flock: unlike a lock file's existence, the kernel drops it when its holder dies."""
    path = build_dir.with_name(build_dir.name + ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise _cache_error("create the lock file", path, error) from error
    try:
        if not _try_flock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace") or "another process"
            print(f"gradbridge_ext: waiting for {holder}, which is building the operator in {build_dir}...",
                  file=sys.stderr, flush=True)  # fmt: skip
            deadline = time.monotonic() + BUILD_WAIT_S
            while not _try_flock(fd):
                if time.monotonic() > deadline:
                    raise ImportError(
                        f"gradbridge_ext: gave up after {BUILD_WAIT_S:.0f} s waiting for {holder}, which is "
                        f"building the operator in {build_dir} and holds the lock {path}. If that process is "
                        f"stuck, end it (the lock goes with it) and import again, or set {CACHE_ENV} to "
                        "another folder."
                    )
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # and with it the flock


def _build(build_dir: Path, files: list[Path], why: str, reason: str) -> None:
    """Compile into a private folder, then publish it under ``build_dir`` with one rename."""
    print(
        f"gradbridge_ext: the native operator {why}; compiling it for torch {torch.__version__} "
        f"({reason}; once, under a minute; cached in {build_dir})...",
        file=sys.stderr,
        flush=True,
    )
    for stale in build_dir.parent.glob(build_dir.name + ".tmp-*"):  # a killed build's, under our lock
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=build_dir.name + ".tmp-", dir=build_dir.parent))  # mode 0700
    except OSError as error:
        raise _cache_error("create a build folder in", build_dir.parent, error) from error
    from torch.utils import cpp_extension

    try:
        # is_python_module=False: build and load the library only; the
        # module is imported below by path, under its package's name.
        cpp_extension.load(
            name="_C",
            sources=[str(path) for path in files if path.suffix == ".cpp"],
            build_directory=str(staging),
            extra_cflags=CXX_FLAGS,
            is_python_module=False,
            verbose=False,
        )
        (staging / RECORD).write_text(_record(staging / "_C.so"))
        for name, mode in (("_C.so", 0o700), (RECORD, 0o600)):  # whatever the umask, or we would refuse them
            (staging / name).chmod(mode)
        if build_dir.exists():  # a damaged build of ours, which nobody can be using: we hold the lock
            shutil.rmtree(build_dir)
        # NB: the library is already loaded from staging; the rename keeps its inode,
        # so importing it from build_dir finds that same library (the dynamic
        # loader matches files by device and inode), not a second copy.
        os.rename(staging, build_dir)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and compiling it failed: {error}\n{_FIX}"
        ) from error


def _load_cached_or_compile(why: str) -> ModuleType:
    files = sources()
    if not files:
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and its C++ sources are not in "
            f"{PACKAGE_DIR / 'csrc'}. {_FIX}"
        )
    build_dir = cache_dir(files)
    binary = _verified_binary(build_dir)
    if binary is None:
        try:
            build_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise _cache_error("create", build_dir.parent, error) from error
        with _build_lock(build_dir):
            binary = _verified_binary(build_dir)  # built while we waited?
            if binary is None:
                reason = _why_compile_now()
                if (build_dir / "_C.so").exists():
                    reason = "the cached binary does not match what its build recorded: cut short?"
                _build(build_dir, files, why, reason)
                binary = build_dir / "_C.so"
    return _import_binary(binary)
