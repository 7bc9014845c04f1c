"""notebooks/analysis.ipynb runs top to bottom on the committed sample run, in a Jupyter
kernel of this interpreter, and is committed without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
SAMPLE = ROOT / "results" / "sample"


def execute(folder: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # jupyter_core warns (DeprecationWarning, an error here) unless told which paths to use.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("MAILBENCH_RESULTS", str(folder))
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return notebook


def test_committed_notebook_has_no_outputs() -> None:
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_on_the_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "sample"
    shutil.copytree(SAMPLE, folder)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    notebook = execute(folder, tmp_path, monkeypatch)
    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 4  # gap redrawn, gap by the harness, spectrum, per second
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert str(folder) in printed  # it read the folder it was given, not the default
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # analysis only reads


def test_notebook_fails_on_a_folder_that_is_not_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError) as failed:
        execute(tmp_path / "missing", tmp_path, monkeypatch)
    assert failed.value.ename == "FileNotFoundError"
    assert failed.value.evalue.startswith("no results folder")
