"""Kernel-test setup: Triton's CPU interpreter, Inductor's cache in the repo, device/backend fixtures.

The environment defaults must precede any import of triton (the lead's tests/conftest.py sets the
same ones). On a CUDA machine run with ``TRITON_INTERPRET=0`` to test the compiled kernels.
"""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "inductor"))

import pytest  # noqa: E402

from kernel_helpers import BACKENDS, DEVICES, INTERPRETED  # noqa: E402

from dittofx.kernels import TRITON_AVAILABLE  # noqa: E402


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, device: str) -> str:
    if request.param == "triton" and not (TRITON_AVAILABLE and (device == "cuda" or INTERPRETED)):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    return request.param
