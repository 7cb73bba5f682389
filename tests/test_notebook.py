"""The exploration notebook runs top to bottom (small settings) and stays in sync with its source."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_notebook_matches_its_jupytext_source():
    jupytext = pytest.importorskip("jupytext")
    paired = jupytext.read(NOTEBOOKS / "explore_s2ap.py")
    committed = nbformat.read(NOTEBOOKS / "explore_s2ap.ipynb", as_version=4)
    assert [c.source for c in paired.cells] == [c.source for c in committed.cells], (
        "regenerate with: jupytext --to ipynb notebooks/explore_s2ap.py"
    )


def test_notebook_executes(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("S2AP_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("S2AP_NOTEBOOK_OUT", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOKS / "explore_s2ap.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6
    assert (tmp_path / "runs" / "report.md").exists()
    assert os.environ["S2AP_NOTEBOOK_FAST"] == "1"
