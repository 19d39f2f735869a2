"""Calibration and evaluation data: array files, images, and the index that streams them in batches.

Modules: ``formats`` (``.npy`` / ``.npz`` headers, memory maps, dtypes), ``images`` (decoding and
normalising image files), ``index`` (data files indexed against the model's inputs, read back one at a time),
``calibration`` (``CalibrationData``, ``load_calibration``), ``batches`` (the ``Batches`` protocol every run
reads samples through), ``for_model`` (the data of one model: calibration, its float32 cast, training data).
A model input's spec is ``graph.ir.TensorSpec`` (``InputSpec`` is the same type, under its old name).
"""
from __future__ import annotations

from ..graph.ir import TensorSpec
from .calibration import CalibrationData, load_calibration, model_input_specs
from .images import IMAGE_EXTENSIONS, ImageOptions
from .index import DATA_EXTENSIONS

InputSpec = TensorSpec

__all__ = [
    "InputSpec",
    "TensorSpec",
    "ImageOptions",
    "CalibrationData",
    "model_input_specs",
    "load_calibration",
    "IMAGE_EXTENSIONS",
    "DATA_EXTENSIONS",
]
