"""The stimulus images of an extraction: checked up front from their headers, decoded in DataLoader workers.

Every image of a split must preprocess to the same size (one array holds them all). PIL opens lazily and reads only
the header, so the sizes and colour modes of a whole split are known in well under a second per 10,000 images, before
anything is written: an odd-sized image is a one-line error naming it, not a failure in the middle of the run.
"""
from __future__ import annotations

import logging
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..errors import BadArgumentError, CorruptImageError

if TYPE_CHECKING:
    from ..backbones import Preprocess

log = logging.getLogger(__name__)

_MODE_NAMES = {"L": "greyscale", "LA": "greyscale+alpha", "P": "palette", "1": "1-bit", "I;16": "16-bit greyscale",
               "I": "32-bit greyscale", "F": "float greyscale"}


@dataclass(frozen=True)
class SplitImages:
    """What the headers of one split's images say: the preprocessed size they share, and their colour modes."""

    input_hw: tuple[int, int]
    modes: dict[str, int]  # PIL mode -> number of images

    @property
    def converted(self) -> int:
        """Images that are not RGB and are converted to RGB on decoding (greyscale, RGBA, CMYK, palette, ...)."""
        return sum(n for mode, n in self.modes.items() if mode != "RGB")


def read_headers(paths: list[Path]) -> list[tuple[tuple[int, int], str]]:
    """((height, width), mode) of every image, from its header only; a few threads hide network file systems'
    latency. An unreadable header is the image's one-line CorruptImageError."""

    def one(path: Path) -> tuple[tuple[int, int], str]:
        try:
            with Image.open(path) as im:
                return (im.height, im.width), im.mode
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            raise CorruptImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None

    if len(paths) < 256:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, paths))


def check_splits(images: dict[str, list[Path]], preprocess: Preprocess) -> dict[str, SplitImages]:
    """Read every image's header; refuse (BadArgumentError, before anything is written) a split whose images do not
    all preprocess to one size, naming the odd ones; say in one line how many images are converted to RGB."""
    out = {}
    for split, paths in images.items():
        headers = read_headers(paths)
        sizes = [preprocess.output_size(hw) for hw, _ in headers]
        counts = Counter(sizes)
        common = max(counts, key=lambda s: (counts[s], s == sizes[0]))  # the majority; on a tie, the first image's
        odd = [i for i, s in enumerate(sizes) if s != common]
        if odd:
            usual = next(headers[i][0] for i, s in enumerate(sizes) if s == common)
            names = ", ".join(f"{paths[i].name} ({_wh(headers[i][0])})" for i in odd[:5])
            more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
            raise BadArgumentError(
                f"{paths[0].parent}: {len(odd)} of {len(paths)} images differ in size from the others "
                f"({_wh(usual)}): {names}{more}; resize or remove them, or pass --image_size S to resize every "
                "image to SxS; nothing was written"
            )
        out[split] = SplitImages(common, dict(Counter(mode for _, mode in headers)))
    converted = sum(s.converted for s in out.values())
    if converted:
        modes = Counter()
        for s in out.values():
            modes.update({m: n for m, n in s.modes.items() if m != "RGB"})
        kinds = ", ".join(f"{n} {_MODE_NAMES.get(m, m)}" + (f" ({m})" if m in _MODE_NAMES else "")
                          for m, n in modes.most_common())
        log.info("converting %d of %d images to RGB (%s), as the backbone expects; recorded as converted_to_rgb in "
                 "the arrays' provenance", converted, sum(len(p) for p in images.values()), kinds)
    return out


def _wh(hw: tuple[int, int]) -> str:
    return f"{hw[1]}x{hw[0]} px"


class ImageFiles:
    """A map-style dataset for torch's DataLoader: decodes and preprocesses images in its workers; errors travel back
    as data, not tracebacks."""

    def __init__(self, paths: list[Path], indices: list[int], preprocess: Preprocess, input_hw: tuple[int, int]):
        self.paths, self.indices, self.preprocess, self.input_hw = paths, indices, preprocess, tuple(input_hw)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path = self.paths[idx]
        try:
            with Image.open(path) as im:
                x = self.preprocess(im)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            return idx, f"{path}: cannot decode image ({type(e).__name__}: {e})"
        if tuple(x.shape[-2:]) != self.input_hw:  # the file changed since the headers were checked
            return idx, f"{path}: preprocessed size {tuple(x.shape[-2:])} differs from the split's {self.input_hw}"
        return idx, x


def collate(items):
    import torch

    idx = [i for i, _ in items]
    errors = [x for _, x in items if isinstance(x, str)]
    if errors:
        return idx, None, errors
    return idx, torch.stack([x for _, x in items]), []


def quiet_worker(_: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops them after settling its writes; a
    group-wide signal (Ctrl-C, scancel, kill -- -PGID) then never kills a worker under the main process's feet."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
