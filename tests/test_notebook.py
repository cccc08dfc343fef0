"""The guided tour notebook runs top to bottom (it is documentation that must not rot): it draws its figures, uses
only the public API, prints no warnings and leaves nothing behind in the temporary folder."""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import featstore

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tour.ipynb"


def test_tour_notebook_executes_draws_and_cleans_up(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"\bfrom featstore\.|\bimport featstore\.|featstore\.(cli|stats|store|export)\.", source)
    used = set(re.findall(r"\bfeatstore\.(\w+)", source))
    assert used and used <= set(featstore.__all__), used - set(featstore.__all__)

    tmp = tmp_path / "tmp"  # the kernel's temporary folder: whatever the notebook leaves behind lands here
    tmp.mkdir()
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "TMPDIR": str(tmp)})

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "median held-out correlation" in text
    assert "constant (std < 4 ulp)" in text and "over the done chunks only" in text
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress" not in stderr and "Warning" not in stderr and "Traceback" not in stderr, stderr
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2  # the statistics figure; the stimulus, its token-norm map and its PCA-to-RGB tokens
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("featstore")]
