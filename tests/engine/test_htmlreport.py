"""``python -m tooling report``: a self-contained page (every picture embedded and present), the
failures of the last run named before anything else, trends with one point per run, and the
markdown summary. A small generated history keeps these fast; Chromium is only for the last test."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from tooling.cli import main as cli
from tooling.history.store import History
from tooling.history.synthetic import generated_run
from tooling.htmlreport.render import Report, image_sources, render

MODELS = ("gma", "fomm")
FAILING = ("gma", "deployed-vs-onnx", "gma-smoke-b1-torchscript", "openvino")


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "h.sqlite"
    with History(path) as stored:
        for n in (1, 2):
            stored.write_run(generated_run(n, models=MODELS, samples_per_pass=12))
        stored.write_run(generated_run(3, models=MODELS, samples_per_pass=12, slowdown={"openvino": 0.2},
                                       failing=FAILING))
    return path


@pytest.fixture(scope="module")
def rendered(history, tmp_path_factory):
    return render(history, tmp_path_factory.mktemp("report"))


def test_every_picture_is_embedded_and_decodes(rendered):
    page = rendered.html.read_text()
    sources = list(image_sources(page))
    assert len(sources) == rendered.images > 2 * len(MODELS)
    for src in sources:
        assert src.startswith("data:image/png;base64,"), f"a picture the page would have to fetch: {src[:80]}"
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 200
    assert not re.search(r'(src|href)="(https?:|file:|//)', page), "the report must open offline"
    assert "<script" not in page


def test_the_first_screen_names_the_failures_and_regressions(rendered):
    page = rendered.html.read_text()
    first_screen = page[: page.index('id="overview"')]
    model, gate, case, backend = FAILING
    assert "zoo-conformance: FAILED" in first_screen
    assert f"<b>{model} {gate} {backend}</b> {case}: injected failure" in first_screen
    assert "newly failing" in first_screen
    assert re.search(r"▼ <b>gma cpu-speedup openvino</b> gma-smoke-b1-torchscript: speed-up 1\.\d\dx -&gt; 1\.[45]\dx", first_screen)


def test_trends_hold_one_point_per_run_and_the_guides_targets(history):
    with History(history) as stored:
        report = Report(stored)
    assert report.labels and len(report.runs) == 3
    speed = report._series("gma", lambda c: {c.backend: c.figures.get("speedup")} if c.gate == "cpu-speedup" else {})
    assert set(speed) == {"onnxruntime", "openvino"} and all(None not in v and len(v) == 3 for v in speed.values())
    parity, tolerance = report._parity_series("fomm")
    assert "deployed-vs-onnx openvino: jacobian" in parity and tolerance["deployed-vs-onnx openvino: jacobian"] == 1e-4
    targets, agreement = report.bounds["gma"]
    assert targets == {"clean_1px": 92.65, "final_1px": 88.95} and agreement


def test_the_guides_target_is_drawn_only_beside_a_staged_pass(tmp_path, monkeypatch):
    from tooling.history.store import CellRecord
    from tooling.htmlreport import plots

    drawn = {}
    monkeypatch.setattr(plots, "trend", lambda title, *a, lines=None, **k: (drawn.setdefault(title, lines), b"png")[1])
    staged = generated_run(2, models=("gma",))
    staged.cells.append(CellRecord("gma", "accuracy", "-", "onnxruntime", "passed", "", {"metrics.clean_1px": 93.1}))
    for runs, title, lines in (
            ([generated_run(1, models=("gma",))], "gma: clean_1px (no staged set: the guide's target is for its data)", {}),
            ([generated_run(1, models=("gma",)), staged], "gma: clean_1px", {"guide's target 92.65": 92.65})):
        path = tmp_path / f"h{len(runs)}.sqlite"
        with History(path) as stored:
            for run in runs:
                stored.write_run(run)
            Report(stored).model_section("gma")
        assert drawn[title] == lines, f"{title}: {drawn}"


def test_worst_samples_are_listed_by_name(rendered):
    page = rendered.html.read_text()
    section = page[page.index('id="model-gma"'):]
    assert "samples with the largest figures" in section and re.search(r"<b>gma-sample-\d{4}</b> 0\.9\d*", section)


def test_the_markdown_summary_names_failures_and_changes(rendered):
    summary = rendered.markdown.read_text()
    assert summary.startswith("## zoo-conformance: FAILED")
    assert "### Failing" in summary and "gma deployed-vs-onnx openvino" in summary
    assert "**REGRESSION** ▼ gma cpu-speedup openvino" in summary


def test_report_command_refuses_a_damaged_history_by_name(tmp_path, capsys):
    bad = tmp_path / "h.sqlite"
    bad.write_text("no database here")
    assert cli(["report", "--history", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert str(bad) in capsys.readouterr().err and bad.read_text() == "no database here"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium); "
                    "the report's own tests above do not need it")
def test_the_report_renders_offline_in_headless_chromium(rendered, tmp_path):
    shot = tmp_path / "first-screen.png"
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900",
         f"--screenshot={shot}", rendered.html.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    import cv2

    image = cv2.imread(str(shot))
    assert image.shape[:2] == (900, 1280)
    # The red header of a failed run is the first thing on the page.
    top = image[5:40, 5:600].reshape(-1, 3).mean(axis=0)  # BGR
    assert top[2] > 230 and top[1] < 245, f"expected the failed run's pink header, got BGR {top}"
