
import pytest

from helpers.paths import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
WIDTHS = "[32, 64, 128, 256]"  # the backbone's channels in the notebook


@pytest.mark.timeout(300)
def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = notebook.cells[1]
    assert parameters.source.startswith("EPOCHS = 17")
    parameters.source = "EPOCHS = 1"
    # The notebook's backbone at a sixteenth of its compute: the test checks the path, not the accuracy.
    model_cell = next(cell for cell in notebook.cells if "SimCLR(" in cell.source)
    assert WIDTHS in model_cell.source
    model_cell.source = model_cell.source.replace(WIDTHS, "[8, 16, 32, 64]")
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the curves and the embedding map
    text = "".join(o.get("text", "") for o in outputs)
    assert "last kNN top-1:" in text and "360 held-out digits" in text
