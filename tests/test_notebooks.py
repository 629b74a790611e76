"""Every notebook runs top to bottom on CPU, so none can drift from the code it teaches, and is stored clean."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from .conftest import DEMO_DATA, DEMO_MODEL, REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a whole notebook takes well under a minute on a quiet 2-core CPU
KERNEL_NAME = "qlora-kit-test"


@pytest.fixture(scope="module")
def jupyter_dirs(tmp_path_factory) -> Path:
    """A kernel spec that runs this very interpreter, so the kernel sees the same environment as the tests.

    A `python3` kernel could resolve to any Python on the machine (a user-wide kernel spec wins over the one in the
    virtual environment); this spec names sys.executable explicitly, and nothing outside the temporary folder is read
    or written.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "data" / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "qlora-kit", "language": "python"}))
    return root


@pytest.fixture
def kernel_env(jupyter_dirs, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dirs / "data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter_dirs / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(jupyter_dirs / "ipython"))  # no user profile or startup files
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("QLORA_KIT_DEMO_MODEL", str(DEMO_MODEL))
    monkeypatch.setenv("QLORA_KIT_DEMO_DATA", os.environ.get("QLORA_KIT_TEST_DEMO_DATA", str(DEMO_DATA)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: more threads only contend on a shared CPU


def test_notebooks_are_found():
    expected = {
        "01_quickstart.ipynb",
        "02_concepts.ipynb",
        "03_merge_and_deploy.ipynb",
        "04_benchmark_and_plan.ipynb",
        "05_preference.ipynb",
    }
    assert expected <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {index} has outputs: clear them before committing "
                "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_top_to_bottom(path: Path, kernel_env):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(path.parent)}},  # run from notebooks/, as a reader would
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert figures, f"{path.name} drew no figure"


def test_kernel_is_this_interpreter_and_errors_fail(kernel_env, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbformat.v4 import new_code_cell, new_notebook

    notebook = new_notebook(cells=[new_code_cell("import sys; print(sys.executable)"), new_code_cell("1 / 0")])
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME)
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        client.execute()
    assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable
