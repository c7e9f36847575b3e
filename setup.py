"""Build gradbridge_ext.

With torch importable (`pip install --no-build-isolation .`), the operator is
compiled now, against that torch, and the torch version is recorded beside it.
Without (plain `pip install .`, which builds in an isolated environment with no
torch), only the sources are packaged and the operator compiles on first
import. Either way the C++ sources ship inside the package, so a later change
of torch recompiles instead of loading a stale binary.
"""

import glob
import importlib.util
import os
import sys

import setuptools
from setuptools import setup

PACKAGE = "gradbridge_ext"
EXTENSION = f"{PACKAGE}._C"

# pyproject.toml's SPDX license string needs setuptools 77; an older one fails
# with "invalid pyproject.toml config: `project.license`", which names no fix.
if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (77, 0):
    sys.exit(
        f"{PACKAGE} needs setuptools>=77 to build (found {setuptools.__version__}): "
        "pip install 'setuptools>=77' (torch 2.1 also needs 'setuptools<81')"
    )

setup_args = dict(
    packages=[PACKAGE, f"{PACKAGE}.csrc"],
    package_dir={f"{PACKAGE}.csrc": "csrc"},
    package_data={PACKAGE: ["py.typed"], f"{PACKAGE}.csrc": ["*.cpp", "*.h"]},
)

# pip asks for the metadata in a process of its own (dist_info, egg_info), which
# needs no torch; importing torch there would slow every build.
METADATA_ONLY = len(sys.argv) > 1 and sys.argv[1] in ("dist_info", "egg_info")

if not METADATA_ONLY:
    try:
        import torch
    except ImportError:
        print(
            f"{PACKAGE}: torch is not importable in this build environment (pip's build isolation?); "
            "packaging the sources only, they compile on first import. "
            "`pip install --no-build-isolation .` compiles now instead.",
            file=sys.stderr,
        )
    else:
        # torch is here, so a failure to load its build tools is a real error: say which.
        try:
            from torch.utils.cpp_extension import BuildExtension, CppExtension
        except ImportError as error:
            hint = ""
            if error.name == "pkg_resources":
                hint = (
                    f" torch {torch.__version__}'s cpp_extension imports pkg_resources, which setuptools 81 "
                    "removed: this torch needs 'setuptools<81'."
                )
            sys.exit(f"{PACKAGE}: cannot import torch.utils.cpp_extension: {error!r}.{hint}")

        # The build's facts (flags, the version file), read from _build.py without importing the package.
        spec = importlib.util.spec_from_file_location("_gradbridge_build", f"{PACKAGE}/_build.py")
        loader = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loader)

        class BuildExtensionForThisTorch(BuildExtension):
            """Build the operator and record which torch it was built against.

            Where it cannot be built (no compiler, a failed compile), the install goes on
            with the sources, as one without torch does: the import compiles them, or warns
            and runs the pure-Python fallback. GRADBRIDGE_EXT_REQUIRE_NATIVE=1 (CI, make test)
            makes the failure the install's.
            """

            built = False

            # NB: the whole step, not one extension's build: torch 2.1 looks for the
            # compiler (`which c++`) before it builds any.
            def build_extensions(self):
                try:
                    super().build_extensions()
                    self.built = True
                except Exception as error:
                    if loader.flag_from_environment(loader.REQUIRE_NATIVE_ENV):
                        raise
                    print(
                        f"{PACKAGE}: compiling the operator failed, so the install ships its sources only "
                        f"(the import compiles them, or warns and runs the pure-Python fallback; "
                        f"{loader.REQUIRE_NATIVE_ENV}=1 makes this an error): {type(error).__name__}: {error}",
                        file=sys.stderr,
                    )

            def copy_extensions_to_source(self):  # an editable install's copy of what was built
                if self.built:
                    super().copy_extensions_to_source()

            def run(self):
                # NB: a binary left in build/ by an earlier build, for whatever torch, is
                # what setuptools would package if this build's link failed, or skip
                # this build as "up-to-date": ship only what this build links.
                self.force = True
                stale = self.get_ext_fullpath(EXTENSION)
                if os.path.exists(stale):
                    os.remove(stale)
                super().run()
                folder = os.path.dirname(self.get_ext_fullpath(EXTENSION))
                record = os.path.join(folder, loader.TORCH_VERSION_FILE.name)
                if not self.built:  # a binary left from an earlier build is for who knows which torch
                    if os.path.exists(record):
                        os.remove(record)
                    return
                with open(record, "w") as f:
                    f.write(torch.__version__)

        # NB: a CppExtension also for a CUDA torch. The operator moves no data, so it
        # has no .cu source: its CUDA kernel is registered from C++ and needs no nvcc.
        # A CUDAExtension would link -lcudart, which fails on a machine with nvcc but
        # without the CUDA runtime libraries. The flags are the compile-on-import path's.
        extension = CppExtension(EXTENSION, sorted(glob.glob("csrc/*.cpp")), extra_compile_args=loader.CXX_FLAGS)
        setup_args.update(ext_modules=[extension], cmdclass={"build_ext": BuildExtensionForThisTorch})

setup(**setup_args)
