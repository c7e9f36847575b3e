"""Build gradbridge_ext._C against the imported torch, in a cache that survives crashes and other users.

Both builds' facts live here (setup.py reads the flags and the version file's
name from this file without importing the package). The JIT build compiles the
sources shipped in the package once per torch and caches the binary under a key
of what determines it: the sources' contents, the flags, torch's version and
Python's. Where the sources sit does not matter, so a second checkout or an
install of the same sources loads the cached binary.

The cache (docs/install.md): a build runs in a private folder, published by an
atomic rename, while holding an OS file lock (``filelock``'s, which torch
depends on) that the kernel drops if the builder dies; a binary is loaded only
if its size and hash match what its build recorded and only this user could have
written it. Nothing here is POSIX-only: Windows has no ``fcntl`` and no ``os.getuid``.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import filelock  # a dependency of torch's
import torch

PACKAGE_DIR = Path(__file__).resolve().parent
TORCH_VERSION_FILE = PACKAGE_DIR / "_C.torch_version"  # written by setup.py
CACHE_ENV = "GRADBRIDGE_EXT_CACHE"
REQUIRE_NATIVE_ENV = "GRADBRIDGE_EXT_REQUIRE_NATIVE"


def compile_flags(platform: str = sys.platform) -> list[str]:
    """The compile flags of both builds (setup.py reads them from here), in the compiler's dialect.

    torch's JIT build passes none of them; a setup.py build gets Python's own
    (-O3 -DNDEBUG, and -g, whose debug info only slows the compile), so -g0
    undoes that. torch builds with MSVC on Windows, which spells them its own way.
    """
    return ["/O2", "/DNDEBUG"] if platform == "win32" else ["-O3", "-DNDEBUG", "-g0"]


def binary_name(platform: str = sys.platform) -> str:
    """The operator's file name as torch's build writes it: _C.pyd on Windows, _C.so elsewhere (macOS too)."""
    return "_C.pyd" if platform == "win32" else "_C.so"


CXX_FLAGS = compile_flags()
BINARY = binary_name()
# What a build recorded about its binary (size and SHA-256), checked before loading.
RECORD = BINARY + ".sha256"
# How long an import waits for another process's build of the same folder: many
# times a cold build (docs/install.md), for a loaded machine.
BUILD_WAIT_S = 600.0


_FIX = (
    "To fix it, install a C++ compiler and ninja (`pip install ninja`) so the operator can "
    "compile on import, or reinstall next to this torch with "
    "`pip install --no-build-isolation <path to gradbridge_ext>`."
)



def flag_from_environment(name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (or unset); anything else is an error."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        raise ValueError(f"{name}={os.environ[name]!r}: expected 1 or 0 (or true/false, yes/no, on/off)")
    return False



def sources() -> list[Path]:
    """The C++ sources and headers: inside the installed package, or in a source checkout."""
    for folder in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found + sorted(folder.glob("*.h"))
    return []


def _cache_root_and_setting(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> tuple[Path, str]:
    """Where the platform keeps a user's caches, as pip's do: XDG on Linux, ~/Library/Caches, %LOCALAPPDATA%."""
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]), f"${CACHE_ENV}"
    if platform == "win32":
        local = env.get("LOCALAPPDATA", "")
        if os.path.isabs(local):
            return Path(local) / "gradbridge_ext" / "Cache", "%LOCALAPPDATA%"
        return Path.home() / "AppData" / "Local" / "gradbridge_ext" / "Cache", f"default (neither %{CACHE_ENV}% nor %LOCALAPPDATA% is set)"
    if platform == "darwin":
        return Path.home() / "Library" / "Caches" / "gradbridge_ext", f"default (${CACHE_ENV} is not set)"
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec ignores a relative path
        return Path(xdg) / "gradbridge_ext", "$XDG_CACHE_HOME"
    return Path.home() / ".cache" / "gradbridge_ext", f"default (neither ${CACHE_ENV} nor $XDG_CACHE_HOME is set)"


def cache_root() -> Path:
    """$GRADBRIDGE_EXT_CACHE, else the platform's cache folder: $XDG_CACHE_HOME/gradbridge_ext or
    ~/.cache/gradbridge_ext on Linux, ~/Library/Caches/gradbridge_ext on macOS,
    %LOCALAPPDATA%\\gradbridge_ext\\Cache on Windows."""
    return _cache_root_and_setting()[0]


def _user() -> str:
    """Who builds: the uid where there is one; on Windows, which has none, the login name."""
    if hasattr(os, "getuid"):
        return f"uid{os.getuid()}"
    try:
        name = getpass.getuser()
    except Exception:  # no login name in the environment: one folder for all such processes
        name = "unknown"
    return "user-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _prefix() -> str:
    # The user: users sharing a cache root each build their own, since each
    # trusts only what they wrote.
    return f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{_user()}-"


def cache_dir(files: list[Path]) -> Path:
    """The build's folder, named by a hash of what goes into the binary, never of paths."""
    digest = hashlib.sha256(repr(CXX_FLAGS).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return cache_root() / f"{_prefix()}{digest.hexdigest()[:16]}"


def _why_compile_now() -> str:
    """Why this cache has no binary: first use, another torch, or other sources."""
    built = [path.parent.name for path in cache_root().glob(f"*/{BINARY}")]
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
    """Why another user may have written ``path``, or None: ssh's rule for its keys.

    NB: Windows has no uid and no write bits for others (its ACLs decide), so
    there only links are refused; the default cache root is in the user's own
    profile, which other users cannot write (docs/install.md).
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or getattr(os.path, "isjunction", lambda p: False)(path):
        return "is a symbolic link"
    if not hasattr(os, "getuid"):
        return None
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
    binary, record = build_dir / BINARY, build_dir / RECORD
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


def _os_lock(path: Path) -> filelock.BaseFileLock:
    # NB: filelock 4 falls back to a lock file's mere existence where the file
    # system has no OS lock; such a lock outlives a killed builder, so not that.
    try:
        return filelock.FileLock(str(path), fallback_to_soft=False)
    except TypeError:  # filelock 3: always the OS's lock
        return filelock.FileLock(str(path))


@contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build's OS lock (flock, LockFileEx): unlike a lock file's existence, the kernel drops it when its holder dies."""
    if issubclass(filelock.FileLock, filelock.SoftFileLock):
        # No OS lock on this platform (neither fcntl nor msvcrt): a lock file's mere
        # existence would outlive a killed builder and block every later import, so
        # build unlocked. The private staging folder and the atomic rename still keep a
        # half-built binary from being loaded; a concurrent build only costs time.
        yield
        return
    path = build_dir.with_name(build_dir.name + ".lock")
    holder_note = build_dir.with_name(build_dir.name + ".holder")
    try:
        # Made here, not by filelock: a link planted in a shared root is refused, and an error names the setting.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600))
        if why := _untrusted(path):
            raise OSError(0, why)
    except OSError as error:
        raise _cache_error("create the lock file", path, error) from error
    lock = _os_lock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:  # before OSError, which it is
        try:
            holder = holder_note.read_text()[:64] or "another process"
        except OSError:
            holder = "another process"
        print(f"gradbridge_ext: waiting for {holder}, which is building the operator in {build_dir}...",
              file=sys.stderr, flush=True)  # fmt: skip
        try:
            lock.acquire(timeout=BUILD_WAIT_S, poll_interval=0.5)
        except filelock.Timeout:
            raise ImportError(
                f"gradbridge_ext: gave up after {BUILD_WAIT_S:.0f} s waiting for {holder}, which is "
                f"building the operator in {build_dir} and holds the lock {path}. If that process is "
                f"stuck, end it (the lock goes with it) and import again, or set {CACHE_ENV} to "
                "another folder."
            ) from None
    except OSError:  # a file system with no OS lock (some NFS, FUSE): unlocked, as where the platform has none
        yield
        return
    try:
        # Beside the lock, not in it: filelock truncates the lock file each time a waiter tries it.
        _write_private(holder_note, f"process {os.getpid()}")
        yield
    finally:
        lock.release()


# The build runs in a child process, which loads the library it built and exits:
# this one loads it only from its published folder (Windows can rename no folder
# holding a loaded DLL, and loads by path: a second copy would register twice).
_COMPILE = """
import json, sys
from torch.utils import cpp_extension
folder, sources, flags = json.loads(sys.argv[1])
cpp_extension.load(name="_C", sources=sources, build_directory=folder, extra_cflags=flags, is_python_module=False, verbose=False)
"""


def _write_private(path: Path, text: str) -> None:
    """Write a file only this user can read, never through a link planted in a shared cache root."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _build(build_dir: Path, files: list[Path], why: str, reason: str) -> None:
    """Compile into a private folder, then publish it under ``build_dir`` with one rename."""
    print(
        f"gradbridge_ext: the native operator {why}; compiling it for torch {torch.__version__} "
        f"({reason}; once per torch, as long as the install's build: docs/install.md; cached in {build_dir})...",
        file=sys.stderr,
        flush=True,
    )
    for stale in build_dir.parent.glob(build_dir.name + ".tmp-*"):  # a killed build's, under our lock
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=build_dir.name + ".tmp-", dir=build_dir.parent))  # mode 0700
    except OSError as error:
        raise _cache_error("create a build folder in", build_dir.parent, error) from error
    try:
        sources = [str(path) for path in files if path.suffix == ".cpp"]
        child = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([str(staging), sources, CXX_FLAGS])],
                               capture_output=True, text=True)  # fmt: skip
        if child.returncode != 0:
            raise RuntimeError(child.stderr.strip() or f"the compiling process exited with {child.returncode}")
        _write_private(staging / RECORD, _record(staging / BINARY))
        (staging / BINARY).chmod(0o700)  # whatever the umask, or we would refuse it
        if _verified_binary(build_dir) is not None:  # published meanwhile, where no OS lock serialised us
            shutil.rmtree(staging, ignore_errors=True)
            return
        if build_dir.exists():  # a damaged build of ours, which nobody can be using: we hold the lock
            shutil.rmtree(build_dir)
        os.rename(staging, build_dir)
        build_dir.with_name(build_dir.name + ".log").unlink(missing_ok=True)  # an earlier failure's
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        log = build_dir.with_name(build_dir.name + ".log")
        try:
            _write_private(log, f"{error}\n")
            where = f"; the build's output is in {log}"
        except OSError:
            where = ""
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and compiling it failed{where}.\n{str(error)[-4000:]}\n{_FIX}"
        ) from error


def _check_compiler(why: str) -> None:
    """Fail at once, naming it, where there is no compiler: torch's build would say so only after ninja ran."""
    if sys.platform == "win32" and "VSCMD_ARG_TGT_ARCH" not in os.environ:
        return  # torch's build sets up Visual Studio's environment itself, so cl need not be on PATH yet
    words = shlex.split(os.environ.get("CXX", ""), posix=sys.platform != "win32")
    compiler = words[0] if words else ("cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and there is no C++ compiler ({compiler}) on PATH to "
            f"compile it.\n{_FIX}"
        )


def load_cached_or_compile(why: str) -> ModuleType:
    files = sources()
    if not files:
        raise ImportError(
            f"gradbridge_ext: the native operator {why}, and its C++ sources are not in "
            f"{PACKAGE_DIR / 'csrc'}.\n{_FIX}"
        )
    build_dir = cache_dir(files)
    binary = _verified_binary(build_dir)
    if binary is None:
        _check_compiler(why)
        try:
            build_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise _cache_error("create", build_dir.parent, error) from error
        with _build_lock(build_dir):
            binary = _verified_binary(build_dir)  # built while we waited?
            if binary is None:
                reason = _why_compile_now()
                if (build_dir / BINARY).exists():
                    reason = "the cached binary does not match what its build recorded: cut short?"
                _build(build_dir, files, why, reason)
                binary = build_dir / BINARY
    return _import_binary(binary)
