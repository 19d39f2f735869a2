"""Output kinds: recognisers (what each graph output is), per-kind fidelity measures, the output plan.

``output_plan(model, task, overrides, fidelity)`` is the one description of how a model's outputs are
judged; ``registry`` holds the kinds and recognisers (``register_kind``, ``register_recogniser``), ``basic``,
``detect`` and ``text`` the kinds themselves, ``measures`` the measures' common part.
"""
from .measures import HeadResult, Measure
from .plan import OutputPlan, blind_spots, load_fidelity, output_plan, plan_from_kinds
from .registry import KINDS, RECOGNISERS, TASKS, Head, kind_spec, recognise, register_kind, register_recogniser

__all__ = ["HeadResult", "Measure", "OutputPlan", "blind_spots", "load_fidelity", "output_plan", "plan_from_kinds",
           "KINDS", "RECOGNISERS", "TASKS", "Head", "kind_spec", "recognise", "register_kind", "register_recogniser"]
