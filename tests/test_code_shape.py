"""The package's shape rules (issue 21), checked on its source: no module over 450 lines, no function over 80,
and no module importing another module's private (_underscore) names, by ``from m import _x`` or ``m._x``."""
import ast
import pathlib

import onnx_consensus

PACKAGE = pathlib.Path(onnx_consensus.__file__).parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def _long_functions(tree: ast.AST, name: str) -> list[str]:
    return [f"{name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def _private_imports(tree: ast.AST, name: str) -> list[str]:
    """``from m import _x`` of any module, and ``m._x`` where m is a name this module imported (the standard
    library's ``os._exit`` aside)."""
    bad, imported = [], set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            for a in n.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"{name}:{n.lineno} from {n.module} import {a.name}")
                imported.add(a.asname or a.name)
        elif isinstance(n, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in n.names)
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in imported \
                and n.attr.startswith("_") and not n.attr.startswith("__") and (n.value.id, n.attr) != ("os", "_exit"):
            bad.append(f"{name}:{n.lineno} {n.value.id}.{n.attr}")
    return bad


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 80
    return [(str(f.relative_to(PACKAGE)), f.read_text()) for f in files]


def test_no_module_over_450_lines():
    long = [f"{name} ({text.count(chr(10))} lines)" for name, text in _sources()
            if text.count("\n") > MAX_MODULE_LINES]
    assert not long, long


def test_no_function_over_80_lines():
    long = [b for name, text in _sources() for b in _long_functions(ast.parse(text), name)]
    assert not long, long


def test_no_private_name_imported_from_another_module():
    bad = [b for name, text in _sources() for b in _private_imports(ast.parse(text), name)]
    assert not bad, bad


def test_the_checks_see_what_they_look_for():
    """The walkers themselves, on a made-up module: a long function, a private import, a private attribute."""
    src = ("from .scoring import _score_one\nfrom . import pipeline\n\ndef f():\n" + "    x = 1\n" * 81
           + "    return pipeline._calibration(x)\n")
    tree = ast.parse(src)
    assert _long_functions(tree, "m.py") == ["m.py:4 f (83 lines)"]
    assert _private_imports(tree, "m.py") == ["m.py:1 from scoring import _score_one", "m.py:86 pipeline._calibration"]
