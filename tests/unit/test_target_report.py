"""Reports of ``--target`` runs name the user's stack by its label and leave out what
mailbench's own servers and workers are set to; several target runs compare one row
and one bar per run."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from test_charts import synthetic_run

from harness.errors import ConfigError
from harness.report import charts, markdown, targets
from harness.report.comparison import run_labels
from harness.report.html import to_html
from harness.results.folder import Run, host_port
from harness.run.cli import add_cli_arguments, config_from_args
from harness.run.target import Target

LABEL = "Django + Celery 5.4 on Redis, gunicorn 4 workers"
HARNESS_SETTINGS = {
    "server_procs": 4,
    "worker_procs": 3,
    "worker_concurrency": 200,
    "render_ms": 0.0,
    "send_delay_ms": 0.0,
    "send_work_us": 0.0,
    "form_work_us": 0.0,
}


def target_run(path: Path, label: str | None = LABEL, port: int = 8000, send: int = 2_000) -> Run:
    """A run of one external server, as ``mailbench run --target`` writes its manifest
    (``label`` None: a folder written before ``--target-label``)."""
    run = synthetic_run(path, {"target": (1_500, send)})
    # The harness measures no API call of a server it did not start.
    run.summary = [r for r in run.summary if r.metric != "api"]
    run.histograms = {k: h for k, h in run.histograms.items() if k[1] != "api"}
    described = {
        "url": f"http://127.0.0.1:{port}",
        "name": "target",
        "form_path": "/",
        "send_path": "/send",
        "fields": ["to", "subject", "message"],
        "fakegun": "started on port 8025",
    }
    if label is not None:
        described["label"] = label
    run.manifest["config"] |= {**HARNESS_SETTINGS, "target": described, "seed": 1}
    run.manifest["versions"] = {"aiohttp": "3.14.5", "asyncpg": "0.32.0", "locust": "2.47.0"}
    run.manifest["config"]["modes"] = ["target"]
    return run


def args_of(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_target_report_names_the_stack_and_not_the_harness_settings(tmp_path: Path) -> None:
    run = target_run(tmp_path)
    text = markdown.render(run, ["gap"])
    assert text.startswith(f"# mailbench run 20260101-000000: {LABEL}\n")
    assert markdown.headline(run).startswith(f"{LABEL}: POST /send answered in ")
    assert f"| {LABEL} | 1.43 ms | 1.81 ms |" in text  # the gap table's row
    assert re.search(rf"\| {re.escape(LABEL)} \| 100 \| 100 \| 0 ", text)  # accounting
    assert f"- `target` — **{LABEL}**: a server mailbench did not start" in text
    for setting in (*HARNESS_SETTINGS, "aiohttp", "asyncpg", "send vs direct", "queue_wait"):
        assert setting not in text, setting
    assert "- versions: locust 2.47.0" in text
    assert "{'url'" not in text  # the target's settings read as a sentence, not a dict
    assert LABEL in to_html(text, tmp_path)


def test_a_run_of_mailbench_modes_still_shows_its_settings(tmp_path: Path) -> None:
    """The negative control: only a target run leaves them out."""
    run = synthetic_run(tmp_path)
    run.manifest["config"] |= HARNESS_SETTINGS
    run.manifest["versions"] = {"aiohttp": "3.14.5"}
    text = markdown.render(run, ["gap"])
    assert "- server_procs: `4`" in text and "aiohttp 3.14.5" in text
    assert run.target is None and run.label_of("redis") == "redis"


def test_a_folder_without_a_label_names_the_target_by_host_and_port(tmp_path: Path) -> None:
    run = target_run(tmp_path, label=None, port=8080)
    assert run.label_of("target") == "127.0.0.1:8080"
    assert "| 127.0.0.1:8080 | " in markdown.render(run, [])
    assert host_port("https://user:secret@app.example.com/shop") == "app.example.com:443"
    assert host_port("http://[::1]:9000/") == "[::1]:9000"


def test_the_charts_of_a_target_run_name_it_by_its_label(tmp_path: Path) -> None:
    run = target_run(tmp_path)
    for figure in (charts.gap_chart(run), charts.spectrum_chart(run, "send")):
        texts = [t.get_text() for t in figure.findobj(lambda o: hasattr(o, "get_text"))]
        assert any(LABEL.split(",")[0] in t for t in texts), texts
        assert not any(t.strip() == "target" for t in texts), texts
        assert "Mailgun API call" not in texts


def test_the_label_must_fit_a_table_cell_and_one_chart_line() -> None:
    for bad in ("a | b", "two\nlines", "x" * 101, "  "):
        with pytest.raises(ConfigError, match="--target-label") as caught:
            Target("http://app.test", label=bad)
        assert "e.g. 'Django + Celery 5.4 on Redis'" in str(caught.value)
    config = config_from_args(args_of("--target", "http://app.test", "--target-label", LABEL))
    assert config.target is not None and config.describe()["target"]["label"] == LABEL
    unlabelled = config_from_args(args_of("--target", "http://app.test:81"))
    assert unlabelled.describe()["target"]["label"] == "app.test:81"


def _tick_boxes(figure: Figure) -> list[Bbox]:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = figure.axes[0]
    return [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]


def test_target_runs_compare_one_filled_row_and_one_bar_per_run(tmp_path: Path) -> None:
    runs = [
        target_run(tmp_path / "a", LABEL, 8000, send=2_000),
        target_run(tmp_path / "b", "Dream 1.0 + cohttp, the API called in the request", 8080,
                   send=800_000),
        target_run(tmp_path / "c", None, 9000, send=900_000),
    ]  # fmt: skip
    assert targets.is_target_comparison(runs)
    labels = run_labels(runs)
    assert labels == [LABEL, "Dream 1.0 + cohttp, the API called in the request", "127.0.0.1:9000"]
    letters = ["A", "B", "C"]
    text = targets.render(runs, letters, labels, [], ["compare-gap"])
    latency = text.split("## Latency and the gap", 1)[1].split("##", 1)[0]
    rows = [line for line in latency.splitlines() if re.match(r"\| [ABC] \|", line)]
    assert [r.split(" | ")[1] for r in rows] == labels
    assert all("–" not in r for r in rows), rows
    assert "| C | 127.0.0.1:9000 | 100 | 100 |" in text  # accounting, one row per run
    for setting in ("worker concurrency", "processes", "render", "send delay"):
        assert f"- {setting}:" not in text
    # Labels wrapped onto lines of their own never overlap, however long.
    named = [f"{t}  {label}" for t, label in zip(letters, labels, strict=True)]
    for figure in (targets.latency_chart(runs, named, "note"), targets.gap_chart(runs, named, "")):
        boxes = _tick_boxes(figure)
        assert len(boxes) == 3
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_runs_of_mailbench_modes_are_compared_mode_by_mode(tmp_path: Path) -> None:
    """The negative control: a run of mailbench's modes among them keeps the old layout."""
    runs = [target_run(tmp_path / "a"), synthetic_run(tmp_path / "b")]
    assert not targets.is_target_comparison(runs)
