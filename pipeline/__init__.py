"""daam-pipeline: Dynamic Accumulated Attention Maps for timm Vision Transformers at dataset scale."""

from pipeline.engine.daam import DAAM, DAAMResult

__all__ = ["DAAM", "DAAMResult"]
__version__ = "0.1.0"
