"""Every OS, with or without a compiler: the loader without POSIX, and the pure-Python fallback.

Windows has no ``fcntl`` and no ``os.getuid``, names its binaries ``.pyd`` and
builds with MSVC; a machine without a compiler cannot build at all. Each case
imports a copy of the package in a fresh interpreter with that platform
simulated: the modules removed, ``sys.platform`` set after torch is imported
(torch itself must load as Linux's), no compiler on PATH. The fallback's
semantics are the suite's own: tests/test_bridge.py, test_backward_family.py,
test_straight_through.py and test_compiled_gradients.py run on both
implementations (conftest.implementation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradbridge_ext
from gradbridge_ext import _build, _extension
from conftest import requires_torch, torch_at_least
from helpers import REPO, package_copy, source_copy

# filelock and torch's build tools are imported first: on Windows they take branches of
# their own (filelock locks with msvcrt, which Linux has not; torch 2.1's cpp_extension
# imports os.getuid on Linux), so here they keep what they need, and only ours goes without.
NO_POSIX = ("import filelock, torch.utils.cpp_extension, os, sys; "
            "sys.modules['fcntl'] = None; del os.getuid; ")  # None: `import fcntl` raises
WINDOWS = NO_POSIX + "import torch; sys.platform = 'win32'; "
PROBE = (
    "import warnings; warnings.simplefilter('always'); "
    "import torch, gradbridge_ext as gb; from gradbridge_ext import _build, _extension; "
    "a = torch.arange(3.0, requires_grad=True); t = a * 2; r = gb.bridge(t, -0.5); "
    "assert r.data_ptr() == t.data_ptr() and torch.equal(r, t); r.sum().backward(); "
    "assert a.grad.tolist() == [-1.0, -1.0, -1.0], a.grad; "
    "print(gb.NATIVE, _extension.BINARY, _build.cache_root())"
)
FALLBACK = "using the pure-Python fallback, not the native operator"


def import_with(tmp_path: Path, prelude: str = "", **env_vars: str) -> subprocess.CompletedProcess:
    """Import a copy of the package (sources, no binary) in a fresh interpreter after ``prelude``."""
    site = tmp_path / "site"
    if not site.exists():
        package_copy(site, with_sources=True)
    env = {**os.environ, _extension.REQUIRE_NATIVE_ENV: None, "PYTHONPATH": str(site),
           _extension.CACHE_ENV: str(tmp_path / "cache"), **env_vars}  # fmt: skip
    env = {name: value for name, value in env.items() if value is not None}
    return subprocess.run([sys.executable, "-c", prelude + PROBE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def no_compiler_on_path(tmp_path: Path) -> dict[str, str]:
    """PATH with only this Python's folder (pip, ninja), and no CXX."""
    return {"PATH": str(Path(sys.executable).parent), "CXX": None}  # type: ignore[dict-item]


@pytest.mark.slow  # a cold build
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler on PATH")
def test_without_fcntl_and_getuid_the_import_builds_and_loads_the_native_operator(tmp_path: Path) -> None:
    # Before: ModuleNotFoundError: import of fcntl halted; None in sys.modules.
    result = import_with(tmp_path, NO_POSIX)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "True", result.stderr[-3000:]
    assert FALLBACK not in result.stderr
    (binary,) = (tmp_path / "cache").glob("*/_C.so")
    assert "-user-" in binary.parent.name  # who built it, where there is no uid: the login name


def test_without_a_compiler_the_import_warns_once_and_runs_the_fallback(tmp_path: Path) -> None:
    # Before: ImportError: ... compiling it failed ... install a C++ compiler.
    result = import_with(tmp_path, **no_compiler_on_path(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "False"
    assert result.stderr.count(FALLBACK) == 1
    assert "there is no C++ compiler (c++) on PATH" in result.stderr
    assert "install a C++ compiler and ninja" in result.stderr  # the fix
    assert f"Set {_extension.REQUIRE_NATIVE_ENV}=1 to make this an error" in result.stderr


def test_a_required_native_operator_fails_the_import_instead(tmp_path: Path) -> None:
    result = import_with(tmp_path, **no_compiler_on_path(tmp_path), **{_extension.REQUIRE_NATIVE_ENV: "1"})
    assert result.returncode == 1
    assert "ImportError: gradbridge_ext: the native operator was not compiled at install time, and there is no C++ compiler" in result.stderr
    assert FALLBACK not in result.stderr


def test_a_failed_build_warns_with_its_log(tmp_path: Path) -> None:
    result = import_with(tmp_path, CXX="/bin/false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "False" and result.stderr.count(FALLBACK) == 1
    (log,) = (tmp_path / "cache").glob("*.log")
    assert f"compiling it failed; the build's output is in {log}" in result.stderr
    assert "/bin/false" in log.read_text()  # what the build said


def test_simulated_windows_imports_and_names_msvc(tmp_path: Path) -> None:
    # Before: ModuleNotFoundError (fcntl). Here no cl.exe can run, so the import
    # must end in the fallback, with Windows' binary name and cache folder.
    # VSCMD_ARG_TGT_ARCH: a Visual Studio prompt's, where cl must be on PATH (elsewhere torch's build finds it).
    result = import_with(tmp_path, WINDOWS, LOCALAPPDATA=str(tmp_path / "local"), VSCMD_ARG_TGT_ARCH="x64",
                         **{_extension.CACHE_ENV: ""})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    native, binary, root = result.stdout.split()
    assert (native, binary, root) == ("False", "_C.pyd", str(tmp_path / "local" / "gradbridge_ext" / "Cache"))
    assert "there is no C++ compiler (cl) on PATH" in result.stderr and result.stderr.count(FALLBACK) == 1


def test_an_install_without_a_compiler_ships_the_sources_and_imports(tmp_path: Path) -> None:
    # `pip install --no-build-isolation .`, the README's line, on a machine without a compiler.
    env = {**os.environ, **no_compiler_on_path(tmp_path)}
    env = {name: value for name, value in env.items() if value is not None}
    env.pop(_extension.REQUIRE_NATIVE_ENV, None)
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
               "--target", str(tmp_path / "site"), str(source_copy(tmp_path / "source"))]  # fmt: skip
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list((tmp_path / "site" / "gradbridge_ext").glob("_C*"))  # no binary, no version record
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env={**env, "PYTHONPATH": str(tmp_path / "site"), _extension.CACHE_ENV: str(tmp_path / "cache")})  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split()[0] == "False" and probe.stderr.count(FALLBACK) == 1

    required = subprocess.run(install, env={**env, _extension.REQUIRE_NATIVE_ENV: "1"}, capture_output=True, text=True, timeout=900)
    assert required.returncode != 0  # CI's install fails loudly instead, naming the compile
    assert "compiling the operator failed" not in required.stderr and "subprocess-exited-with-error" in required.stderr


@pytest.mark.parametrize(
    ("platform", "env", "root"),
    [
        ("linux", {}, "~/.cache/gradbridge_ext"),
        ("linux", {"XDG_CACHE_HOME": "/x"}, "/x/gradbridge_ext"),
        ("darwin", {"XDG_CACHE_HOME": "/x"}, "~/Library/Caches/gradbridge_ext"),
        ("win32", {"LOCALAPPDATA": "/l"}, "/l/gradbridge_ext/Cache"),
        ("win32", {}, "~/AppData/Local/gradbridge_ext/Cache"),
        ("win32", {_extension.CACHE_ENV: "/mine", "LOCALAPPDATA": "/l"}, "/mine"),
    ],
)
def test_the_cache_root_follows_the_platform(platform: str, env: dict[str, str], root: str) -> None:
    assert _build._cache_root_and_setting(env, platform)[0] == Path(root).expanduser()


def test_the_binary_name_and_flags_follow_the_platform() -> None:
    assert [_build.binary_name(p) for p in ("linux", "darwin", "win32")] == ["_C.so", "_C.so", "_C.pyd"]
    assert _build.compile_flags("win32") == ["/O2", "/DNDEBUG"]
    assert _build.compile_flags("linux") == _build.compile_flags("darwin") == ["-O3", "-DNDEBUG", "-g0"]


def test_without_a_uid_only_links_are_untrusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "binary"
    mine.write_text("")
    mine.chmod(0o777)  # what Windows' stat reports says nothing of its ACLs
    (tmp_path / "link").symlink_to(mine)
    monkeypatch.delattr(os, "getuid")
    assert _build._untrusted(mine) is None
    assert _build._untrusted(tmp_path / "link") == "is a symbolic link"


# --- what the fallback refuses, in this process (conftest.implementation swaps it in)

fallback_only = pytest.mark.parametrize("implementation", ["fallback"], indirect=True)


@fallback_only
@requires_torch("2.5", "torch.export's strict and non-strict modes")
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_the_fallback_refuses_an_export_that_would_drop_a_backward(implementation: str, strict: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), gradbridge_ext.Bridge(-1.0))
    with pytest.raises(Exception) as refused:
        torch.export.export(model, (torch.ones(2, 3),), strict=strict)
    chain = [refused.value]  # dynamo (torch 2.5) wraps it
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    expected = "keeps this call's backward only through the native operator"
    if strict and not torch_at_least("2.6"):
        expected = "Observed exception"  # torch 2.5's dynamo reraises it so, without its text
    assert any(expected in str(e) for e in chain), chain
    with torch.no_grad():  # for inference it exports, and the values are eager's
        exported = torch.export.export(model, (torch.ones(2, 3),), strict=strict)
    assert torch.equal(exported.module()(torch.ones(2, 3)), model(torch.ones(2, 3)))


@fallback_only
def test_the_fallback_refuses_torchscript_by_name(implementation: str) -> None:
    with pytest.raises(RuntimeError, match="TorchScript calls torch.ops.gradbridge.bridge, which only the native"):
        torch.jit.script(torch.nn.Sequential(gradbridge_ext.Bridge(-1.0)))


@fallback_only
def test_the_fallback_serves_torch_func(implementation: str) -> None:
    grad = torch.func.grad(lambda x: gradbridge_ext.bridge(x, -0.5).sum())(torch.ones(3))
    assert grad.tolist() == [-0.5] * 3
    per_row = torch.func.vmap(torch.func.grad(lambda x: gradbridge_ext.straight_through(x, x.round(), 2.0).sum()))
    assert torch.equal(per_row(torch.rand(4, 3)), torch.full((4, 3), 2.0))


SEMANTICS = ["test_bridge.py", "test_backward_family.py", "test_straight_through.py", "test_compiled_gradients.py"]


@pytest.mark.slow  # the semantics files a second time; the fast tier runs their fallback cases in this process
def test_the_semantics_tests_pass_in_a_process_without_the_native_operator(tmp_path: Path) -> None:
    # In this process the fallback is swapped in beside a registered operator; a
    # process that never had one (a copy of the package without binary or sources)
    # is what a machine without a compiler runs, so the fallback's cases run there too.
    package_copy(tmp_path / "site", with_sources=False)
    tests = REPO / "tests"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), _extension.CACHE_ENV: str(tmp_path / "cache")}
    env.pop(_extension.REQUIRE_NATIVE_ENV, None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
               "--rootdir", str(REPO), "-k", "fallback and not inductor and not dynamic", *(str(tests / f) for f in SEMANTICS)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-5000:]
    assert " passed" in result.stdout.splitlines()[-1]
