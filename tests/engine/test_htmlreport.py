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


@pytest.fixture(scope="module")
def nightly_history(tmp_path_factory):
    """Three nightlies of two passes each (parity and accuracy, then benchmark); the last one's
    parity pass has a failing cell and its benchmark pass an openvino slowdown."""
    from tooling.history.synthetic import nightly_passes

    path = tmp_path_factory.mktemp("nightly") / "h.sqlite"
    with History(path) as stored:
        for n in (1, 2):
            for run in nightly_passes(generated_run(n, models=MODELS, samples_per_pass=4, pictures=False), f"night-{n}"):
                stored.write_run(run)
        last = generated_run(3, models=MODELS, samples_per_pass=4, slowdown={"openvino": 0.2}, failing=FAILING)
        for run in nightly_passes(last, "night-3"):
            stored.write_run(run)
    return path


def test_the_overview_shows_every_pass_of_the_last_session(nightly_history, tmp_path):
    rendered = render(nightly_history, tmp_path)
    page = rendered.html.read_text()
    first_screen, overview = page[: page.index('id="overview"')], page[page.index('id="overview"'):page.index("<section class=\"model\"")]
    # The verdict and counts are the session's: the parity pass's failure, the benchmark pass's regression.
    model, gate, case, backend = FAILING
    assert "zoo-conformance: FAILED" in first_screen and "last session night-3: 2 passes" in first_screen
    assert f"<b>{model} {gate} {backend}</b> {case}: injected failure" in first_screen
    assert re.search(r"▼ <b>gma cpu-speedup openvino</b>", first_screen)
    with History(nightly_history) as stored:
        passes = [stored.load_run(i) for i in stored.session_run_ids("generated-00003-benchmark")]
    assert [r.run_id for r in passes] == ["generated-00003-parity", "generated-00003-benchmark"]
    cells = [c for r in passes for c in r.cells]
    counts = {o: sum(c.outcome == o for c in cells) for o in ("passed", "failed", "skipped")}
    assert f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped over its passes" in first_screen
    assert "<b>pass 1</b>" in first_screen and "<b>pass 2</b>" in first_screen
    # Each cell on the grid comes from the pass that ran it: parity, agreement and speed rows together.
    assert "each cell from the pass that ran it" in overview
    for model in MODELS:
        case = f"{model}-smoke-b1-torchscript"
        assert re.search(rf"<tr><td>1</td><td>deployed-vs-onnx</td><td>{case}</td>", overview)
        assert re.search(rf"<tr><td>1</td><td>accuracy-agreement</td><td>-</td>", overview)
        assert re.search(rf"<tr><td>2</td><td>cpu-speedup</td><td>{case}</td>", overview)
    assert re.search(r'title="pass 2">▼\d\.\d\dx', overview)
    summary = rendered.markdown.read_text()
    assert summary.startswith("## zoo-conformance: FAILED") and "Last session night-3: 2 passes" in summary
    assert re.search(r"^- pass 2 .*: 12 cell\(s\) on the grid, 12 passed, 0 failed, 0 skipped \(cpu-speedup\)$", summary, re.M)


def test_each_pass_is_compared_only_with_earlier_runs_of_its_kind(nightly_history):
    from tooling.history.regression import baseline_runs, compare

    with History(nightly_history) as stored:
        report = Report(stored)
        bench = stored.load_run("generated-00003-benchmark")
        parity = stored.load_run("generated-00003-parity")
        alone = {c for run in (bench, parity) for c in compare(run, baseline_runs(stored, run)).changes}
    assert report.comparison.since.run_id == "generated-00002-benchmark"
    # Trends: one point per nightly, its parity and speed figures on the same point.
    assert len(report.runs) == 6 and len(report.labels) == 3
    speed = report._series("gma", lambda c: {c.backend: c.figures.get("speedup")} if c.gate == "cpu-speedup" else {})
    parity, _ = report._parity_series("gma")
    assert all(None not in v and len(v) == 3 for v in [*speed.values(), *parity.values()])
    # What the plugin said at each pass's end, neither more nor less: no pooling across passes.
    assert {(c.key, c.message) for c in report.comparison.changes} == {(c.key, c.message) for c in alone}
    assert {c.gate for c in report.comparison.changes if c.kind == "speed"} == {"cpu-speedup"}
    assert {c.kind for c in report.comparison.changes if c.gate != "cpu-speedup"} == {"newly-failing"}


def test_a_history_from_before_sessions_still_opens_and_renders(tmp_path):
    import sqlite3

    path = tmp_path / "v3.sqlite"
    with History(path) as stored:
        for n in (1, 2):
            stored.write_run(generated_run(n, models=("gma",), samples_per_pass=4, pictures=False))
    db = sqlite3.connect(path)  # back to schema 3 as it was: no session column, no index on it
    db.executescript("DROP INDEX runs_by_session; ALTER TABLE runs DROP COLUMN session_id; PRAGMA user_version = 3;")
    db.close()
    rendered = render(path, tmp_path / "out")  # migrates: each old run is a session of its own
    with History(path) as stored:
        assert stored.version == 4 and stored.load_run("generated-00001").session == "generated-00001"
        assert stored.session_run_ids("generated-00002") == ["generated-00002"]
    page = rendered.html.read_text()
    overview = page[page.index('id="overview"'):page.index('<section class="model"')]
    assert "last run " in page and "overview: the last run's grid" in overview and "<th>pass</th>" not in overview
    assert "cpu-speedup" in page and "accuracy-agreement" in page


def test_a_roofline_bar_above_the_measured_peak_says_the_peak_was_measured_low(monkeypatch):
    import matplotlib.axes

    from tooling.htmlreport import plots

    labels = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: labels.append(text) or real(self, text, *a, **k))
    png = plots.roofline_bars("roofline", {"b1 openvino": (180.0, 100.0), "b1 torch": (35.0, 100.0)})
    assert png.startswith(b"\x89PNG") and labels == ["> peak (peak measured low)", "35%"]
