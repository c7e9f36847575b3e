"""The compile-on-import cache survives crashes and other users (issue 16, docs/install.md).

A killed build leaves no lock that blocks the next import; concurrent cold imports
build once; a binary cut short is rebuilt, never loaded; a folder another user could
have written is refused; an unwritable cache names the setting and the fix. Each
import runs in a fresh interpreter from a copy of the package with its sources and
no binary, so it compiles (20 to 60 s on two cores): the cold builds are shared
through a module-scoped fixture, and every wait has a timeout, so a regression to
hanging fails instead of stalling CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradbridge_ext import _build, _extension
from helpers import package_copy

# A cold import compiles once: 20 s on an idle 2-core machine, up to 3 minutes on a loaded one.
IMPORT_TIMEOUT_S = 300
RANKS = 4  # torchrun --nproc-per-node 4 after a plain `pip install .`


def start_import(site: Path, env: dict[str, str]) -> subprocess.Popen:
    """``import gradbridge_ext`` from ``site`` in a fresh interpreter of its own process group."""
    env = {**os.environ, "PYTHONPATH": str(site), _extension.REQUIRE_NATIVE_ENV: "1", **env}  # no fallback here
    code = "import gradbridge_ext as gb; print(gb._C.__file__)"
    return subprocess.Popen([sys.executable, "-c", code], cwd=site, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = IMPORT_TIMEOUT_S) -> tuple[int | None, str, str]:
    """Its exit status, stdout and stderr; None, after killing it, if it ran past ``timeout``."""
    try:
        out, err = process.communicate(timeout=max(timeout, 1))
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return None, out, err


def import_once(site: Path, **env: str) -> tuple[int | None, str, str]:
    return finish(start_import(site, env))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    package_copy(site, with_sources=True)
    return site


@pytest.fixture(scope="module")
def killed_then_concurrent(site: Path, tmp_path_factory: pytest.TempPathFactory):
    """A cold import SIGKILLed mid-compile, then RANKS imports at once into the same cache."""
    cache = tmp_path_factory.mktemp("cache") / "root"
    first = start_import(site, {_extension.CACHE_ENV: str(cache)})
    deadline = time.monotonic() + IMPORT_TIMEOUT_S
    while not any(cache.rglob("build.ninja")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into the compiler
    os.killpg(first.pid, signal.SIGKILL)  # the import and its ninja and compilers, as the OOM killer would
    first.communicate()
    ranks = [start_import(site, {_extension.CACHE_ENV: str(cache)}) for _ in range(RANKS)]
    deadline = time.monotonic() + IMPORT_TIMEOUT_S  # one for all: they run at once
    return cache, first.returncode, [finish(rank, deadline - time.monotonic()) for rank in ranks]


@pytest.mark.slow  # cold builds
def test_an_import_killed_mid_compile_does_not_block_the_next(killed_then_concurrent) -> None:
    cache, killed, ranks = killed_then_concurrent
    assert killed == -signal.SIGKILL  # killed, not finished: the build was cut off
    for status, _, err in ranks:
        assert status is not None, f"an import still waited after {IMPORT_TIMEOUT_S} s: {err[-2000:]}"
        assert status == 0, err


@pytest.mark.slow  # cold builds
def test_concurrent_cold_imports_build_once_and_all_load_it(killed_then_concurrent) -> None:
    cache, _, ranks = killed_then_concurrent
    assert [status for status, _, _ in ranks] == [0] * RANKS, [err[-2000:] for _, _, err in ranks]
    assert sum("compiling it" in err for _, _, err in ranks) == 1
    (binary,) = cache.glob("*/_C.so")
    assert not list(cache.glob("*.tmp-*"))  # the killed build's staging folder is gone too
    assert {out.strip() for _, out, _ in ranks} == {str(binary)}


@pytest.mark.slow  # cold builds
def test_the_cache_folders_are_private(killed_then_concurrent) -> None:
    cache, _, _ = killed_then_concurrent
    (binary,) = cache.glob("*/_C.so")
    for path in (cache, binary.parent):
        assert path.stat().st_mode & 0o777 == 0o700, path


@pytest.mark.slow  # cold builds
def test_a_binary_cut_short_is_rebuilt_not_loaded(killed_then_concurrent, site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(killed_then_concurrent[0], cache)
    (binary,) = cache.glob("*/_C.so")
    whole = binary.read_bytes()
    binary.write_bytes(whole[: len(whole) // 2])  # as a killed linker or a full disk leaves it
    status, out, err = import_once(site, **{_extension.CACHE_ENV: str(cache)})
    assert status == 0, err  # before: SIGBUS, exit 135
    assert "does not match what its build recorded" in err
    assert out.strip() == str(binary) and _build._verified_binary(binary.parent) == binary


@pytest.mark.parametrize("planter", ["another user", "you, writable by all"])
def test_a_folder_another_user_could_have_written_is_never_loaded(
    planter: str, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the planted library")
    if planter == "another user" and os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user (CI runs as root)")
    cache = tmp_path / "cache"
    monkeypatch.setenv(_extension.CACHE_ENV, str(cache))
    planted = _build.cache_dir(_build.sources())  # the name is predictable: that is the attack
    planted.mkdir(parents=True)
    (tmp_path / "planted.c").write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        '  FILE *f = fopen(getenv("PLANTED_MARKER"), "w");\n'
        '  if (f) { fputs("the planted library ran\\n", f); fclose(f); }\n}\n'
    )
    subprocess.run([compiler, "-shared", "-fPIC", "-o", planted / "_C.so", tmp_path / "planted.c"], check=True, timeout=60)
    (planted / _build.RECORD).write_text(_build._record(planted / "_C.so"))  # a matching record: only trust is left
    for path in (cache, planted, planted / "_C.so", planted / _build.RECORD):
        if planter == "another user":
            os.chown(path, 65534, 65534)  # nobody
        path.chmod(0o777)
    # The control: loading it runs its code.
    control = tmp_path / "control"
    loads = [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(planted / '_C.so')!r})"]
    subprocess.run(loads, env={**os.environ, "PLANTED_MARKER": str(control)}, check=True, timeout=60)
    assert control.exists()

    marker = tmp_path / "marker"
    status, _, err = import_once(site, **{_extension.CACHE_ENV: str(cache), "PLANTED_MARKER": str(marker)})
    assert not marker.exists()
    assert status == 1
    assert f"ImportError: gradbridge_ext: refusing to load the cached operator in {planted}" in err
    assert ("is owned by uid 65534" if planter == "another user" else "is writable by others") in err
    assert _extension.CACHE_ENV in err


@pytest.mark.parametrize("setting", [_extension.CACHE_ENV, "XDG_CACHE_HOME"])
def test_an_unwritable_cache_names_the_setting_and_the_fix(setting: str, site: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a file"
    not_a_folder.touch()  # root may write anywhere, but not inside a file
    env = {"HOME": str(not_a_folder), "XDG_CACHE_HOME": str(not_a_folder), _extension.CACHE_ENV: ""}
    if setting == _extension.CACHE_ENV:
        env[_extension.CACHE_ENV] = str(not_a_folder / "cache")
    status, _, err = import_once(site, **env)
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: gradbridge_ext: cannot create {not_a_folder}/")
    assert f"chosen by ${setting}" in last and f"Set {_extension.CACHE_ENV} to a folder you can write" in last


def test_the_cache_lives_where_the_settings_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(_extension.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert _build.cache_root() == tmp_path / "home" / ".cache" / "gradbridge_ext"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec says to ignore it
    assert _build.cache_root() == tmp_path / "home" / ".cache" / "gradbridge_ext"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == tmp_path / "xdg" / "gradbridge_ext"
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path / "mine"))
    assert _build.cache_root() == tmp_path / "mine"


def test_a_wait_for_another_build_is_bounded_and_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    build_dir = tmp_path / "torch-build"
    with open(tmp_path / "torch-build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: flock makes even this process wait
        monkeypatch.setattr(_build, "BUILD_WAIT_S", 1.0)
        with pytest.raises(ImportError, match=f"gave up after 1 s .* in {build_dir} .* set {_extension.CACHE_ENV}"):
            with _build._build_lock(build_dir):
                pass
    with _build._build_lock(build_dir):  # released with its holder's file
        pass
