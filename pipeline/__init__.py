"""daam-pipeline: Dynamic Accumulated Attention Maps for timm Vision Transformers at dataset scale.

The public names are imported lazily, so that ``import pipeline.errors`` (or the CLI's ``--help``) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["DAAM", "DAAMResult", "MemoryBank", "open_results"]
__version__ = "0.1.0"

_LAZY = {
    "DAAM": "pipeline.engine.daam",
    "DAAMResult": "pipeline.engine.daam",
    "MemoryBank": "pipeline.engine.bank",
    "open_results": "pipeline.store.results",
}

if TYPE_CHECKING:
    from pipeline.engine.bank import MemoryBank
    from pipeline.engine.daam import DAAM, DAAMResult
    from pipeline.store.results import open_results


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
