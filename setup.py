"""Build gradbridge_ext.

With torch importable (`pip install --no-build-isolation .`), the operator is
compiled now, against that torch, and the torch version is recorded beside it.
Without (plain `pip install .`, which builds in an isolated environment with no
torch), only the sources are packaged and the operator compiles on first
import. Either way the C++ sources ship inside the package, so a later change
of torch recompiles instead of loading a stale binary.
"""

import glob
import os
import sys

from setuptools import setup

PACKAGE = "gradbridge_ext"
EXTENSION = f"{PACKAGE}._C"
TORCH_VERSION_FILE = "_C.torch_version"  # read by gradbridge_ext/_extension.py

setup_args = dict(
    packages=[PACKAGE, f"{PACKAGE}.csrc"],
    package_dir={f"{PACKAGE}.csrc": "csrc"},
    package_data={PACKAGE: ["py.typed"], f"{PACKAGE}.csrc": ["*.cpp", "*.h", "cuda/*.cu"]},
)

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    print(
        f"{PACKAGE}: torch is not importable in this build environment (pip's build isolation?); "
        "packaging the sources only, they compile on first import. "
        "`pip install --no-build-isolation .` compiles now instead.",
        file=sys.stderr,
    )
else:

    class BuildExtensionForThisTorch(BuildExtension):
        """Build the operator and record which torch it was built against."""

        def run(self):
            super().run()
            folder = os.path.dirname(self.get_ext_fullpath(EXTENSION))
            with open(os.path.join(folder, TORCH_VERSION_FILE), "w") as f:
                f.write(torch.__version__)

    # The operator moves no data, so there is no .cu source today; the CUDA build
    # only differs in what it links against. csrc/cuda/*.cu is where one would go.
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # The same flags as the compile-on-import path (gradbridge_ext/_extension.py).
    flags = {"cxx": ["-O3", "-DNDEBUG"], "nvcc": ["-O3", "-DNDEBUG"]}
    if torch.version.cuda and CUDA_HOME:
        extension = CUDAExtension(EXTENSION, sources + cuda_sources, extra_compile_args=flags)
    else:
        extension = CppExtension(EXTENSION, sources, extra_compile_args=flags["cxx"])
    setup_args.update(ext_modules=[extension], cmdclass={"build_ext": BuildExtensionForThisTorch})

setup(**setup_args)
