"""The Colab notebook runs top to bottom on the CPU with the tiny recipe (its parameters cell replaced), and is
committed without outputs."""
from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT

NB = ROOT / "notebooks" / "grpo_colab.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NB, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_notebook_executes_with_the_tiny_cpu_recipe(tmp_path):
    nb = nbformat.read(NB, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (f'RECIPE = "recipes/tiny-cpu.yaml"\nOVERRIDES = ["train.max_steps=12", "logging.plots=false"]\n'
                     f'OUTPUT_DIR = "{tmp_path / "run"}"\nINSTALL = False\nPROMPT = "write only digits: river stone"')
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "adapter_model.safetensors" in str([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "reward_last10" in text
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
