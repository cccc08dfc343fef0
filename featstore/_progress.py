"""The tqdm class behind featstore's progress bars.

`tqdm.auto` picks the notebook widget inside Jupyter, but where ipywidgets is missing it warns `IProgress not found`
the moment it is imported (importing featstore in a notebook did that). Here the widget is used only where
ipywidgets is installed; otherwise the plain text bar, which a notebook shows just as well.
"""
from __future__ import annotations

from importlib.util import find_spec

if find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
