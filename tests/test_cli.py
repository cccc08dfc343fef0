"""The read side of failures: a corrupt chunk, a failed export, `info` on an incomplete array, `stats` output files and
read-only stores, help text and flag spellings, and the guide's extract_features_new.py. Real stores on disk (the
tiny backbone), the real CLI in subprocesses where the exit path matters."""
from __future__ import annotations

import logging
import os
import re
import resource
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_here, run_cli

import featstore
from featstore.cli import build_parser, main
from featstore.errors import CorruptChunkError
from featstore.export import export_npy
from featstore.storage import ArraySpec

TOOL = Path(__file__).resolve().parents[1] / "tools" / "extract_features_new.py"
FEATURE = "dinov2_q_last"
BAD_CHUNK = 3


def chunk_file(store: Path, path: str, i: int) -> Path:
    """The file of chunk i of a one-sample-per-chunk array (zarr v3 default keys: c/i/0/0)."""
    files = [p for p in (store / path / "c" / str(i)).rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, subject):
    """A complete tiny-backbone store, and a copy in which one byte of done chunk 3 of train is flipped."""
    root = tmp_path_factory.mktemp("cli")
    good = root / "good.zarr"
    featstore.extract(subject, good, subj="01", backbone="dinov2_q", batch_size=4, **TINY)
    bad = root / "bad.zarr"
    shutil.copytree(good, bad)
    f = chunk_file(bad, f"{FEATURE}/01/train", BAD_CHUNK)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return good, bad


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("featstore: error: "), lines[0]
    return lines[0]


def assert_names_corrupt_chunk(line: str) -> None:
    assert f"{FEATURE}/01/train" in line and f"chunk {BAD_CHUNK}" in line, line
    assert "featstore verify --repair" in line and "extract" in line, line


# ---- a corrupt chunk is one line on every read path; no temp file survives --------------------------------
def test_export_npy_of_corrupt_chunk_is_one_line_and_leaves_no_partial(stores, tmp_path):
    _, bad = stores
    out = tmp_path / "npy"
    r = run_cli("export-npy", "--store", str(bad), "--output_dir", str(out))
    assert r.returncode == 1, r.stderr
    assert_names_corrupt_chunk(one_error_line(r))
    assert "Traceback" not in r.stderr and "cannot schedule" not in r.stderr
    assert not list(out.rglob("*.partial")) and not (out / FEATURE / "01" / "train.npy").exists()


def test_stats_of_corrupt_chunk_is_one_line(stores):
    _, bad = stores
    r = run_cli("stats", str(bad), "--feature", FEATURE, "--no_save")
    assert r.returncode == 1, r.stderr
    assert_names_corrupt_chunk(one_error_line(r))


def test_stats_on_a_cluster_names_the_corrupt_chunk(stores):
    """The chunk fails inside a worker process; the caller still gets the one-line error naming it."""
    pytest.importorskip("distributed")
    _, bad = stores
    with pytest.raises(CorruptChunkError, match=f"chunk {BAD_CHUNK} is corrupt"):
        featstore.feature_stats(bad, FEATURE, "01", "train", workers=1, save=False)


def test_info_reads_no_chunk_and_the_repair_advice_works(stores, subject, tmp_path, capsys):
    """`info` still lists a store with a corrupt chunk; `verify --repair` + the same extract recompute exactly that
    chunk, after which the export is bit-identical to the export of the intact store."""
    good, bad = stores
    fixed = tmp_path / "fixed.zarr"
    shutil.copytree(bad, fixed)
    assert main(["info", str(fixed)]) == 0
    assert f"{FEATURE}/01/train" in capsys.readouterr().out
    assert main(["verify", str(fixed), "--repair"]) == 1
    assert f"corrupt chunks: {BAD_CHUNK} (marked not done)" in capsys.readouterr().out
    res = featstore.extract(subject, fixed, subj="01", backbone="dinov2_q", batch_size=4, **TINY)
    assert [s.computed for s in res.splits] == [1, 0]
    a = export_npy(good, tmp_path / "a", progress=False)
    b = export_npy(fixed, tmp_path / "b", progress=False)
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()


def test_interrupted_export_keeps_no_temp_file(stores, tmp_path, monkeypatch):
    """Ctrl-C (or any exception) in the middle of an array: neither the .partial nor a final file remains."""
    good, _ = stores
    real = featstore.FeatureArray.read
    seen = []

    def read(self, start, stop=None):
        seen.append(start)
        if self.split == "train" and start >= 2:
            raise KeyboardInterrupt
        return real(self, start, stop)

    monkeypatch.setattr(featstore.FeatureArray, "read", read)
    with pytest.raises(KeyboardInterrupt):
        export_npy(good, tmp_path / "npy", progress=False)
    assert seen and not list((tmp_path / "npy").rglob("*.partial"))
    assert not (tmp_path / "npy" / FEATURE / "01" / "train.npy").exists()


def test_export_that_cannot_write_is_one_line_and_leaves_no_partial(stores, tmp_path):
    """A real write failure: the file-size limit (EFBIG, as a full disk gives ENOSPC) stops the first .npy."""
    good, _ = stores
    out = tmp_path / "npy"
    limit = 200_000  # bytes: below either .npy (369 kB and 1.1 MB)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "featstore.cli", "export-npy", "--store", str(good), "--output_dir",
                        str(out)], capture_output=True, text=True, timeout=300, preexec_fn=small_files, check=False)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r)
    assert ".npy.partial" in line and "nothing was kept" in line, line
    assert not [p for p in out.rglob("*") if p.is_file()]


# ---- info on an incomplete array ------------------------------------------------------------------------
def test_info_ratio_counts_done_chunks_only(tmp_path, capsys):
    """10 of 40 chunks written: the ratios are those of the complete array, not 4x them; none written: "-"."""
    rng = np.random.default_rng(0)
    fs = featstore.FeatureStore(tmp_path / "s.zarr", "a")
    x = rng.standard_normal((40, 17, 64)).astype("float16")
    for split, done in (("train", 10), ("synt", 0), ("full", 40)):
        fa, _ = fs.prepare("feat", "01", split, ArraySpec(x.shape, 1, "float16"), fingerprint={},
                           meta={"token_layout": {"cls_index": 0, "grid": [4, 4], "n_tokens": 17},
                                 "image_names": [f"img{i:05d}.png" for i in range(40)]})
        fa.write_chunks(0, x[:done], durable=False)
    assert main(["info", str(tmp_path / "s.zarr")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "over the done chunks only" in lines[0]
    head = lines[1]
    cols = {name: head.index(name) for name in ("ratio", "vs f32 npy", "done")}

    def cell(row: str, name: str) -> str:
        return row[cols[name]:].split()[0]

    rows = {line.split()[0]: line for line in lines[2:]}
    full, train, synt = rows["feat/01/full"], rows["feat/01/train"], rows["feat/01/synt"]
    assert (cell(full, "done"), cell(train, "done"), cell(synt, "done")) == ("40/40", "10/40", "0/40")
    for name in ("ratio", "vs f32 npy"):
        complete, partial = float(cell(full, name).rstrip("x")), float(cell(train, name).rstrip("x"))
        assert abs(partial / complete - 1) < 0.1, (name, partial, complete)  # was ~4x: 40 rows over 10 rows' bytes
        assert cell(synt, name) == "-"


# ---- stats output file, read-only store -------------------------------------------------------------------
def test_stats_plot_without_extension_prints_the_file_written(stores, tmp_path, capsys):
    good, _ = stores
    out = tmp_path / "plot_noext"
    assert main(["stats", str(good), "--feature", FEATURE, "--split", "synt", "--no_save", "--plot", str(out)]) == 0
    assert f"plot: {out}.png" in capsys.readouterr().out.splitlines()
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["stats", str(good), "--feature", FEATURE, "--no_save", "--plot", str(tmp_path / "p.xyz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot" in err[0] and ".png" in err[0]


@pytest.fixture
def read_only_copy(stores, tmp_path):
    """A copy of the store that nobody can write to: mode a-w, plus the immutable flag when running as root."""
    good, _ = stores
    ro = tmp_path / "ro.zarr"
    shutil.copytree(good, ro)
    dirs = [ro, *[p for p in ro.rglob("*") if p.is_dir()]]
    for d in dirs:
        d.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", *map(str, dirs)], capture_output=True, check=False).returncode == 0
        if not immutable:
            for d in dirs:
                d.chmod(0o755)
            pytest.skip("running as root without chattr: cannot make a store read-only")
    yield ro
    if immutable:
        subprocess.run(["chattr", "-i", *map(str, dirs)], check=True)
    for d in dirs:
        d.chmod(0o755)


def test_stats_on_read_only_store_names_the_store_and_no_save(read_only_copy, capsys):
    ro = read_only_copy
    assert main(["stats", str(ro), "--feature", FEATURE, "--split", "synt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ro) in err[0] and "--no_save" in err[0] and "--output_dir" not in err[0], err
    assert main(["stats", str(ro), "--feature", FEATURE, "--split", "synt", "--no-save"]) == 0
    assert "patch tokens" in capsys.readouterr().out


# ---- help text, defaults, both spellings, one-line usage errors -------------------------------------------
COMMANDS = ("extract", "export-npy", "info", "sample", "verify", "stats", "demo")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_argument_has_help_and_defaults_and_both_spellings(name, capsys):
    """Read from what a user sees: every flag of `featstore NAME --help` has a help text, one that names its default
    where it has one, and answers to the hyphenated spelling too."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", text.split("\noptions:\n", 1)[1])
    for entry in entries[1:]:  # [0] is -h/--help
        flag = entry.split()[0].rstrip(",")
        assert len(entry.split()) >= 4, f"featstore {name} {flag}: no help text"  # flag, metavar, a few words
        assert flag == flag.replace("-", "_").replace("__", "--", 1), f"featstore {name} {flag}: shown hyphenated"
    for flag, dest, value in (("--n-train", "n_train", "2"), ("--batch-size", "batch_size", "3"),
                              ("--output-dir", "output_dir", "O"), ("--no-save", "save", "False")):
        cmd = {"n_train": "sample", "batch_size": "extract", "output_dir": "export-npy", "save": "stats"}[dest]
        base = {"sample": ["R"], "extract": ["--data_dir", "D", "--output_dir", "O"],
                "export-npy": ["--store", "S"], "stats": ["S", "--feature", "f"]}[cmd]
        if cmd != name:
            continue
        ns = build_parser().parse_args([cmd, *base, flag, *([value] if value not in (None, "False") else [])])
        assert str(getattr(ns, dest)) == (value or "True"), (flag, ns)
    if name == "sample":
        assert "--n_train" in text and "--n-train" not in text and "(default: 16)" in text
    if name == "extract":
        batch = text.split("--batch_size BATCH_SIZE", 2)[-1].split("--device", 1)[0]
        assert "default" in batch and "16" in batch, batch


def test_top_level_help_speaks_to_users():
    text = build_parser().format_help()
    for needle in ("featstore extract", "featstore info", "featstore export-npy", "featstore stats",
                   "FeatureDataset", "featstore demo", "--data-dir"):
        assert needle in text, needle


def test_flag_spellings_and_usage_errors(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--n-train", "2", "--n_test", "1", "--seed", "3"]) == 0
    assert len(list((tmp_path / "subj01" / "training_split" / "training_images").iterdir())) == 2
    ns = build_parser().parse_args(["extract", "--data-dir", "D", "--output-dir", "O", "--batch-size", "3"])
    assert (ns.data_dir, ns.output_dir, ns.batch_size) == ("D", "O", 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["sample"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featstore: error:") and "root" in err[0], err
    with pytest.raises(SystemExit):
        main(["extract", "--output-dir", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required: --data_dir (see: featstore extract --help)" in err[0], err


# ---- the guide's script ----------------------------------------------------------------------------------
def test_extract_features_new_help_and_wrote_lines(subject, tmp_path, capsys, caplog):
    tool = runpy.run_path(str(TOOL))  # the script's functions, without running it
    opt = tool["build_parser"]().format_help().split("--output_dir OUTPUT_DIR", 2)[-1][:300]
    assert ".npy" in opt and "featstore.zarr" in opt, opt
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG, logger="featstore")
    assert tool["main"](["--data-dir", str(subject), "--output_dir", str(out), "--subj", "1", "--arch", "tiny",
                         "--weights", "random", "--device", "cpu", "--num_workers", "0"]) == 0
    captured = capsys.readouterr()
    said = (captured.out + captured.err).splitlines() + [r.getMessage() for r in caplog.records if r.levelno >= 20]
    expected = [f"wrote {out / FEATURE / '01' / s}.npy" for s in ("synt", "train")]
    assert sorted(line for line in said if "wrote" in line) == expected, said
    assert np.load(out / FEATURE / "01" / "train.npy").shape[:2] == (6, 962)


# ---- what users read after a partial run, a packed run, or through a closed pipe -------------------------------------
def _partial_store(root: Path, written: int, done: int, pack: int = 1) -> Path:
    """An uncompressed float16 array of 12 one-sample chunks: `written` units written, the first `done` of them
    marked done (the others as a run stopped by a full disk leaves them: files, no marker)."""
    fs = featstore.FeatureStore(root, "a")
    x = np.random.default_rng(0).standard_normal((12, 17, 64)).astype("float16")
    fa, _ = fs.prepare("feat", "01", "train", ArraySpec(x.shape, 1, "float16", "none", pack), fingerprint={},
                       meta={"token_layout": {"cls_index": 0, "grid": [4, 4], "n_tokens": 17},
                                        "image_names": [f"img{i:05d}.png" for i in range(12)]})
    rows = min(written * fa.chunk_len, 12)
    fa.write_chunks(0, x[:rows], durable=False)
    fa.mark_undone(list(range(done, written)))
    return root


def _info_cells(out: str, array: str) -> dict[str, str]:
    """The cells of `array`'s row of the `info` table, cut at the header's column starts."""
    lines = out.splitlines()
    head, row = lines[1], next(line for line in lines if line.startswith(array + " "))
    names = ["array", "shape", "dtype", "chunks", "codec", "on disk", "ratio", "vs f32 npy", "done", "weights"]
    starts = [head.index(n) for n in names] + [None]
    return {n: row[a:b].strip() for n, a, b in zip(names, starts, starts[1:])}


def test_info_ratio_ignores_chunks_written_but_not_marked_done(tmp_path, capsys):
    """A disk-full run: 8 chunk files written, 4 marked done. An uncompressed float16 array stores 1.00x its raw
    bytes (plus a 4-byte checksum a chunk) and half the float32 .npy, whatever lies around undone."""
    store = _partial_store(tmp_path / "s.zarr", written=8, done=4)
    r = cli_here(capsys, "info", str(store))
    assert r.returncode == 0, r.stderr
    cells = _info_cells(r.stdout, "feat/01/train")
    assert (cells["ratio"], cells["vs f32 npy"], cells["done"]) == ("1.00x", "2.00x", "4/12 chunks"), cells


def test_verify_of_an_incomplete_array_says_rerun_the_extract_not_repair(tmp_path, capsys):
    store = _partial_store(tmp_path / "s.zarr", written=5, done=5)
    r = cli_here(capsys, "verify", str(store))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0] == "feat/01/train: incomplete: 5/12 chunks done, 0 corrupt, 7 missing", lines
    assert lines[-1] == ("incomplete, nothing corrupt: 7 chunks of feat/01/train not written yet; rerun the extract "
                         "command to finish (no --repair needed)"), lines
    assert "verify --repair" not in r.stdout


def test_a_packed_array_counts_packs_wherever_units_are_counted(subject, tmp_path, capsys):
    """--pack 4 over 6 one-sample chunks: 2 packs of 4 chunks are the units done, written and checked."""
    store = tmp_path / "p.zarr"
    r = cli_here(capsys, "extract", "--data_dir", str(subject), "--output_dir", str(store), "--arch", "tiny",
                 "--weights", "random", "--device", "cpu", "--num_workers", "0", "--pack", "4")
    assert r.returncode == 0, r.stderr
    train = next(line for line in r.stdout.splitlines() if line.startswith(f"{FEATURE}/01/train:"))
    assert "(done 2/2 packs)" in train, train
    r = cli_here(capsys, "info", str(store))
    cells = _info_cells(r.stdout, f"{FEATURE}/01/train")
    assert (cells["chunks"], cells["done"]) == ("1x962x48 (4/pack)", "2/2 packs"), cells
    fa = featstore.FeatureStore(store, "a").get(FEATURE, "01", "train")
    fa.mark_undone([1])
    with pytest.raises(featstore.errors.IncompleteArrayError, match=r"\(1/2 packs done\)"):
        fa.require_complete()
    r = cli_here(capsys, "verify", str(store))
    assert f"{FEATURE}/01/train: incomplete: 1/2 packs done, 0 corrupt, 1 missing" in r.stdout
    assert "  missing packs: 1" in r.stdout and f"1 pack of {FEATURE}/01/train not written yet" in r.stdout


@pytest.mark.parametrize("args", [["info", "STORE"], ["verify", "STORE"]])
def test_a_closed_pipe_ends_the_command_quietly(stores, args):
    """`featstore info STORE | head -2`: the reader is gone before featstore writes. No traceback, no 'Exception
    ignored' at exit: the exit status of a process ended by SIGPIPE (141), as `cat` gives."""
    good, _ = stores
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "featstore.cli", *[str(good) if a == "STORE" else a for a in args]],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write_end)
    assert p.returncode == 141, p.stderr
    assert "Error" not in p.stderr and "Exception" not in p.stderr and "featstore:" not in p.stderr, p.stderr
