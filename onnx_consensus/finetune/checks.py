"""The checks a fine-tuning run makes before any work, each an InputError of one line: torch installed, the
options usable (epochs, batch, device, AMP), the teacher the model the student was pruned from."""
from __future__ import annotations

import onnx

from ..errors import InputError

__all__ = ["TORCH_HINT", "check_config", "check_teacher", "require_torch"]

TORCH_HINT = "fine-tuning needs PyTorch: pip install 'onnx-consensus[torch]' (CPU build: pip install torch==2.13.0)"


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError(TORCH_HINT) from None


def check_config(config, *, world_size: int = 1) -> None:
    """InputError (one line) for options no run could use: epochs < 1, a batch that does not split over
    ``world_size`` ranks, an unusable ``device`` / ``amp``. Needs torch (``require_torch`` first)."""
    from .recipe import training_device

    if config.epochs < 1:
        raise InputError(f"--finetune-epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise InputError(f"--ft-batch-size must be >= 1, got {config.batch_size}")
    if config.batch_size % world_size:
        raise InputError(f"--ft-batch-size {config.batch_size} is the global batch and must split evenly over "
                         f"{world_size} processes")
    training_device(config)


def check_teacher(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    """The teacher must take the student's inputs (by name) and give its first output's class count."""
    s_in = {i.name for i in student.graph.input} - {t.name for t in student.graph.initializer}
    t_in = {i.name for i in teacher.graph.input} - {t.name for t in teacher.graph.initializer}
    if s_in != t_in:
        raise InputError(f"--teacher takes inputs {sorted(t_in)} but the model takes {sorted(s_in)}: "
                         "the teacher must be the model the input was pruned from")
    if teacher.graph.output[0].name != student.graph.output[0].name:
        raise InputError(f"--teacher's first output is {teacher.graph.output[0].name!r}, the model's is "
                         f"{student.graph.output[0].name!r}: the teacher must be the model the input was pruned from")
