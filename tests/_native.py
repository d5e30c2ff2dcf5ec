"""What the native-kernel test modules share: the compiler marker and the CPU-path fixture."""

from __future__ import annotations

import shutil

import pytest
import torch

from salgl import native

# Where a C compiler exists (CI included) the native kernels must build: a broken build fails the
# tests instead of silently falling back. Building runs the compiler in a subprocess, so these are
# integration tests.
NATIVE_MARKS = (
    pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"),
    pytest.mark.integration,
)


def needs_compiler(test):
    """Marks a test that builds or runs the native kernels (``NATIVE_MARKS``)."""
    for mark in NATIVE_MARKS:
        test = mark(test)
    return test


@pytest.fixture(params=["torch", pytest.param("native", marks=NATIVE_MARKS)])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a float32 test on the PyTorch path and on the native kernels."""
    monkeypatch.setenv("SALGL_NATIVE_KERNELS", "1" if request.param == "native" else "0")
    assert native.usable(torch.zeros(1)) == (request.param == "native")
    return request.param
