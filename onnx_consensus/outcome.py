"""What a prune run reads and produces, for every model kind: ``Source`` (the input), ``Outcome`` (the run's
result, ``pipeline.run``), ``DecoderRun`` (the facts only a decoder LLM's run has), ``Written`` (what
``pipeline.write`` wrote)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import PruneFailed
from .options import Options

if TYPE_CHECKING:
    from .graph.decoder import DecoderReport
    from .llm.spill import Spill
    from .pruner import PruneResult


@dataclass
class Source:
    """The input model: ``path`` (None when given in memory; an export folder for a decoder given as one),
    ``external`` whether its weights are in an external-data file (then written the same way), ``sha256`` of
    its model file, ``model_file`` (the ONNX file: ``path`` itself, or the one inside the folder)."""

    model: onnx.ModelProto
    path: str | None = None
    external: bool = False
    sha256: str | None = None
    model_file: str | None = None

    @property
    def folder(self) -> bool:
        """Whether the input is an export folder (a decoder LLM's)."""
        return self.path is not None and self.model_file is not None and self.path != self.model_file


@dataclass
class DecoderRun:
    """What a decoder LLM's run has besides the common Outcome: ``removed`` the original layer numbers in
    removal order, ``source`` the input path (a folder or a file; None in memory), ``folder`` whether it is
    an export folder (then the output is one too), ``layers`` the original's decoder layers, ``spill`` the
    temporary file of an inline input's weights (``llm.spill``)."""

    removed: list[int]
    source: str | None
    folder: bool
    layers: DecoderReport
    spill: Spill | None = None


@dataclass
class Outcome:
    """What a run produced, for block models and decoder LLMs alike.

    model: the model to write (the bfloat16 original with the removals for a bfloat16 input; fine-tuned
        when a fine-tuned epoch beat the pruned model on the eval data or the hold-out); ``write`` says
        whether it is written at all.
    result: the schedule's PruneResult (its ``model`` is ``model``); the partial one after a failure; None for
        a decoder LLM (``decoder`` holds its facts).
    report: the JSON report (``report.build_report``, or ``llm.run``'s for a decoder) with ``seconds`` (and
        ``partial``/``error``); both share the keys docs/REPORT_SCHEMA.md lists as common.
    latency: {batch size: before/after ms} or None; finetune: the fine-tuning info or None.
    exit_code / status: 0 "done", "nothing removed" or "saves too little" (with no target, removals under
        ``pruner.MIN_MACS_SAVING`` of the MACs: not written); 4 "finetune failed"; 130 "finetune interrupted";
        the failure's code with "partial" (then ``failure`` is the PruneFailed).
    check_feed: one sample for the written model's onnxruntime check (None for bfloat16, which it cannot run,
        and for decoders, checked with a prefill feed).
    warnings: what the run warned about (a block run logs them too; a decoder's failed fine-tuning is
        also ``finetune["error"]``).
    decoder: the decoder LLM's facts (``DecoderRun``), None for a block model. finetuned: the model is the
        fine-tuned one (decoder runs).
    """

    model: onnx.ModelProto | None
    result: PruneResult | None
    report: dict
    options: Options
    latency: dict | None = None
    finetune: dict | None = None
    exit_code: int = 0
    status: str = "done"
    write: bool = False
    failure: PruneFailed | None = None
    check_feed: dict[str, np.ndarray] | None = None
    external: bool = False
    warnings: list[str] = field(default_factory=list)
    decoder: DecoderRun | None = None
    finetuned: bool = False

    @property
    def removed_ids(self) -> list[str]:
        """The removed blocks' (or decoder layers') ids, in removal order."""
        if self.result is not None:
            return self.result.removed_ids
        return list(self.report.get("removed_ids", []))


@dataclass
class Written:
    """Paths ``write`` wrote (None: not written)."""

    model: str | None = None
    report: str | None = None
