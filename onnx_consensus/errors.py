"""One small hierarchy of errors; the CLI turns each into one line and an exit code."""


def first_lines(exc: BaseException, limit: int = 400) -> str:
    """The message of ``exc`` on one line: its first line, and the next one too when the first does not say
    what is wrong by itself (onnxruntime puts "index: 0 Got: 64 Expected: 1" on the second line of
    "Got invalid dimensions for input ..."); lines joined by "; ", cut at ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    keep = lines[:1]
    if len(lines) > 1 and (lines[0].rstrip().endswith((":", "indices")) or "Got:" in lines[1]
                           or "Expected" in lines[1]):
        keep.append(lines[1])
    text = "; ".join(keep)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        first = first_lines(cause)
        super().__init__(f"{type(cause).__name__}: {first}" if first else type(cause).__name__)
        self.partial = partial
        self.__cause__ = cause

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        cause = self.__cause__
        if isinstance(cause, KeyboardInterrupt):
            return 130
        return cause.exit_code if isinstance(cause, ConsensusError) else 1


class UnsafePathError(InputError):
    """A file named inside a model or a data folder (external data, a tokenizer beside the model, a calibration
    file) lies outside the folder it must stay in, or is not a regular file (exit 2, nothing read)."""


class ResourceLimitError(InputError):
    """A model or data file would make the tool allocate more than the memory budget, nest subgraphs deeper
    than the limit, or hold a malformed graph (cycles, a tensor produced twice) (exit 2, nothing run)."""
