"""What differs between two array configurations, said the way a user reads it (a refused rerun names it)."""
from __future__ import annotations

import json
from typing import Any


def fingerprint_diff(old: dict, new: dict, old_meta: dict | None = None, new_meta: dict | None = None,
                     ignore: tuple[str, ...] = ()) -> str:
    """Human-readable summary of what differs between two fingerprints ('' when equal), leaving out the keys in
    `ignore` (how an array is stored, never what its values are)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k in ignore or (k == "format_version" and old.get(k, 0) == new.get(k, 0)):
            continue
        if k == "pack" and old.get(k, 1) == new.get(k, 1):
            continue
        if k == "precision" and old.get(k, "float32") == new.get(k, "float32"):  # arrays made before --precision
            continue
        if old.get(k) == new.get(k):
            continue
        if k == "images" and old_meta and new_meta:
            diffs.append(image_list_diff(old_meta.get("image_names", []), new_meta.get("image_names", [])))
        elif k == "codecs" and _codec_label(old.get(k)) != _codec_label(new.get(k)):
            diffs.append(f"codec: stored {_codec_label(old.get(k))} vs now {_codec_label(new.get(k))}")
        else:
            diffs.append(_value_diff(k, old.get(k), new.get(k)))
    return "; ".join(diffs)


def _codec_label(codecs: list[dict] | None) -> str:
    """'none', 'blosc lz4 shuffle', ...: the compression steps of a codec list, as --codec users think of them."""
    steps = []
    for c in codecs or []:
        cfg = c.get("configuration", {})
        if c.get("name") == "blosc":
            steps.append(f"blosc {cfg.get('cname')} {cfg.get('shuffle')}")
        elif c.get("name") == "numcodecs.bitround":
            steps.append(f"bitround-{cfg.get('keepbits')}")
        elif c.get("name") not in ("bytes", "crc32c"):
            steps.append(str(c.get("name")))
    return " + ".join(steps) or "none"


def _value_diff(key: str, old: Any, new: Any) -> str:
    """The first place where two JSON values differ, so long values (codec lists) never look identical."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                return _value_diff(f"{key}.{k}", old.get(k), new.get(k))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _value_diff(f"{key}[{i}]", a, b)
    return f"{key}: stored {_short(old)} vs now {_short(new)}"


def image_list_diff(old: list[str], new: list[str]) -> str:
    if len(old) != len(new):
        return f"image list: stored {len(old)} images vs now {len(new)}"
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"image list: index {i} stored {a} vs now {b}"
    return "image list: same names but different file sizes"


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."
