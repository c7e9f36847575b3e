"""The install paths: never load a binary built for another torch, compile when needed, fail clearly.

These run real pip installs and a real compile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import gradbridge_ext
from gradbridge_ext import _build, _extension
from helpers import REPO, package_copy, source_copy

PROBE = (
    "import torch, gradbridge_ext as gb; "
    "t = torch.arange(3.0, requires_grad=True) * 2; r = gb.bridge(t); "
    "assert r.data_ptr() == t.data_ptr() and not r.requires_grad; "
    "print(gb.__file__); print(gb._C.__file__)"
)


def build_isolated(test: Callable) -> Callable:
    """pip's build isolation fetches setuptools from the registry, and the first import compiles."""
    return pytest.mark.network(pytest.mark.slow(test))


def run_probe(cwd: Path, cache: Path, pythonpath: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    """Import gradbridge_ext in a fresh interpreter; print where the package and _C came from."""
    # The native operator or an ImportError: these tests are about getting the former (test_fallback.py: the fallback).
    env = {**os.environ, _extension.CACHE_ENV: str(cache), _extension.REQUIRE_NATIVE_ENV: "1", **env_vars}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_this_checkout_loads_the_binary_built_for_this_torch() -> None:
    if not _extension.TORCH_VERSION_FILE.exists():
        pytest.skip("gradbridge_ext was not compiled at install time here")
    assert _extension.TORCH_VERSION_FILE.read_text() == torch.__version__
    assert Path(gradbridge_ext._C.__file__).parent == _build.PACKAGE_DIR


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`pip install .` with pip's build isolation (no torch at build time), then a first import."""
    root = tmp_path_factory.mktemp("plain_install")
    source = source_copy(root / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(root / "site"), str(source)],
        check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return root, run_probe(cwd=root, cache=root / "cache", pythonpath=root / "site")


@build_isolated
def test_plain_pip_install_compiles_on_first_import(plain_install) -> None:
    root, result = plain_install
    assert result.returncode == 0, result.stderr
    package_file, extension_file = result.stdout.split()
    assert Path(package_file).is_relative_to(root / "site")
    assert Path(extension_file).is_relative_to(root / "cache")
    assert f"compiling it for torch {torch.__version__}" in result.stderr


@build_isolated
def test_second_import_uses_the_cache_silently(plain_install) -> None:
    root, _ = plain_install
    result = run_probe(cwd=root, cache=root / "cache", pythonpath=root / "site")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.split()[1]).is_relative_to(root / "cache")
    assert "compiling" not in result.stderr


@build_isolated
def test_binary_built_for_another_torch_is_not_loaded(plain_install, tmp_path: Path) -> None:
    cache = plain_install[0] / "cache"
    compiled = next(cache.rglob("_C.so"))
    package = package_copy(tmp_path, with_sources=True)
    shutil.copy(compiled, package / "_C.so")

    (package / "_C.torch_version").write_text(torch.__version__)
    result = run_probe(cwd=tmp_path, cache=cache, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.split()[1]).parent == package  # the control: a match loads it

    (package / "_C.torch_version").write_text("0.0.1+another")
    result = run_probe(cwd=tmp_path, cache=cache, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.split()[1]).is_relative_to(cache)


@pytest.mark.parametrize("recorded", ["0.0.1+another", None], ids=["another torch", "no record"])
def test_the_loader_never_imports_a_binary_built_for_another_torch(
    recorded: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast tier's check of what test_binary_built_for_another_torch_is_not_loaded runs for real.
    record = tmp_path / "_C.torch_version"
    if recorded is not None:
        record.write_text(recorded)
    monkeypatch.setattr(_extension, "TORCH_VERSION_FILE", record)
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: pytest.fail(f"imported {name}"))
    monkeypatch.setattr(_extension, "load_cached_or_compile", lambda why: why)
    expected = "was not compiled at install time" if recorded is None else (
        f"was compiled against torch {recorded}, but torch {torch.__version__} is imported")
    assert _extension._load_native() == expected
    record.write_text(torch.__version__)  # the control: a binary for this torch is imported
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: name)
    assert _extension._load_native() == "gradbridge_ext._C"


def test_no_binary_and_no_sources_fails_with_a_fix(tmp_path: Path) -> None:
    package_copy(tmp_path, with_sources=False)
    result = run_probe(cwd=tmp_path, cache=tmp_path / "cache", pythonpath=tmp_path)
    assert result.returncode != 0
    assert "ImportError: gradbridge_ext: the native operator was not compiled at install time" in result.stderr
    assert "its C++ sources are not in" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_failed_compile_fails_with_a_fix(tmp_path: Path) -> None:
    package_copy(tmp_path, with_sources=True)
    result = run_probe(cwd=tmp_path, cache=tmp_path / "cache", pythonpath=tmp_path, CXX="/bin/false")
    assert result.returncode != 0
    assert "compiling it failed" in result.stderr
    assert "install a C++ compiler and ninja" in result.stderr


@build_isolated
def test_the_same_sources_elsewhere_load_the_cached_build(plain_install, tmp_path: Path) -> None:
    # The cache is keyed by content, not by where the sources sit: a second copy compiles nothing.
    root = plain_install[0]
    package_copy(tmp_path, with_sources=True)
    result = run_probe(cwd=tmp_path, cache=root / "cache", pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compiling" not in result.stderr
    assert Path(result.stdout.split()[1]).is_relative_to(root / "cache")


def test_a_compile_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path))
    build_dir = _build.cache_dir(_build.sources())
    assert _build._why_compile_now() == "first use"
    other_torch = tmp_path / "torch-0.0.1-py30-0123456789abcdef"
    other_torch.mkdir()
    (other_torch / "_C.so").touch()
    assert _build._why_compile_now().startswith("the cached builds are for another torch")
    other_sources = tmp_path / (build_dir.name[:-16] + "0123456789abcdef")
    other_sources.mkdir()
    (other_sources / "_C.so").touch()
    assert _build._why_compile_now() == "the sources changed since the cached build"


def test_the_cache_key_is_the_content_not_the_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_extension.CACHE_ENV, str(tmp_path / "cache"))
    files = _build.sources()
    copies = []
    for place in ("one", "two"):
        shutil.copytree(files[0].parent, tmp_path / place)
        copies.append([tmp_path / place / path.name for path in files])
    assert _build.cache_dir(copies[0]) == _build.cache_dir(copies[1]) == _build.cache_dir(files)
    copies[1][0].write_text(copies[1][0].read_text() + "\n// a change\n")
    assert _build.cache_dir(copies[1]) != _build.cache_dir(copies[0])


@build_isolated
def test_a_compiled_on_import_module_has_the_package_name(plain_install) -> None:
    root, _ = plain_install
    result = subprocess.run(
        [sys.executable, "-c", "import gradbridge_ext as gb; print(gb._C.__name__)"],
        cwd=root, env={**os.environ, _extension.CACHE_ENV: str(root / "cache"), "PYTHONPATH": str(root / "site")},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gradbridge_ext._C"


def test_the_tested_range_is_the_matrix_in_ci_torch_versions() -> None:
    # .ci/torch-versions is the one place; the package and pyproject.toml must say the same.
    import tomllib

    versions = {line.split()[0]: line.split()[1:] for line in (REPO / ".ci" / "torch-versions").read_text().splitlines()
                if line.strip() and not line.startswith("#")}  # fmt: skip
    matrix = [".".join(version.split(".")[:2]) for version in versions["matrix"]]
    assert gradbridge_ext.TESTED_TORCH == (matrix[0], matrix[-1])
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={matrix[0]}" in dependencies


def test_an_untested_newer_torch_warns_naming_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    oldest, newest = gradbridge_ext.TESTED_TORCH
    major, minor = newest.split(".")
    monkeypatch.setattr(torch, "__version__", f"{major}.{int(minor) + 1}.0")
    tested = rf"tested with torch {re.escape(oldest)} to {re.escape(newest)}; torch {major}\.{int(minor) + 1}\.0 is newer"
    with pytest.warns(UserWarning, match=tested):
        _extension._warn_if_untested_torch()
    for version in (oldest, f"{newest}.9", f"{newest}.0+cu130"):  # tested releases, any patch or build
        monkeypatch.setattr(torch, "__version__", version)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _extension._warn_if_untested_torch()


@pytest.mark.slow  # a venv of its own
def test_a_too_old_setuptools_names_the_fix(tmp_path: Path) -> None:
    # A new venv has the setuptools its Python bundles (65.5 for 3.11), too old for
    # pyproject.toml's license string; the build must say what to install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    version = subprocess.run([python, "-c", "import setuptools; print(setuptools.__version__)"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    if not version or int(version.split(".")[0]) >= 77:
        pytest.skip(f"this Python's venv brings setuptools {version or 'none'}, not an old one")
    result = subprocess.run(
        [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", str(source_copy(tmp_path / "source"))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"needs setuptools>=77 to build (found {version})" in result.stdout + result.stderr


def test_the_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert gradbridge_ext.__version__ == version("gradbridge_ext")
