"""The guided tour notebook runs top to bottom (it is documentation that must not rot): it draws its figures, uses
only the public API, prints no warnings and leaves nothing behind in the temporary folder."""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
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


# ---- the tour's two figures ----------------------------------------------------------------------------------------
def _stats_of(tmp_path, cls_varies: bool) -> dict:
    """feature_stats of a small real array whose CLS token is constant across images (as the tiny random backbone's
    is) or not."""
    from featstore.stats import feature_stats
    from featstore.storage import ArraySpec, FeatureStore

    rng = np.random.default_rng(0)
    N, grid, C = 8, (4, 4), 6
    x = rng.standard_normal((N, 1 + grid[0] * grid[1], C)).astype("float32")
    x[:, 0] = x[0, 0] + (rng.standard_normal((N, C)) if cls_varies else 0)
    fs = FeatureStore(tmp_path / f"s{cls_varies}.zarr", "a")
    fa, _ = fs.prepare("f", "01", "train", ArraySpec(x.shape, 1, "float32"), fingerprint={},
                       meta={"token_layout": {"cls_index": 0, "grid": list(grid), "n_tokens": x.shape[1]},
                             "image_names": [f"img{i}.png" for i in range(N)]})
    fa.write_chunks(0, x, durable=False)
    return feature_stats(fs, "f", "01", "train", pca=3, save=False)


@pytest.mark.parametrize("cls_varies", [False, True], ids=["constant-cls", "varying-cls"])
def test_stats_figure_has_no_empty_legend_entry(tmp_path, cls_varies):
    """A +-std band too thin to see gets no legend swatch of its own; the mean's entry says why."""
    from featstore.stats.report import stats_figure

    labels = [t.get_text() for t in stats_figure(_stats_of(tmp_path, cls_varies)).axes[0].get_legend().get_texts()]
    assert labels[:2] == ["patch mean", "patch +-std"]
    if cls_varies:
        assert labels[2:] == ["cls mean", "cls +-std"]
    else:
        assert len(labels) == 3 and labels[2].startswith("cls mean (std <= ") and "too thin to draw" in labels[2]


def test_token_maps_title_stays_clear_of_the_panel_titles(tmp_path):
    from matplotlib.text import Text

    from featstore.stats.report import token_maps_figure

    stats = _stats_of(tmp_path, True)
    rng = np.random.default_rng(1)
    title = "train-0006_nsd-03828.png"
    fig = token_maps_figure(rng.random((64, 64, 3)), rng.standard_normal((6, 4, 4)), stats, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top = next(t for t in fig.findobj(Text) if t.get_text() == title).get_window_extent(renderer)
    for ax in fig.axes[:3]:
        panel = ax.title.get_window_extent(renderer)
        assert top.y0 - panel.y1 >= 0.5 * top.height, (ax.title.get_text(), top, panel)  # a clear gap, not touching
