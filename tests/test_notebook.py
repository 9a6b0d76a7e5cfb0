"""The Colab notebook runs top to bottom on the CPU with the tiny recipe (its parameters cell replaced), is
committed without outputs, and installs this project from its source (a checkout or SOURCE), never by a package
name: the project is not on PyPI, and `trainer` there is another project."""
from __future__ import annotations

import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NB = ROOT / "notebooks" / "grpo_colab.ipynb"
PLACEHOLDER = "https://github.com/<your-org>/trainer.git"


def _cell(tag: str):
    nb = nbformat.read(NB, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    if tag == "parameters":
        return nb.cells[params]
    return next(c for c in nb.cells[params + 1:] if c.cell_type == "code")  # the install cell follows it


def _run_install_cell(monkeypatch, cwd, source, install=True):
    """Execute the notebook's install cell here; pip calls are recorded instead of run, git runs for real."""
    pips, real_run = [], subprocess.run

    def run(cmd, *a, **k):
        if "pip" in cmd:
            pips.append([str(x) for x in cmd])
            return subprocess.CompletedProcess(cmd, 0)
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.chdir(cwd)
    ns = {"SOURCE": source, "RECIPE": "recipes/tiny-cpu.yaml", "OVERRIDES": [], "OUTPUT_DIR": "run",
          "INSTALL": install, "PROMPT": "x"}
    exec(compile(_cell("install").source, "install-cell", "exec"), ns)
    return ns, pips


def test_the_parameters_cell_sets_the_source_once_and_readme_explains_it():
    params = _cell("parameters").source
    assert f'SOURCE = "{PLACEHOLDER}"' in params
    readme = (ROOT / "README.md").read_text()
    assert PLACEHOLDER in readme and "SOURCE" in readme


def test_inside_a_checkout_the_notebook_installs_that_checkout_and_reads_its_recipes(monkeypatch):
    ns, pips = _run_install_cell(monkeypatch, ROOT / "notebooks", PLACEHOLDER)
    assert len(pips) == 1 and pips[0][-1] == str(ROOT), pips  # a path, not a package name from an index
    assert ns["RECIPE_PATH"] == ROOT / "recipes" / "tiny-cpu.yaml"


def test_elsewhere_the_notebook_clones_source_installs_the_clone_and_reads_its_recipes(monkeypatch, tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("the source tree is not a git checkout")
    ns, pips = _run_install_cell(monkeypatch, tmp_path, f"file://{ROOT}")
    clone = tmp_path / "trainer-src"
    assert pips and pips[0][-1] == str(clone), pips
    assert ns["RECIPE_PATH"] == clone / "recipes" / "tiny-cpu.yaml" and ns["RECIPE_PATH"].is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ns, pips = _run_install_cell(monkeypatch, elsewhere, str(clone), install=False)  # SOURCE a local path
    assert pips == [] and ns["SRC"] == clone and not (elsewhere / "trainer-src").exists()


def test_the_placeholder_source_outside_a_checkout_asks_for_the_url(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="SOURCE"):
        _run_install_cell(monkeypatch, tmp_path, PLACEHOLDER)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NB, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_notebook_executes_with_the_tiny_cpu_recipe(tmp_path):
    nb = nbformat.read(NB, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (f'SOURCE = "{PLACEHOLDER}"\nRECIPE = "recipes/tiny-cpu.yaml"\n'
                     'OVERRIDES = ["train.max_steps=12", "logging.plots=false"]\n'
                     f'OUTPUT_DIR = "{tmp_path / "run"}"\nINSTALL = False\nPROMPT = "write only digits: river stone"')
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "adapter_model.safetensors" in str([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "reward_last10" in text
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
