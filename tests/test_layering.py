"""graph/ is the bottom layer: its modules import only graph/ itself and the leaf modules errors, paths and
limits (never runtime, io, kinds, metrics, llm ...), at module level or inside functions."""
import ast
import pathlib

import onnx_consensus

LEAVES = {"errors", "paths", "limits"}


def _imports_above(path: pathlib.Path, depth: int) -> list[str]:
    """Relative imports of ``path`` (``depth``: its package depth below onnx_consensus) that leave graph/ for a
    module not in LEAVES."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > depth:
            top = (node.module or "").split(".")[0] or node.names[0].name
            if top not in LEAVES:
                bad.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
        elif isinstance(node, ast.Import) and any(a.name.startswith(("onnx_consensus", "onnxruntime"))
                                                  for a in node.names):
            bad.append(f"{path.name}:{node.lineno} import {', '.join(a.name for a in node.names)}")
    return bad


def test_graph_imports_nothing_above_it():
    graph = pathlib.Path(onnx_consensus.__file__).parent / "graph"
    files = sorted(graph.rglob("*.py"))
    assert len(files) > 10
    bad = [b for f in files for b in _imports_above(f, len(f.relative_to(graph).parts))]
    assert not bad, bad


def test_the_check_sees_an_import_from_above(tmp_path):
    """The walker itself: a lazy import of runtime inside a function, and one of io, are found."""
    f = tmp_path / "m.py"
    f.write_text("from ..errors import InputError\nfrom .ir import x\n\ndef g():\n    from ..runtime import make_session\n"
                 "    import onnxruntime\n    from .. import io\n")
    assert _imports_above(f, 1) == ["m.py:5 from ..runtime", "m.py:6 import onnxruntime", "m.py:7 from .."]
