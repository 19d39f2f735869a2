"""Fixtures shared by the CLI-level tests."""
import numpy as np
import onnx
import pytest
from threadpoolctl import threadpool_limits

from tests.helpers import resnet_onnx


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    """(model path, calibration dir): a ResNet-20 (BN folded) file and 40 random 3x32x32 samples."""
    d = tmp_path_factory.mktemp("r20")
    path = d / "r20.onnx"
    onnx.save(resnet_onnx(20, "folded"), path)
    calib = d / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32))
    return path, calib


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small matrices: BLAS threads only contend for the two (possibly shared) cores."""
    with threadpool_limits(1):
        yield
