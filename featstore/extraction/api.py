"""`extract()`: check every argument (before torch is imported, so a wrong flag fails in a fraction of a second),
then plan each split and fill it here (run.py) or as dask tasks (cluster.py)."""
from __future__ import annotations

import logging
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ..errors import BadArgumentError
from ..layout import read_subject
from ..storage import FeatureStore, check_writable_dir, is_url
from .config import ExtractConfig
from .images import check_splits
from .launcher import detect_share, local_rank
from .plan import ExtractResult, SplitPlan

log = logging.getLogger(__name__)


def extract(
    data_dir: str | Path,
    output_dir: str | Path,
    config: ExtractConfig | None = None,
    *,
    store: FeatureStore | None = None,
    dry_run: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> ExtractResult:
    """Extract one subject's features into the store at `output_dir` (a folder or an fsspec URL), resuming whatever
    is already done. Options are the fields of ExtractConfig (e.g. backbone="dinov2_q,dinov2", enc_layer="0:12").
    `dry_run` only reports the arrays, their shapes and the bytes they will take. `scheduler` (a dask.distributed
    ADDRESS) or `workers` (a LocalCluster of N processes) runs the units left as tasks on a cluster (cluster.py)."""
    known = {f.name for f in fields(ExtractConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"extract() got unknown option(s) {', '.join(bad)}; options are: {', '.join(sorted(known))}")
    cfg = replace(config or ExtractConfig(), **options).validate()
    share = detect_share(cfg.shard)
    data_dir = Path(data_dir)
    subject = read_subject(data_dir, cfg.splits)
    subj = _check_subj(cfg.subj, data_dir)
    if dry_run:
        fs = store or _open_for_plan(output_dir, cfg)
        bb = cfg.build_backbone(shapes_only=True)
        checked = check_splits(subject.images, bb.preprocess)
        planned = [p for split, paths in subject.images.items()
                   for p in SplitPlan(fs, bb, cfg, subj, split, paths, share, checked[split]).plan()]
        return ExtractResult(store=str(output_dir), feature=bb.outputs[0].feature, planned=planned)
    if store is None and not is_url(str(output_dir)):
        check_writable_dir(Path(output_dir), "output_dir")  # before any model is loaded
    if scheduler is not None or workers is not None:
        from .cluster import extract_on_cluster

        return extract_on_cluster(subject, subj, output_dir, cfg, store=store, scheduler=scheduler, workers=workers)
    from ..devices import resolve_device
    from .precision import check_precision
    from .run import run_split

    dev = resolve_device(cfg.device, local_rank=local_rank(cfg.shard))
    check_precision(cfg.precision, dev)  # before the model is loaded
    bb = cfg.build_backbone()
    checked = check_splits(subject.images, bb.preprocess)  # every image's header, before anything is written
    bb.to(dev)
    fs = store or FeatureStore(output_dir, mode="a", storage_options=cfg.storage_options)
    if cfg.shard is not None:
        log.info("%s", share.line())
    result = ExtractResult(store=fs.location, feature=bb.outputs[0].feature)
    for split, paths in subject.images.items():
        result.splits.extend(run_split(SplitPlan(fs, bb, cfg, subj, split, paths, share, checked[split]), dev))
    return result


def _check_subj(subj: str, data_dir: Path) -> str:
    m = re.fullmatch(r"subj(\d{2})", data_dir.resolve().name)
    if m and m.group(1) != subj:
        raise BadArgumentError(f"{subj} does not match the subject folder {data_dir} (subject {m.group(1)})",
                               param="subj")
    return subj


def _open_for_plan(output_dir: str | Path, cfg: ExtractConfig) -> FeatureStore | None:
    """A dry run reads an existing store (to count what is left) and never creates one."""
    try:
        return FeatureStore(output_dir, mode="r", storage_options=cfg.storage_options)
    except Exception:  # noqa: BLE001 - no store yet: everything is left to do
        return None
