"""notebooks/quickstart.ipynb runs top to bottom through a real Jupyter kernel (nbclient + ipykernel), on the CPU,
with a 1-minute training budget on the shared TinyStories head, in a temporary working directory (the notebook
writes data/ and runs/ there, not into the repository). Its parameters cell is replaced the way papermill does:
the cell tagged `parameters` gets this test's values.

Runtime: the 1-minute training plus tokenizer, cache, three stories, the evaluation table and the generate cell.
Measured: 14m47s on the shared 2-core machine at a load average of ~17 (other jobs running); the timeout per cell
is 30 minutes so that a slow machine fails only on a real hang.
"""

from __future__ import annotations

import os

import pytest

from conftest import DATA_DIR, REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            out.append(o.text)
        elif o.output_type in ("execute_result", "display_data") and "text/plain" in o.data:
            out.append(o.data["text/plain"])
        elif o.output_type == "error":
            out.append("\n".join(o.traceback))
    return "".join(out)


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source = f"MINUTES = 1\nDATA = {str(DATA_DIR)!r}\nOUT = 'runs/quickstart'\nREPO_URL = None\n"

    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever this machine has
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel (and the CLI it starts) inherit this environment
    try:
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = [_text(c) for c in code]
    everything = "\n".join(texts)
    assert "already installed" in everything and str(REPO / "tinystories") in everything  # the install cell skipped
    assert "no GPU: training on the CPU" in everything
    train_out = next(t for t in texts if "three stories" in t)
    assert "config: cpu.yaml (CPU found)" in train_out and "1 min of training" in train_out
    assert "final eval step" in train_out and "bits per byte" in train_out
    gen_out = next(t for t in texts if t.count("Once upon a time") >= 2 and "three stories" not in t)
    assert len(gen_out.split()) > 40  # two sampled stories
    images = [o for c in code for o in c.get("outputs", []) if o.output_type == "display_data"
              and "image/png" in o.data]
    assert len(images) == 1 and len(images[0].data["image/png"]) > 1000
    # everything the notebook wrote is in its working directory, nothing in the repository
    assert (tmp_path / "runs" / "quickstart" / "loss.png").is_file()
    assert (tmp_path / "data").is_dir()
