import pytest
import torch

from gradbridge_ext._extension import _minor

# CUDA cases are collected everywhere and skipped, visibly, where torch sees no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


# The one place a test asks which torch it runs on (gradbridge_ext.TESTED_TORCH
# is the range CI tests).
def torch_at_least(version: str) -> bool:
    return _minor(torch.__version__) >= _minor(version)


def requires_torch(version: str, why: str) -> pytest.MarkDecorator:
    """Skip, naming the reason, where the running torch is older than ``version``."""
    return pytest.mark.skipif(not torch_at_least(version), reason=f"needs torch {version}: {why}")
