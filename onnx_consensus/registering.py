"""The one way a name is registered in the package's small registries (quantization formats, decoder
quantization formats): a decorator that adds a function to a dict under a name, refusing a name given twice."""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["registrar"]


def registrar(table: dict[str, Callable], what: str) -> Callable[[str], Callable[[Callable], Callable]]:
    """``register = registrar(TABLE, "quantization format")``; then ``@register("int8")`` adds the decorated
    function to ``TABLE`` under "int8" (ValueError naming ``what`` when the name is registered already)."""
    def register(name: str):
        def deco(fn):
            if name in table:
                raise ValueError(f"{what} {name!r} registered twice")
            table[name] = fn
            return fn
        return deco
    return register
