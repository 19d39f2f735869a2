"""One small hierarchy of errors; the CLI turns each into one line and an exit code."""


class ConsensusError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(ConsensusError):
    """Bad model file, bad calibration data, bad option value (exit 2)."""

    exit_code = 2


class TargetError(ConsensusError):
    """The requested target (blocks, MACs fraction, fidelity) cannot be met (exit 3)."""

    exit_code = 3


class FinetuneError(ConsensusError):
    """Fine-tuning failed; the pruned model is kept (exit 4)."""

    exit_code = 4


class UnsupportedOperatorError(FinetuneError):
    """The PyTorch bridge has no converter for one or more operators of the graph."""
