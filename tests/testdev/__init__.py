"""The test device: testdev.cpp built as an extension and plugged into torch as "testdev".

torch lets a process plug in one such backend (PrivateUse1): ``load`` builds and
registers it once (conftest's ``test_device`` fixture, benchmarks/plugged.py).
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

NAME = "testdev"


def load(build_directory: Path) -> str:
    """Build the backend, register it as PrivateUse1 under NAME, and return NAME; once a process."""
    from torch.utils import cpp_extension

    if torch._C._get_privateuse1_backend_name() == NAME:  # loaded already (the tests, then the benchmark)
        return NAME

    backend = cpp_extension.load("gradbridge_testdev", [str(Path(__file__).with_name("testdev.cpp"))],
                                 build_directory=str(build_directory))  # fmt: skip
    backend.register_hooks()
    torch.utils.rename_privateuse1_backend(NAME)
    # What torch asks of a device's Python module (torch.testdev) for factories and autograd.
    module = types.ModuleType(NAME)
    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: 0
    module._is_in_bad_fork = lambda: False
    module.manual_seed_all = lambda seed: None
    module.get_rng_state = lambda device=NAME: torch.empty(0, dtype=torch.uint8)  # no RNG of its own (CPU's serves)
    module.set_rng_state = lambda state, device=NAME: None
    torch._register_device_module(NAME, module)
    return NAME
