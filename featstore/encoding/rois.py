"""ROI masks of an Algonauts subject and the query layout of a readout (`--readout_res`).

The transformer brain encoder gives each ROI of the chosen readout its own learned query, per hemisphere, plus one
"rest" query for the vertices in none of them; each query is read out to the vertices of its ROI. This module turns
the subject's `roi_masks/` files into those masks (numpy only, no torch), so models and metrics share one source.
The query layout is the reference training code's (`main.py`), so that its checkpoints load query for query.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadArgumentError, LayoutError
from ..layout import HEMIS, ROI_CLASSES, ROI_DIR, roi_mapping_path, roi_mask_path

# --readout_res -> the ROI classes whose ROIs get a query; "voxels" (a query per vertex) and "hemis" (one per
# hemisphere) need no masks
READOUTS: dict[str, tuple[str, ...]] = {
    "rois_all": ROI_CLASSES[:5],
    "voxels": (),
    "hemis": (),
    "visuals": ("prf-visualrois",),
    "bodies": ("floc-bodies",),
    "faces": ("floc-faces",),
    "places": ("floc-places",),
    "words": ("floc-words",),
    "streams": ("streams",),
    "streams_inc": ("streams",),
}
# Readouts whose loss covers every vertex. The other ROI readouts (one class each) are trained on the vertices inside
# that class's ROIs only: predictions and targets elsewhere are zeroed before the loss, as the reference does;
# streams_inc is streams with every vertex in the loss ("inc": the rest query's vertices included).
WHOLE_LOSS_READOUTS = ("rois_all", "streams_inc", "voxels", "hemis")


@dataclass(frozen=True)
class SubjectRois:
    """The ROI labels of one subject: labels[hemi][class] is an int (n_vertices,) array, names[class] its mapping."""

    labels: dict[str, dict[str, np.ndarray]]
    names: dict[str, dict[int, str]]

    def n_vertices(self, hemi: str) -> int | None:
        first = next(iter(self.labels[hemi].values()), None)
        return None if first is None else len(first)

    def check_vertices(self, n_vertices: dict[str, int]) -> SubjectRois:
        """The masks must cover the fMRI's vertices one to one, or they belong to another subject."""
        for hemi in HEMIS:
            have = self.n_vertices(hemi)
            if have is not None and have != n_vertices[hemi]:
                raise BadArgumentError(
                    f"{hemi} ROI masks have {have} vertices but the fMRI has {n_vertices[hemi]}: not the same subject?"
                )
        return self

    def roi_vertices(self, hemi: str) -> dict[str, np.ndarray]:
        """{ROI name: boolean vertex mask} over every class, for per-ROI scores ("Unknown" left out)."""
        out: dict[str, np.ndarray] = {}
        for cls, labels in self.labels[hemi].items():
            for label, name in self.names[cls].items():
                if label != 0:
                    out[name] = out.get(name, np.zeros(len(labels), bool)) | (labels == label)
        return out


def load_rois(data_dir: str | Path, required: tuple[str, ...] = ROI_CLASSES) -> SubjectRois:
    """Read `roi_masks/{hemi}.{class}_challenge_space.npy` and `mapping_{class}.npy` of a subject folder: every ROI
    class whose mapping file is there; a missing class of `required` is an error."""
    folder = Path(data_dir) / ROI_DIR
    if not folder.is_dir():
        raise LayoutError(f"--data_dir {data_dir}: no {ROI_DIR}/ folder (expected an Algonauts subject folder)")
    labels: dict[str, dict[str, np.ndarray]] = {h: {} for h in HEMIS}
    names: dict[str, dict[int, str]] = {}
    for cls in ROI_CLASSES:
        mapping = roi_mapping_path(data_dir, cls)
        if not mapping.is_file():
            if cls in required:
                raise LayoutError(f"{folder}: missing {mapping.name}")
            continue
        names[cls] = {int(k): str(v) for k, v in np.load(mapping, allow_pickle=True).item().items()}
        for hemi in HEMIS:
            f = roi_mask_path(data_dir, hemi, cls)
            if not f.is_file():
                raise LayoutError(f"{folder}: missing {f.name}")
            lab = np.asarray(np.load(f)).astype(np.int64).reshape(-1)
            unknown = sorted(set(np.unique(lab).tolist()) - set(names[cls]))
            if unknown:
                raise LayoutError(f"{f}: labels {unknown} are not in {mapping.name}")
            first = next(iter(labels[hemi].values()), lab)
            if len(lab) != len(first):
                raise LayoutError(f"{f}: {len(lab)} vertices, but {len(first)} in the other {hemi} ROI files")
            labels[hemi][cls] = lab
    return SubjectRois(labels=labels, names=names)


@dataclass(frozen=True)
class Readout:
    """Which query reads out to which vertices. masks[hemi]: float32 (queries, n_vertices) 0/1, or None for
    "voxels" (query i reads out to vertex i only); query_names[hemi] names the queries. loss_masks[hemi]: bool
    (n_vertices,) of the vertices the loss sees, or None for all of them (see WHOLE_LOSS_READOUTS)."""

    readout_res: str
    masks: dict[str, np.ndarray | None]
    query_names: dict[str, list[str]]
    n_vertices: dict[str, int]
    loss_masks: dict[str, np.ndarray | None] = field(default_factory=lambda: {h: None for h in HEMIS})

    @property
    def num_queries(self) -> int:
        return sum(len(q) for q in self.query_names.values())


def make_readout(readout_res: str, n_vertices: dict[str, int], rois: SubjectRois | None = None) -> Readout:
    """The query layout of `readout_res` for hemispheres of n_vertices[hemi] vertices.

    ROI readouts, as the reference lays them out: one query per label of the class mappings (label 0 "Unknown" is
    not an ROI), in class and label order, then one "rest" query for the vertices in no ROI of those classes.
    Overlapping ROIs both read out to their shared vertices (each query's prediction, bias included, is added).
    A label absent from a hemisphere keeps its query with an empty mask: it predicts nothing, and the query count
    (hence a reference checkpoint's query embeddings) stays the reference's.
    """
    if readout_res not in READOUTS:
        raise BadArgumentError(f"{readout_res!r}: choose one of {', '.join(READOUTS)}", param="readout_res")
    masks: dict[str, np.ndarray | None] = {}
    names: dict[str, list[str]] = {}
    loss_masks: dict[str, np.ndarray | None] = {h: None for h in HEMIS}
    for hemi in HEMIS:
        nv = int(n_vertices[hemi])
        if readout_res == "voxels":
            masks[hemi], names[hemi] = None, [f"{hemi}_v{i}" for i in range(nv)]
            continue
        if readout_res == "hemis":
            masks[hemi], names[hemi] = np.ones((1, nv), np.float32), [hemi]
            continue
        if rois is None:
            raise BadArgumentError(f"{readout_res} needs the subject's ROI masks", param="readout_res")
        rois.check_vertices(n_vertices)
        rows, qnames = [], []
        for cls in READOUTS[readout_res]:
            lab = rois.labels[hemi][cls]
            for label, name in sorted(rois.names[cls].items()):
                if label != 0:
                    rows.append(lab == label)
                    qnames.append(f"{hemi}_{name}")
        covered = np.any(rows, axis=0) if rows else np.zeros(nv, bool)
        rows.append(~covered)
        qnames.append(f"{hemi}_rest")
        masks[hemi], names[hemi] = np.stack(rows).astype(np.float32), qnames
        if readout_res not in WHOLE_LOSS_READOUTS:
            loss_masks[hemi] = covered
    return Readout(readout_res, masks, names, {h: int(n_vertices[h]) for h in HEMIS}, loss_masks)
