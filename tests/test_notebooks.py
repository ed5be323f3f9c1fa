"""The stage notebooks as JupyterLab meets them: stored exactly as it would save them on opening (the notebooks
are DVC dependencies, so a rewrite on open would rerun their stages), and run with the kernel started in
notebooks/, where JupyterLab starts it."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from fut import data
from fut.notebook import project_root
from fut.storage import read_json

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "fut"


@pytest.fixture(scope="module")
def kernel_metadata() -> dict:
    """What JupyterLab writes into a notebook's metadata once the kernel is up: the kernelspec, and the
    language_info of the kernel's own kernel_info_reply."""
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    km, kc = start_new_kernel(kernel_name=KERNEL)
    try:
        info = kc.kernel_info(reply=True, timeout=60)["content"]["language_info"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": KERNEL},
            "language_info": info}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_as_jupyterlab_saves_it(path, kernel_metadata):
    text = path.read_text()
    nb = nbformat.reads(text, as_version=4)
    # Metadata that differs from the kernel's marks the notebook unsaved on opening, and autosave rewrites it.
    assert nb.metadata == kernel_metadata, f"{path.name}: store the kernel's metadata, {kernel_metadata}"
    # A save writes nbformat's serialization: any other layout changes the bytes although nothing changed.
    assert text == nbformat.writes(nb) + "\n", f"{path.name} is not in nbformat's layout"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"


def test_project_root_is_found_from_below(tmp_path):
    assert project_root(ROOT / "notebooks") == ROOT
    with pytest.raises(FileNotFoundError, match="dvc.yaml"):
        project_root(tmp_path)


def with_parameters(path: Path, **values) -> nbformat.NotebookNode:
    """The notebook with `values` assigned in a cell after its `parameters` cell, as papermill injects them."""
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    return nb


@pytest.mark.slow
def test_prepare_notebook_runs_with_kernel_in_notebooks_folder(tmp_path, params_dict):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_dict))
    out = tmp_path / "prepared"
    nb = with_parameters(ROOT / "notebooks" / "01_prepare.ipynb", params_file=str(params_file), out_dir=str(out),
                         metrics_file=str(tmp_path / "prepare.json"), figures_dir=str(tmp_path / "figures"),
                         plots_dir=str(tmp_path / "plots"))
    NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()

    metrics = read_json(tmp_path / "prepare.json")
    assert set(metrics) == {"domains", "vocab_size", "sequences_per_domain", "tokens_per_domain",
                            "warmstart_sequences", "window_shape", "missing_domains"}
    assert metrics["domains"] == list(params_dict["corpus"]["sources"]) and metrics["missing_domains"] == []
    assert (out / data.SPLITS_FILE).is_file() and (out / data.TOKENIZER_DIR / "tokenizer.json").is_file()
    assert (tmp_path / "plots" / "corpus_tokens.csv").is_file()
    assert (tmp_path / "figures" / "corpus_tokens.png").is_file()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"-> {ROOT} (the project root" in text   # setup said it moved from notebooks/
    assert "IProgress" not in text and "TqdmWarning" not in text
