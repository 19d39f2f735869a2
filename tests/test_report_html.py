"""--report run.html: a self-contained HTML file beside the JSON, with the plots and tables of the run; it opens in
headless chromium with no console error (skipped where chromium is not installed)."""
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.report import SCHEMA_VERSION
from onnx_consensus.report_html import render
from onnx_consensus.svg import _ticks, line_chart
from tests.helpers import residual_mlp


@pytest.fixture(scope="module")
def run_html(tmp_path_factory):
    """A pruned residual MLP (3 of 6 blocks, labels given) with --quantize fp16 and --report run.html."""
    d = tmp_path_factory.mktemp("html")
    onnx.save(residual_mlp(6, 16), d / "m.onnx")
    (d / "calib").mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "calib" / "x.npy", rng.standard_normal((40, 16)).astype(np.float32))
    np.save(d / "calib" / "labels.npy", rng.integers(0, 10, 40))
    code = main([str(d / "m.onnx"), str(d / "out.onnx"), "--calib", str(d / "calib"), "--remove", "3",
                 "--quantize", "fp16", "--report", str(d / "run.html"), "-q", "--threads", "1",
                 "--latency-runs", "5"])
    assert code == 0
    return d


def test_html_beside_json_with_every_section(run_html):
    html = (run_html / "run.html").read_text()
    report = json.loads((run_html / "run.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    assert len(report["curve"]) == 4 and [p["removed"] for p in report["curve"]] == [0, 1, 2, 3]
    assert [p["id"] for p in report["curve"][1:]] == report["removed_ids"]
    macs = [p["macs"] for p in report["curve"]]
    assert macs[0] == report["macs"]["before"] and macs[-1] == report["macs"]["after"] and macs == sorted(macs)[::-1]
    assert report["curve"][0]["measure"] == ["agreement", 1.0]
    for title in ("Summary", "Blocks removed", "against MACs", "against latency", "Original, quantized, pruned",
                  "Round 0", "Round 2", "Provenance"):
        assert title in html, title
    for bid in report["removed_ids"]:
        assert bid in html
    # one circle per curve point in each of the two curve charts, one per candidate in each round's chart
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 2 + len(report["rounds"])
    assert [s.count("<circle") for s in svgs[:2]] == [4, 4]
    assert [s.count("<circle") for s in svgs[2:]] == [len(r["blocks"]) for r in report["rounds"]]
    for s in svgs:
        ET.fromstring(s)  # well-formed SVG
    # self-contained: no script, no fetched resource
    assert "<script" not in html and not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "the pruned + quantized model is the one written" in html


def test_render_escapes_and_handles_no_removal():
    report = {"input": {"path": "<m>.onnx"}, "candidates": [], "removed": [], "rounds": [], "stop_reason":
              "no removable block: none found", "macs": {"before": 1, "after": 1, "ratio": 1.0},
              "params": {"before": 1, "after": 1, "ratio": 1.0}, "options": {}}
    html = render(report)
    assert "&lt;m&gt;.onnx" in html and "<m>" not in html
    assert "No block removed" in html and "No removal curve" in html


def test_ticks_and_chart_coordinates():
    assert _ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    svg = line_chart({"a": [(0.0, 0.0, "p"), (10.0, 1.0, "q")]}, title="t", xlabel="x", ylabel="y")
    xs = [float(v) for v in re.findall(r'cx="([\d.]+)"', svg)]
    ys = [float(v) for v in re.findall(r'cy="([\d.]+)"', svg)]
    assert xs[0] < xs[1] and ys[0] > ys[1]  # right and up


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)")
def test_opens_in_headless_chromium_without_console_errors(run_html):
    shot = run_html / "shot.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=1", f"--screenshot={shot}", "--window-size=1200,1600",
                           f"file://{run_html / 'run.html'}"], capture_output=True, text=True, timeout=120)
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == []
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a page with charts, not a blank one
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=1", "--dump-dom", f"file://{run_html / 'run.html'}"], capture_output=True, text=True,
                         timeout=120)  # (a page with a script error logs 'INFO:CONSOLE ... Uncaught ...' here)
    assert [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln] == []
    assert dom.stdout.count("<svg") == 2 + len(json.loads((run_html / "run.json").read_text())["rounds"])
