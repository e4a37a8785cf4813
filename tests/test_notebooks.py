"""The notebooks run top to bottom in smoke mode (QALORA_SMOKE=1) and render their plots."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

try:
    from qalora.loaders import bundled_gguf_path

    bundled_gguf_path()
except Exception as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_plots(path, monkeypatch):
    monkeypatch.setenv("QALORA_SMOKE", "1")
    monkeypatch.setenv("QALORA_NO_PROGRESS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} rendered no plot"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
