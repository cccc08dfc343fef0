"""`featstore sweep`: the projection against a dense matrix built from its documented rule, r against a direct himalaya
fit and an independent numpy ridge, layout/--workers independence on real extracted stores, the planted signal of the
sample subject (local in V1-V3, global in the category ROIs), chance level on shuffled targets, the cache across
reruns and a failure, incomplete and corrupt arrays, and the CLI."""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest
from conftest import TINY, cli_here, run_cli

from featstore.encoding import SweepConfig, project_tokens, sweep
from featstore.encoding.projection import TOKEN_BLOCK
from featstore.encoding.ridge import ALPHAS
from featstore.errors import CorruptChunkError, IncompleteArrayError
from featstore.sample import N_DESCRIPTORS, ROI_MAPPINGS, planted_fmri, sample_rois
from featstore.storage import ArraySpec, FeatureStore

himalaya = pytest.importorskip("himalaya")

VERTICES = (200, 180)
FAST = {"dims": 64, "plots": False, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """One BLAS thread for these tiny fits: on a shared 2-core machine OpenBLAS's second thread, when descheduled,
    made a 200 x 64 SVD 500x slower (0.6 s instead of 1 ms); the process's setting is restored afterwards."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---- helpers ----------------------------------------------------------------------------------------------------
def dense_projection(T: int, C: int, dims: int, seed: int) -> np.ndarray:
    """R (T*C, dims) from the documented rule: token t of generator block b = t // 16 (default_rng([seed, b]): first
    16 offsets, then 16 x C sign bits) puts channel c, times its sign, into output (offset + c) % dims."""
    R = np.zeros((T * C, dims))
    for b in range(-(-T // TOKEN_BLOCK)):
        rng = np.random.default_rng([seed, b])
        offsets = rng.integers(0, dims, size=TOKEN_BLOCK)
        signs = 1 - 2 * rng.integers(0, 2, size=(TOKEN_BLOCK, C), dtype=np.int32)
        for j in range(TOKEN_BLOCK):
            t = b * TOKEN_BLOCK + j
            if t < T:
                for c in range(C):
                    R[t * C + c, (offsets[j] + c) % dims] += signs[j, c]
    return R


def planted_subject(root, n: int, seed: int = 0, shuffle: bool = False):
    """An Algonauts subject folder whose fMRI follows the sample subject's planted rule (featstore.sample:
    planted_fmri, sample_rois; local luminance in V1-V3, global content in the category ROIs) for n random
    descriptor rows, without rendering the images (the sweep reads their names only). Returns (folder, D, names)."""
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0, 1, (n, 3))
    lum = rgb @ [0.299, 0.587, 0.114]
    D = np.concatenate([rgb, np.clip(lum[:, None] + 0.2 * rng.standard_normal((n, 16)), 0, 1),
                        rng.uniform(0, 0.3, (n, 1))], axis=1)
    assert D.shape[1] == N_DESCRIPTORS
    subj = root / "subj01"
    images = subj / "training_split" / "training_images"
    fmri = subj / "training_split" / "training_fmri"
    masks = subj / "roi_masks"
    for d in (images, fmri, masks):
        d.mkdir(parents=True)
    names = [f"train-{i + 1:04d}_nsd-{i * 7:05d}.png" for i in range(n)]
    for name in names:
        (images / name).touch()
    order = rng.permutation(n) if shuffle else np.arange(n)
    for hemi, nv in zip(("lh", "rh"), VERTICES):
        np.save(fmri / f"{hemi}_training_fmri.npy", planted_fmri(D, nv, 0, "01", hemi)[0][order])
        for cls, labels in sample_rois(nv, 0, "01", hemi).items():
            np.save(masks / f"{hemi}.{cls}_challenge_space.npy", labels)
    for cls, mapping in ROI_MAPPINGS.items():
        np.save(masks / f"mapping_{cls}.npy", dict(mapping), allow_pickle=True)
    return subj, D, names


def local_and_global(D: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """Two stored "layers" (N, 1 + 16, 8): `local` carries each 4x4 block's luminance in its own token (an
    early-layer-like patch code), `global` the image's mean colour and edge energy in every token (a late-layer-like
    pooled code); both with noise channels."""
    rng = np.random.default_rng(seed)
    n, C = len(D), 8
    local = 0.3 * rng.standard_normal((n, 17, C))
    local[:, 1:, :] += D[:, 3:19, None] * rng.standard_normal(C)
    glob = 0.3 * rng.standard_normal((n, 17, C)) + ((D[:, [0, 1, 2, 19]] - 0.5) @ rng.standard_normal((4, C)))[:, None, :]
    return {"local": local.astype(np.float16), "global": glob.astype(np.float16)}


def write_feature(root, feature: str, x: np.ndarray, names: list[str], chunk: int = 1, pack: int = 1,
                  done_rows: int | None = None):
    """A real array in a store on disk, written as an extraction writes it; `done_rows` < N leaves it incomplete."""
    fs = FeatureStore(root, "a")
    fa, _ = fs.prepare(feature, "01", "train", ArraySpec(x.shape, chunk, str(x.dtype), None, pack),
                       meta={"token_layout": {"cls_index": 0, "grid": [4, 4], "n_tokens": x.shape[1]},
                             "image_names": names}, fingerprint={})
    fa.write_chunks(0, x if done_rows is None else x[:done_rows], durable=False)
    return fa


def ridge_cv_reference(X, Y, train, val, alphas, folds=5):
    """Independent numpy float64 ridge: z-score X on the training rows; per target the alpha with the best mean
    (over unshuffled folds) validation MSE (himalaya's tie-break: a 1e-10 * log(alpha) slope); refit with intercept on
    all training rows; Pearson r on the validation rows."""
    X = (X - X[train].mean(0)) / np.where(X[train].std(0) > 0, X[train].std(0), 1.0)
    Xt, Yt = X[train], Y[train].astype(np.float64)
    eye = np.eye(X.shape[1])

    def fit(a, rows, targets):
        xm, ym = Xt[rows].mean(0), targets[rows].mean(0)
        xc = Xt[rows] - xm
        return np.linalg.solve(xc.T @ xc + a * eye, xc.T @ (targets[rows] - ym)), xm, ym

    scores = np.zeros((len(alphas), Y.shape[1]))
    for f in np.array_split(np.arange(len(train)), folds):
        rows = np.setdiff1d(np.arange(len(train)), f)
        for i, a in enumerate(alphas):
            w, xm, ym = fit(a, rows, Yt)
            scores[i] -= (((Xt[f] - xm) @ w + ym - Yt[f]) ** 2).mean(0) / folds
    best = np.argmax(scores + 1e-10 * np.log(np.asarray(alphas))[:, None], axis=0)
    pred = np.empty((len(val), Y.shape[1]))
    for i, a in enumerate(alphas):
        cols = best == i
        if cols.any():
            w, xm, ym = fit(a, np.arange(len(train)), Yt[:, cols])
            pred[:, cols] = (X[val] - xm) @ w + ym
    p, t = pred - pred.mean(0), Y[val] - Y[val].mean(0)
    return (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0)), np.asarray(alphas)[best]


def planted_store(root, n: int, chunk: int) -> dict:
    subj, D, names = planted_subject(root / "data", n)
    store = root / "store.zarr"
    feats = local_and_global(D)
    for name, x in feats.items():
        write_feature(store, name, x, names, chunk=chunk)
    return {"root": root, "subj": subj, "store": store, "names": names, "D": D, "x": feats}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """2,000 images with the planted rule (1,800 training / 200 validation images in the legacy split: enough for a
    steady chance level), and a store holding the `local` and `global` layers."""
    return planted_store(tmp_path_factory.mktemp("sweep"), 2000, chunk=50)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """240 images with the planted rule: the material of the cache and fault tests."""
    return planted_store(tmp_path_factory.mktemp("small"), 240, chunk=8)


@pytest.fixture(scope="module")
def planted_runs(planted):
    """The sweep of the planted store in float32 (default) and float64, run once for the tests below."""
    root = planted["root"]
    return {dt: sweep(planted["store"], planted["subj"], root / f"out-{dt}", dtype=dt, **FAST)
            for dt in ("float32", "float64")}


# ---- the projection ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("dims", [48, 10])  # 10 < C: a token's channels wrap around the outputs more than once
def test_projection_blocks_equal_whole_and_dense_matrix(dtype, dims):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 2 * TOKEN_BLOCK + 5, 24)) * [1.0] * 24).astype(dtype)
    x[0, 3, 5] = np.float16(6e-8)  # a float16 subnormal converts exactly
    whole = project_tokens(x, dims=dims, seed=3)
    assert whole.shape == (7, dims) and whole.dtype == np.float32
    parts = np.concatenate([project_tokens(x[a:b], dims=dims, seed=3) for a, b in ((0, 1), (1, 4), (4, 7))])
    np.testing.assert_array_equal(parts, whole)  # bit-identical, whatever the images a task holds
    ref = x.astype(np.float64).reshape(7, -1) @ dense_projection(x.shape[1], x.shape[2], dims, 3)
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(project_tokens(x, dims=dims, seed=4), whole)


def test_projection_keeps_inner_products_on_average():
    """E[R R^T] = I: over seeds, projected inner products average to the originals (a few % here)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 40, 32)).astype(np.float32)
    flat = x.reshape(3, -1).astype(np.float64)
    ys = [project_tokens(x, dims=256, seed=s).astype(np.float64) for s in range(40)]
    gram = np.mean([y @ y.T for y in ys], axis=0)
    np.testing.assert_allclose(gram, flat @ flat.T, atol=0.03 * np.abs(flat @ flat.T).max())


# ---- the fit ----------------------------------------------------------------------------------------------------
def test_r_matches_direct_himalaya_fit_and_numpy_ridge(planted, planted_runs):
    from himalaya.ridge import RidgeCV

    from featstore.dataset import train_val_split

    X = project_tokens(planted["x"]["local"], dims=64)
    cached = FeatureStore(planted["store"]).load_derived("_sweep/local/01/train/k64_seed0", _fp(planted, "local"))
    np.testing.assert_array_equal(cached, X)  # the cache holds exactly the in-memory projection
    Y = np.concatenate([np.load(planted["subj"] / f"training_split/training_fmri/{h}_training_fmri.npy")
                        for h in ("lh", "rh")], axis=1)
    train, val = train_val_split(len(X), 0.1)
    assert len(train) == 1800 and len(val) == 200

    std = X[train].std(0, dtype=np.float64)
    assert (std == 0).any()  # outputs no input hashed to (136 inputs, 64 outputs): kept at 0, as the sweep does
    Xs = ((X - X[train].mean(0, dtype=np.float64)) / np.where(std > 0, std, 1.0)).astype(np.float32)
    direct = RidgeCV(alphas=np.asarray(ALPHAS, np.float32), cv=5, fit_intercept=True).fit(Xs[train], Y[train])
    p, t = direct.predict(Xs[val]).astype(np.float64), Y[val].astype(np.float64)
    p, t = p - p.mean(0), t - t.mean(0)
    r_direct = (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))
    got = planted_runs["float32"].r["local"]
    np.testing.assert_allclose(np.concatenate([got["lh"], got["rh"]]), r_direct, atol=1e-6)

    r_ref, a_ref = ridge_cv_reference(X.astype(np.float64), Y, train, val, ALPHAS)
    got64 = planted_runs["float64"]
    np.testing.assert_allclose(np.concatenate([got64.r["local"][h] for h in ("lh", "rh")]), r_ref, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([got64.alphas["local"][h] for h in ("lh", "rh")]), a_ref)


def test_torch_backend_agrees_with_numpy(small, tmp_path):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny fits: a second intra-op thread only waits on a shared 2-core machine
    try:
        ref = sweep(small["store"], small["subj"], tmp_path / "n", **FAST)
        res = sweep(small["store"], small["subj"], tmp_path / "t", backend="torch", **FAST)
    finally:
        torch.set_num_threads(threads)
    for f in res.r:
        for h in ("lh", "rh"):
            np.testing.assert_allclose(res.r[f][h], ref.r[f][h], atol=1e-3)  # float32, another BLAS
    from himalaya.backend import get_backend

    assert get_backend().name == "numpy"  # himalaya's process-wide backend is restored


def test_cli_absent_backend_is_one_line(planted, tmp_path):
    """A real process: under pytest, himalaya's torch_cuda module skips the test instead of raising."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = run_cli("sweep", str(planted["store"]), "--data_dir", str(planted["subj"]), "--output_dir", str(tmp_path / "c"),
                "--backend", "torch_cuda", timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("featstore: error: --backend torch_cuda: not available here (RuntimeError: PyTorch with CUDA is "
                        "not available.)\n")
    assert not (tmp_path / "c").exists()  # refused before any work


def _fp(planted, feature):
    from featstore.encoding.projection import fingerprint

    return fingerprint(FeatureStore(planted["store"]).get(feature, "01", "train"), 64, 0)


def test_planted_signal_ranks_local_for_early_visual_and_global_for_category_rois(planted_runs):
    res = planted_runs["float32"]
    best = res.summary["best_feature_per_roi"]
    early = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d")
    category = ("EBA", "FBA-1", "OFA", "FFA-1", "FFA-2", "OPA", "PPA", "RSC", "OWFA", "VWFA-1", "VWFA-2")
    for roi in early:
        assert best[roi]["feature"] == "local", (roi, best[roi])
    for roi in category:
        assert best[roi]["feature"] == "global", (roi, best[roi])
    feats = res.summary["features"]
    r = {f: {roi: feats[f]["roi_mean_r"][roi]["all"] for roi in early + category} for f in feats}
    assert np.mean([r["local"][roi] for roi in early]) > 0.4 > np.mean([r["global"][roi] for roi in early]) + 0.3
    assert np.mean([r["global"][roi] for roi in category]) > 0.5 > np.mean([r["local"][roi] for roi in category]) + 0.1
    saved = json.loads((res.output_dir / "sweep.json").read_text())
    assert saved["best_feature_per_roi"]["V1v"]["feature"] == "local"
    assert saved["features"]["global"]["roi_mean_r"]["PPA"]["n"] > 0
    assert sum(saved["features"]["local"]["alphas"]["vertices_per_alpha"]) == sum(VERTICES)
    for f in ("r/local.lh.npy", "r/global.rh.npy", "alpha/local.rh.npy"):
        assert (res.output_dir / f).stat().st_size > 0, f
    assert np.load(res.output_dir / "r/local.lh.npy").shape == (VERTICES[0],)
    lines = res.table.splitlines()
    assert lines[0].startswith("best feature per ROI, of 2 features")
    assert any(line.split()[:4] == ["prf-visualrois", "V1v", str(saved["rois"][0]["n"]), "local"] for line in lines)


def test_shuffled_targets_give_chance(tmp_path, planted):
    subj, _, _ = planted_subject(tmp_path / "data", 2000, shuffle=True)  # same images and features, rows permuted
    res = sweep(planted["store"], subj, tmp_path / "out", **FAST)
    for feat, s in res.summary["features"].items():
        assert abs(s["mean_r"]["all"]) < 0.05, (feat, s["mean_r"])
        assert s["projection"]["cached"]  # the store's projections did not change with the targets


# ---- layout independence, the cache, faults --------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A 20-image sample subject extracted twice with the tiny backbone: chunk 1, and chunk 3 packed by 2."""
    from featstore import extract, make_sample_subject

    root = tmp_path_factory.mktemp("ext")
    subj = make_sample_subject(root / "data", n_train=20, n_test=0, seed=2)
    stores = {}
    for name, chunk, pack in (("c1", 1, 1), ("c3p2", 3, 2)):
        extract(subj, root / f"{name}.zarr", backbone="dinov2_q", batch_size=8, chunk=chunk, pack=pack,
                durable=False, **TINY)
        stores[name] = root / f"{name}.zarr"
    return {"root": root, "subj": subj, "stores": stores}


def test_result_does_not_depend_on_chunk_pack_task_size_or_workers(extracted, tmp_path):
    runs = {
        "c1": sweep(extracted["stores"]["c1"], extracted["subj"], tmp_path / "a", dims=32, plots=False),
        "c3p2": sweep(extracted["stores"]["c3p2"], extracted["subj"], tmp_path / "b", dims=32, plots=False,
                      cache=False, task_mb=1e-3),  # one storage unit per task
        "workers": sweep(extracted["stores"]["c3p2"], extracted["subj"], tmp_path / "c", dims=32, plots=False,
                         workers=2),
    }
    fa = FeatureStore(extracted["stores"]["c3p2"]).get("dinov2_q_last", "01", "train")
    assert fa.packed and fa.chunk_len == 6
    key = "_sweep/dinov2_q_last/01/train/k32_seed0"
    cfg = SweepConfig(dims=32).validate()
    from featstore.encoding.projection import fingerprint

    p1 = FeatureStore(extracted["stores"]["c1"]).load_derived(key, fingerprint(
        FeatureStore(extracted["stores"]["c1"]).get("dinov2_q_last", "01", "train"), cfg.dims, cfg.seed))
    p2 = FeatureStore(extracted["stores"]["c3p2"]).load_derived(key, fingerprint(fa, cfg.dims, cfg.seed))
    np.testing.assert_array_equal(p1, p2)  # written by the --workers 2 run; the task_mb run did not cache
    np.testing.assert_array_equal(p1, project_tokens(fa.read(0, 20), dims=32))
    for name in ("c3p2", "workers"):
        for h in ("lh", "rh"):
            np.testing.assert_array_equal(runs[name].r["dinov2_q_last"][h], runs["c1"].r["dinov2_q_last"][h])


def test_rerun_reuses_projections_and_resumes_after_a_failed_array(tmp_path, small):
    store = tmp_path / "s.zarr"
    x = small["x"]
    for i, name in enumerate(("layer0", "layer1", "layer2")):
        write_feature(store, name, x["local" if i % 2 == 0 else "global"], small["names"], chunk=8)
    fa = FeatureStore(store).get("layer2", "01", "train")
    chunk = store / "layer2/01/train/c/3/0/0"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])  # one flipped byte: crc32c fails
    with pytest.raises(CorruptChunkError) as e:
        sweep(store, small["subj"], tmp_path / "out", **FAST)
    assert str(e.value).startswith("layer2/01/train: chunk 3 is corrupt (") and "featstore verify --repair" in str(e.value)
    with pytest.raises(CorruptChunkError) as e2:
        fa.read(0, 240)
    assert str(e2.value) == str(e.value)  # the same line as every other reader

    chunk.write_bytes(good)  # repaired (as verify --repair + extract would)
    second = sweep(store, small["subj"], tmp_path / "out", **FAST)
    assert {f: s["projection"]["cached"] for f, s in second.summary["features"].items()} == {
        "layer0": True, "layer1": True, "layer2": False}  # only the array that failed is projected again
    third = sweep(store, small["subj"], tmp_path / "out", **FAST)
    assert all(s["projection"]["cached"] for s in third.summary["features"].values())
    for f in second.r:
        np.testing.assert_array_equal(third.r[f]["lh"], second.r[f]["lh"])
    other = sweep(store, small["subj"], tmp_path / "out2", features="layer0", seed=1, **FAST)
    assert not other.summary["features"]["layer0"]["projection"]["cached"]  # another seed: another projection


def test_incomplete_array_is_skipped_with_one_line(tmp_path, small, caplog):
    store = tmp_path / "s.zarr"
    write_feature(store, "done", small["x"]["local"], small["names"], chunk=8)
    write_feature(store, "half", small["x"]["global"], small["names"], chunk=8, done_rows=80)
    with caplog.at_level(logging.INFO, logger="featstore"):
        res = sweep(store, small["subj"], tmp_path / "out", **FAST)
    assert list(res.summary["features"]) == ["done"]
    assert res.summary["skipped_incomplete"] == ["half/01/train"]
    lines = [r.getMessage() for r in caplog.records if "half" in r.getMessage()]
    assert lines == ["skipping 1 incomplete array: half/01/train (10/30 chunks done)"]
    with pytest.raises(IncompleteArrayError, match=r"half/01/train is incomplete \(10/30 chunks done\)"):
        sweep(store, small["subj"], tmp_path / "out", features="half", **FAST)


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_sweep_prints_the_table_and_writes_the_files(capsys, extracted, tmp_path):
    out = tmp_path / "out"
    r = cli_here(capsys, "sweep", str(extracted["stores"]["c1"]), "--data_dir", str(extracted["subj"]),
                 "--output_dir", str(out), "--features", "dinov2_q_*", "--dims", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("best feature per ROI, of 1 feature")
    assert f"results: {out / 'sweep.json'}" in r.stdout
    assert json.loads((out / "sweep.json").read_text())["dims"] == 16
    assert (out / "heatmap.png").is_file() and (out / "r_by_feature.png").is_file()

    for args, message in (
        (["--features", "nope"], "featstore: error: --features nope: no train array of subject 01 in "),
        (["--workers", "2", "--scheduler", "tcp://x:1"], "featstore: error: argument --scheduler: not allowed with "),
        (["--dims", "0"], "featstore: error: --dims 0: must be positive"),
        (["--backend", "jax"], "featstore: error: argument --backend: invalid choice: 'jax'"),
    ):
        r = cli_here(capsys, "sweep", str(extracted["stores"]["c1"]), "--data_dir", str(extracted["subj"]),
                     "--output_dir", str(tmp_path / "bad"), *args)
        assert r.returncode == 2 and r.stderr.startswith(message), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_cli_without_himalaya_says_how_to_install_it(tmp_path, extracted):
    fake = tmp_path / "site" / "himalaya"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'himalaya'\")\n")
    path = os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])
    r = run_cli("sweep", str(extracted["stores"]["c1"]), "--data_dir", str(extracted["subj"]), "--output_dir",
                str(tmp_path / "out"), env={"PYTHONPATH": path}, timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("featstore: error: featstore sweep needs himalaya, which is not installed: "
                        "pip install 'featstore[sweep]'\n")
    assert not (tmp_path / "out").exists()
    assert sys.modules.get("himalaya") is himalaya  # this process is untouched
