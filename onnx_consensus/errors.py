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


class PruneFailed(ConsensusError):
    """A prune run failed midway; ``partial`` (a PruneResult) holds what was done before: the finished
    rounds' scores and the model with the removals made so far. The failure itself is ``__cause__``
    (an onnxruntime error, an interrupt, a bad option found while running); ``exit_code`` is the
    cause's: 130 for an interrupt, a ConsensusError's own code, else 1."""

    def __init__(self, partial, cause: BaseException):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        super().__init__(f"{type(cause).__name__}: {first}" if first else type(cause).__name__)
        self.partial = partial
        self.__cause__ = cause

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        cause = self.__cause__
        if isinstance(cause, KeyboardInterrupt):
            return 130
        return cause.exit_code if isinstance(cause, ConsensusError) else 1
