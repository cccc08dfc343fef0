"""`featstore stats`: every statistic against numpy float64 on real Zarr stores, the outlier rule, PCA against numpy's
SVD, a memory-limited dask.distributed cluster, saved results, the CLI (table, plot, errors)."""
from __future__ import annotations

import re
import sys

import dask
import numpy as np
import pytest

from featstore.cli import main
from featstore.errors import BadArgumentError, IncompleteArrayError, NotFoundInStoreError
from featstore.stats import feature_stats, load_feature_stats
from featstore.stats.report import format_stats
from featstore.storage import ArraySpec, FeatureStore

RTOL = 1e-9  # the contract for float32 stores


def make_array(root, feature, data, *, grid, chunk=1, done_rows=None):
    """A real array in a store on disk; `done_rows` < N leaves the rest unwritten (incomplete)."""
    N, T = data.shape[:2]
    fs = FeatureStore(root, "a")
    fa, _ = fs.prepare(
        feature, "01", "train", ArraySpec(data.shape, chunk, str(data.dtype)),
        meta={"token_layout": {"cls_index": 0, "grid": list(grid), "n_tokens": T},
              "image_names": [f"img{i:05d}.png" for i in range(N)]},
        fingerprint={},
    )
    fa.write_chunks(0, data if done_rows is None else data[:done_rows], durable=False)
    return fa


def synthetic(rng, N, grid, C, dtype):
    """Channels of different scales and offsets, including a 'massive activation' channel (large offset, tiny std)."""
    T = 1 + grid[0] * grid[1]
    x = rng.standard_normal((N, T, C)) * rng.gamma(2.0, 1.0, C) + 3.0 * rng.standard_normal(C)
    x[:, :, 0] = (300.0 if dtype == "float16" else 1000.0) + 0.05 * rng.standard_normal((N, T))
    x[:, 0, :] += 2.0  # the CLS token lives elsewhere
    return x.astype(dtype)


def reference(x, z=6.0):
    """Everything feature_stats reports, in plain numpy float64."""
    x64 = x.astype(np.float64)
    C = x64.shape[2]
    parts = {"patch": x64[:, 1:].reshape(-1, C), "cls": x64[:, 0]}
    ref = {k: {"mean": v.mean(0), "std": v.std(0), "min": v.min(0), "max": v.max(0)} for k, v in parts.items()}
    norms = np.sqrt(np.einsum("ntc,ntc->nt", x64, x64))
    pn = norms[:, 1:]
    med = np.median(pn)
    mad = np.median(np.abs(pn - med))
    thr = med + z * 1.4826 * mad
    ref["norms"] = norms
    ref["outliers"] = {"median": med, "mad": mad, "threshold": thr, "mask": pn > thr}
    return ref


def check_against_numpy(r, x, grid, rtol=RTOL):
    ref = reference(x)
    for part in ("patch", "cls"):
        for f in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(r[part][f], ref[part][f], rtol=rtol, atol=0, err_msg=f"{part} {f}")
    np.testing.assert_allclose(r["token_norm"], ref["norms"][:, 1:].mean(0).reshape(grid), rtol=rtol)
    np.testing.assert_allclose(r["cls_norm"], ref["norms"][:, 0].mean(), rtol=rtol)
    assert r["patch"]["count"] == x.shape[0] * (x.shape[1] - 1) and r["cls"]["count"] == x.shape[0]
    o, ro = r["outliers"], ref["outliers"]
    for k in ("median", "mad", "threshold"):
        np.testing.assert_allclose(o[k], ro[k], rtol=rtol)
    assert o["count"] == ro["mask"].sum()
    assert o["share"] == pytest.approx(ro["mask"].mean(), abs=1e-15)
    assert o["image_share"] == pytest.approx(ro["mask"].any(1).mean(), abs=1e-15)
    np.testing.assert_allclose(o["position_share"], ro["mask"].mean(0).reshape(grid), atol=1e-15)
    # histogram: exact counts of the values (of images 0, k, 2k, ...) at float16 resolution, numpy's bin rule,
    # range = quantiles
    h = r["hist"]
    assert h["every"] == max(1, x.shape[0] // 256) and h["images"] == len(range(0, x.shape[0], h["every"]))
    with np.errstate(over="ignore"):
        v = x[:: h["every"]].astype(np.float16).astype(np.float64).ravel()
    assert h["edges"][0] == np.quantile(v, 1e-4, method="inverted_cdf")
    assert h["edges"][-1] == np.quantile(v, 1 - 1e-4, method="inverted_cdf")
    np.testing.assert_array_equal(h["counts"], np.histogram(v, bins=h["edges"])[0])
    assert h["below"] == (v < h["edges"][0]).sum() and h["above"] == (v > h["edges"][-1]).sum()
    assert h["counts"].sum() + h["below"] + h["above"] == v.size == h["f16_counts"].sum()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_statistics_match_numpy_float64(tmp_path, dtype):
    rng = np.random.default_rng(0)
    grid = (5, 6)
    x = synthetic(rng, 23, grid, 40, dtype)
    if dtype == "float32":
        x[3, 7, 5] = 1e5  # beyond float16: counted as "above" the histogram, exact everywhere else
    make_array(tmp_path / "s.zarr", "feat", x, grid=grid, chunk=2)
    r = feature_stats(tmp_path / "s.zarr", "feat", "01", "train", task_mb=0.05, save=False)
    assert r["timing"]["task_rows"] % 2 == 0 and r["timing"]["task_rows"] < 23  # whole storage chunks, several tasks
    check_against_numpy(r, x, grid, rtol=RTOL if dtype == "float32" else 1e-12)
    if dtype == "float32":
        assert r["hist"]["above"] >= 1 and r["patch"]["max"][5] == 1e5


def test_every_float16_value_converts_exactly_and_inf_propagates(tmp_path):
    """The kernel's bit-level float16 -> float64 conversion, over every finite float16 (subnormals, -0, +-65504);
    an inf in a block switches that block to numpy's conversion, so it shows up as numpy would show it."""
    codes = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = codes[np.isfinite(codes.view(np.float16))]
    grid, C = (4, 4), 64
    per_image = (1 + 16) * C
    N = -(-finite.size // per_image)
    flat = np.zeros(N * per_image, np.uint16)
    flat[: finite.size] = np.random.default_rng(9).permutation(finite)
    x = flat.view(np.float16).reshape(N, 17, C)
    make_array(tmp_path / "s.zarr", "all", x, grid=grid, chunk=4)
    r = feature_stats(tmp_path / "s.zarr", "all", "01", "train", task_mb=0.02, save=False)
    ref = reference(x)
    for part in ("patch", "cls"):
        np.testing.assert_array_equal(r[part]["min"], ref[part]["min"])
        np.testing.assert_array_equal(r[part]["max"], ref[part]["max"])
        np.testing.assert_allclose(r[part]["mean"], ref[part]["mean"], rtol=0, atol=1e-12 * 65504)
        np.testing.assert_allclose(r[part]["std"], ref[part]["std"], rtol=1e-12)
    np.testing.assert_allclose(r["token_norm"], ref["norms"][:, 1:].mean(0).reshape(grid), rtol=1e-12)
    np.testing.assert_array_equal(r["hist"]["f16_counts"], np.bincount(flat, minlength=65536))

    x[2, 5, 7] = np.inf
    make_array(tmp_path / "s2.zarr", "inf", x, grid=grid, chunk=4)
    r = feature_stats(tmp_path / "s2.zarr", "inf", "01", "train", task_mb=0.02, save=False)
    assert r["patch"]["max"][7] == np.inf and r["patch"]["mean"][7] == np.inf and np.isnan(r["patch"]["std"][7])
    np.testing.assert_array_equal(np.delete(r["patch"]["max"], 7), np.delete(ref["patch"]["max"], 7))
    assert r["hist"]["above"] >= 1


def test_outlier_rule_finds_planted_high_norm_tokens(tmp_path):
    """Heavy-tailed (Student t, 3 dof) features plus a few DINOv2-like artefact tokens of 12x the usual norm."""
    rng = np.random.default_rng(1)
    grid = (7, 7)
    N, C = 30, 32
    x = rng.standard_t(3, size=(N, 1 + 49, C))
    planted = [(0, 5), (3, 17), (3, 18), (11, 40), (29, 49)]
    for i, t in planted:
        x[i, t] *= 12.0
    x = x.astype(np.float32)
    make_array(tmp_path / "s.zarr", "feat", x, grid=grid)
    r = feature_stats(tmp_path / "s.zarr", "feat", "01", "train", save=False)
    check_against_numpy(r, x, grid)
    o = r["outliers"]
    flagged = reference(x)["outliers"]["mask"]
    assert all(flagged[i, t - 1] for i, t in planted)
    assert len(planted) <= o["count"] and o["share"] < 0.03  # a t(3) tail crosses a robust z of 6 now and then
    assert o["image_share"] >= 4 / N
    assert "median + 6 * 1.4826 * MAD" in o["rule"]


def test_pca_matches_numpy_svd(tmp_path):
    rng = np.random.default_rng(2)
    grid = (6, 6)
    N, C, k = 40, 32, 4
    P = grid[0] * grid[1]
    latent = rng.standard_normal((N * (P + 1), k)) * np.array([10.0, 6.0, 3.0, 2.0])
    x = latent @ np.linalg.qr(rng.standard_normal((C, k)))[0].T + 0.3 * rng.standard_normal((N * (P + 1), C))
    x = (x + 5.0 * rng.standard_normal(C)).reshape(N, P + 1, C).astype(np.float32)
    make_array(tmp_path / "s.zarr", "feat", x, grid=grid)
    r = feature_stats(tmp_path / "s.zarr", "feat", "01", "train", pca=k, task_mb=0.1, save=False)

    p = x[:, 1:].reshape(-1, C).astype(np.float64)
    p -= p.mean(0)
    _, s, vt = np.linalg.svd(p, full_matrices=False)
    pca = r["pca"]
    np.testing.assert_allclose(pca["explained_variance_ratio"], (s**2 / np.sum(s**2))[:k], rtol=1e-6)
    np.testing.assert_allclose(pca["explained_variance"], s[:k] ** 2 / p.shape[0], rtol=1e-6)
    assert pca["components"].shape == (k, C)
    np.testing.assert_allclose(np.abs(np.sum(pca["components"] * vt[:k], axis=1)), 1.0, atol=1e-6)  # up to sign


def test_distributed_cluster_with_memory_limit_below_array_size(tmp_path):
    """Two worker processes, each allowed 160 MB, compute the statistics of a 182 MB float32 array; nothing
    restarts (a worker past 95% of its limit would be killed), and the workers never import featstore."""
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(3)
    grid = (14, 14)
    N, C = 600, 384
    x = rng.standard_normal((N, 1 + 196, C), dtype=np.float32)
    x *= rng.gamma(2.0, 1.0, C).astype(np.float32)
    x += rng.standard_normal(C).astype(np.float32)
    assert x.nbytes > 180e6
    make_array(tmp_path / "s.zarr", "feat", x, grid=grid)
    with dask.config.set({"temporary-directory": str(tmp_path)}), distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, memory_limit="160MB", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        pids = client.run(lambda: __import__("os").getpid())
        r = feature_stats(tmp_path / "s.zarr", "feat", "01", "train", scheduler=cluster.scheduler_address, task_mb=4)
        assert client.run(lambda: __import__("os").getpid()) == pids
        assert not any(client.run(lambda: "featstore" in sys.modules).values())
    check_against_numpy(r, x, grid)
    assert r["saved_to"]


def test_saved_results_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    grid = (4, 4)
    x = synthetic(rng, 9, grid, 12, "float16")
    fa = make_array(tmp_path / "s.zarr", "feat", x, grid=grid)
    r = feature_stats(tmp_path / "s.zarr", "feat", "01", "train", pca=2)
    loaded = load_feature_stats(tmp_path / "s.zarr", "feat", "01", "train")
    for part in ("patch", "cls"):
        for f in ("mean", "std", "min", "max", "count"):
            np.testing.assert_array_equal(loaded[part][f], r[part][f])
    for k in ("token_norm", "cls_norm"):
        np.testing.assert_array_equal(loaded[k], r[k])
    for k in ("counts", "edges", "f16_counts", "below", "above", "nan"):
        np.testing.assert_array_equal(loaded["hist"][k], r["hist"][k])
    for k, v in r["outliers"].items():
        np.testing.assert_array_equal(loaded["outliers"][k], v)
    for k in ("components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_array_equal(loaded["pca"][k], r["pca"][k])
    raw = FeatureStore(tmp_path / "s.zarr").load_stats(fa)  # the names the Dataset's normalize="channel" reads
    np.testing.assert_array_equal(raw["patch_mean"], r["patch"]["mean"])
    np.testing.assert_array_equal(raw["patch_std"], r["patch"]["std"])


def test_cli_prints_table_saves_and_plots(tmp_path, capsys):
    rng = np.random.default_rng(5)
    grid = (5, 5)
    make_array(tmp_path / "s.zarr", "feat", synthetic(rng, 8, grid, 16, "float16"), grid=grid)
    out = tmp_path / "plots" / "stats.png"
    rc = main(["stats", str(tmp_path / "s.zarr"), "--feature", "feat", "--subj", "01", "--split", "train",
               "--pca", "3", "--plot", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for needle in ("patch tokens", "CLS token", "top-5 |mean|/std", "token norm", "outlier tokens", "histogram",
                   "PCA: top-3", "saved to", "feat/01/train_stats"):
        assert needle in text, needle
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert load_feature_stats(tmp_path / "s.zarr", "feat", "01", "train")["pca"]["components"].shape == (3, 16)


def test_cli_local_cluster_workers(tmp_path, capsys):
    pytest.importorskip("distributed")
    rng = np.random.default_rng(6)
    grid = (3, 3)
    x = synthetic(rng, 6, grid, 8, "float32")
    make_array(tmp_path / "s.zarr", "feat", x, grid=grid)
    assert main(["stats", str(tmp_path / "s.zarr"), "--feature", "feat", "--workers", "2", "--no-save"]) == 0
    assert "saved to" not in capsys.readouterr().out
    with pytest.raises(NotFoundInStoreError, match="no statistics saved"):
        load_feature_stats(tmp_path / "s.zarr", "feat", "01", "train")


def test_incomplete_array_is_refused_with_one_line(tmp_path, capsys):
    rng = np.random.default_rng(7)
    make_array(tmp_path / "s.zarr", "feat", synthetic(rng, 5, (2, 2), 4, "float16"), grid=(2, 2), done_rows=3)
    with pytest.raises(IncompleteArrayError):
        feature_stats(tmp_path / "s.zarr", "feat", "01", "train")
    assert main(["stats", str(tmp_path / "s.zarr"), "--feature", "feat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featstore: error:") and "incomplete (3/5 chunks done)" in err[0]
    assert "computing statistics" in err[0]


def test_bad_arguments(tmp_path, capsys):
    rng = np.random.default_rng(8)
    make_array(tmp_path / "s.zarr", "feat", synthetic(rng, 2, (2, 2), 4, "float32"), grid=(2, 2))
    with pytest.raises(BadArgumentError, match="^pca 5: must be between 0 and 4$"):  # the library names its argument
        feature_stats(tmp_path / "s.zarr", "feat", "01", "train", pca=5)
    assert main(["stats", str(tmp_path / "s.zarr"), "--feature", "feat", "--pca", "5", "--no_save"]) == 2
    assert "featstore: error: --pca 5: must be between 0 and 4" in capsys.readouterr().err  # the CLI its flag
    with pytest.raises(BadArgumentError, match="either"):
        feature_stats(tmp_path / "s.zarr", "feat", "01", "train", scheduler="tcp://127.0.0.1:1", workers=2)
    if pytest.importorskip("distributed"):
        with pytest.raises(BadArgumentError, match="cannot connect"):
            feature_stats(tmp_path / "s.zarr", "feat", "01", "train", scheduler="nonsense://nowhere")
        assert dask.config.get("scheduler", None) is None  # the failed Client left dask's default alone
    assert main(["stats", str(tmp_path / "s.zarr"), "--feature", "nope"]) == 2
    assert "has no array nope/01/train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["stats", str(tmp_path / "s.zarr"), "--feature", "feat", "--workers", "2", "--scheduler", "tcp://x:1"])
    assert e.value.code == 2


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_channel_table_lists_constant_channels_apart(tmp_path, dtype):
    """A CLS token that is the same for every image (up to 1 ulp of jitter) has std ~0, so |mean|/std ~1e3..1e7
    means nothing: such channels are listed as constant, not ranked. A massive-activation channel (large offset,
    small but real spread) is still ranked first."""
    rng = np.random.default_rng(9)
    N, grid, C = 6, (3, 3), 8
    x = (0.1 * rng.standard_normal((N, 10, C))).astype(dtype)
    cls = np.full((N, C), 0.0278, dtype=dtype)
    cls[::2] = np.nextafter(cls[::2], np.array(1, dtype=dtype))  # one ulp apart on every other image
    x[:, 0] = cls
    x[:, 1:, 5] = (50.0 + 2.0 * rng.standard_normal((N, 9))).astype(dtype)
    make_array(tmp_path / "s.zarr", "feat", x, grid=grid)
    r = feature_stats(tmp_path / "s.zarr", "feat", "01", "train", save=False)
    rows = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[1:]
            for line in format_stats(r).splitlines() if line.startswith("  ")}
    patch_top, cls_top = rows["top-5 |mean|/std (ch:val)"]
    patch_const, cls_const = rows["constant (std < 4 ulp)"]
    assert patch_top.startswith("5:") and cls_top == "-"
    assert patch_const == "0" and cls_const.startswith(f"{C} (0, 1, 2")


def test_adversarial_float16_values_match_numpy_float64(tmp_path):
    """Float16 values that break float32 sums: massive-activation channels (+-60000 next to subnormals), a
    channel at 300 with steps of its ulp, values spanning every binade; the shift is far from most of them. The
    fast path (torch's conversion, float64 sums) matches numpy float64, and torch's thread count is restored."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    grid, C, N = (4, 5), 24, 9
    x = rng.standard_normal((N, 21, C)) * np.exp2(rng.integers(-24, 15, (N, 21, C)))
    x[:, :, 0] = rng.choice([60000.0, -60000.0, 6e-8, -6e-8, 0.0], (N, 21))
    x[:, :, 1] = 300.0 + 0.25 * rng.integers(-3, 4, (N, 21))
    x[0, :, 2] = 65504.0  # image 0 sets the shift: far from the rest of its channel
    x[1:, :, 2] = rng.standard_normal((N - 1, 21)) * 1e-3
    x = np.clip(x, -65504, 65504).astype(np.float16)
    make_array(tmp_path / "s.zarr", "adv", x, grid=grid, chunk=3)
    before = torch.get_num_threads()
    r = feature_stats(tmp_path / "s.zarr", "adv", "01", "train", task_mb=0.005, save=False)
    assert torch.get_num_threads() == before
    check_against_numpy(r, x, grid, rtol=1e-12)
