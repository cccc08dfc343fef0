"""The Algonauts 2023 subject folder: which images form which split, where the fMRI and the ROI masks live, and the
names of the hemispheres and ROI classes. The one definition of the layout: readers (extraction, Dataset, encoders,
sweep) and the synthetic sample subject all ask here.

Split names follow the legacy export: `train` = training_split/training_images, `synt` = test_split/test_images.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadArgumentError, LayoutError

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": Path("training_split/training_images"), "synt": Path("test_split/test_images")}
FMRI_DIR = Path("training_split/training_fmri")
ROI_DIR = Path("roi_masks")
HEMIS = ("lh", "rh")
# the Algonauts 2023 ROI classes, in the challenge's order
ROI_CLASSES = ("prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words", "streams")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Subject:
    root: Path
    images: dict[str, list[Path]] = field(default_factory=dict)  # split -> images sorted by file name

    @property
    def splits(self) -> list[str]:
        return list(self.images)

    def fmri(self, hemi: str) -> Path:
        """Path of `{lh,rh}_training_fmri.npy` (rows follow the sorted training images)."""
        return fmri_path(self.root, hemi)


def fmri_path(root: Path, hemi: str) -> Path:
    return Path(root) / FMRI_DIR / f"{hemi}_training_fmri.npy"


def roi_mask_path(root: Path, hemi: str, cls: str) -> Path:
    """`roi_masks/{hemi}.{class}_challenge_space.npy`: one ROI label per vertex."""
    return Path(root) / ROI_DIR / f"{hemi}.{cls}_challenge_space.npy"


def roi_mapping_path(root: Path, cls: str) -> Path:
    """`roi_masks/mapping_{class}.npy`: the class's label -> ROI name dict (pickled)."""
    return Path(root) / ROI_DIR / f"mapping_{cls}.npy"


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def suffixes() -> str:
    """".png, .jpg or .jpeg": the image files a split folder is read for, for messages."""
    return ", ".join(IMAGE_SUFFIXES[:-1]) + " or " + IMAGE_SUFFIXES[-1]


def read_subject(data_dir: str | Path, splits: list[str] | None = None) -> Subject:
    """List the subject's images (.png, .jpg, .jpeg) per split. A missing train folder is an error; a missing test
    folder, or a split folder without images, is skipped with a warning; no images in any split is an error."""
    root = Path(data_dir)
    if not root.is_dir():
        raise LayoutError(f"--data_dir {root}: no such folder (expected an Algonauts subject folder like .../subj01)")
    wanted = splits or list(SPLIT_DIRS)
    for s in wanted:
        if s not in SPLIT_DIRS:
            raise LayoutError(f"unknown split {s!r}; splits are: {', '.join(SPLIT_DIRS)}")
    images: dict[str, list[Path]] = {}
    for split in wanted:
        folder = root / SPLIT_DIRS[split]
        if not folder.is_dir():
            if split == "train":
                raise LayoutError(f"--data_dir {root}: missing {SPLIT_DIRS[split]}/ (not an Algonauts subject folder?)")
            log.warning("%s: no %s/ folder; split %r skipped", root, SPLIT_DIRS[split], split)
            continue
        files = _images_in(folder)
        if not files:
            log.warning("%s: no images (%s files); split %r skipped", folder, suffixes(), split)
            continue
        images[split] = files
    if not images:
        raise LayoutError(f"--data_dir {root}: no images ({suffixes()} files) in "
                          f"{' or '.join(f'{SPLIT_DIRS[s]}/' for s in wanted)}")
    return Subject(root=root, images=images)


def normalize_subj(subj: str | int) -> str:
    """`1`, `01` and `subj01` all name subject 01 (the guide's main.py writes `--subj 1`)."""
    m = re.fullmatch(r"(?:subj)?0*(\d{1,2})", str(subj).strip())
    if not m or int(m.group(1)) < 1:
        raise BadArgumentError(f"--subj {subj!r}: expected a subject number like 1 or 01")
    return f"{int(m.group(1)):02d}"
