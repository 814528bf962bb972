"""What every comparison explainer shares: the maps it hands over, the hooks it owns, its context.

An explainer works over a :class:`~pipeline.engine.daam.DAAM` engine and explains the same score Y. A *pass
explainer* computes its maps with hooks inside DAAM's own forward and backward pass; an explainer with its own pass
(the LRP rules of :mod:`pipeline.engine.explainers.lrp`) runs it after DAAM's, on the same images and Y.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pipeline.engine.daam import DAAM, DAAMResult
from pipeline.engine.hooks import BlockCapture
from pipeline.errors import PipelineError
from pipeline.names import PER_BLOCK_EXPLAINERS

__all__ = ["Explainer", "ExplainerMaps", "PassExplainer", "exact"]


@contextlib.contextmanager
def exact(device: torch.device) -> Iterator[None]:
    """Float32 arithmetic outside autograd, whatever autocast the model runs under."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


@dataclass(frozen=True)
class ExplainerMaps:
    """One explainer's maps of a batch of B images, float32 on the images' device.

    Attributes:
        arrays: What the store keeps, by array name (:data:`pipeline.names.EXPLAINER_ARRAYS`).
        blocks: ``(B, L, h, w)`` non-negative per-block maps, whose statistics go to the explainer_blocks table;
            None for an explainer with one map (Grad-CAM).
        final: ``(B, h, w)`` non-negative: the method's map, evaluated beside DAAM's final map, and the final map
            of the per-block statistics.
        top_down: The per-block maps are read from the last block down (relevance at each block's input): their
            final map is not the last block's (:data:`pipeline.names.TOP_DOWN_EXPLAINERS`).
    """

    arrays: dict[str, Tensor]
    blocks: Tensor | None
    final: Tensor
    top_down: bool = False

    @property
    def through_final(self) -> Tensor:
        """The per-block maps when they end at the final map, ``(B, L, h, w)``; else the final map alone,
        ``(B, 1, h, w)`` (Grad-CAM's one map, the LRP explainers' input map): what the sanity check compares."""
        return self.final[:, None] if self.blocks is None or self.top_down else self.blocks


class Explainer:
    """One comparison method over a DAAM engine; a context manager that removes its hooks on exit.

    Args:
        daam: The DAAM engine whose score Y the explainer explains (opened now or later).
    """

    name: ClassVar[str]

    def __init__(self, daam: DAAM) -> None:
        self.daam = daam
        self.model: nn.Module = daam.model
        self.num_blocks = daam.num_blocks
        self.num_prefix_tokens = daam.num_prefix_tokens
        self._handles: list[RemovableHandle] = []

    def explain(self, images: Tensor, result: DAAMResult) -> ExplainerMaps:
        """The maps of the batch that ``result`` holds DAAM's explanation of (``result = daam(images, ...)``)."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop the state of the current batch."""

    def remove(self) -> None:
        """Remove the hooks and drop all captured state."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset()

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class PassExplainer(Explainer):
    """An explainer whose hooks compute its maps inside DAAM's own forward and backward pass.

    A pre-hook on the patch embedding starts every explained pass with fresh buffers, ``(B, L, h * w)`` float32
    zeros (one map per block) or ``(B, 1, h * w)``. Hooks act only while DAAM's capture is active, during a
    ``daam(...)`` call, so the model runs as usual otherwise. A subclass registers its hooks in ``__init__``, fills
    ``self._maps`` and calls :meth:`_finish` when its last map is complete.
    """

    def __init__(self, daam: DAAM) -> None:
        super().__init__(daam)
        self.per_block = self.name in PER_BLOCK_EXPLAINERS
        self._handles.append(self.model.patch_embed.register_forward_pre_hook(self._start_hook))
        self._reset()

    def _capture(self) -> BlockCapture | None:
        """DAAM's current capture (a DAAM makes a new one each time it is opened); None while it is closed."""
        return self.daam.capture

    def _active(self) -> bool:
        capture = self._capture()
        return capture is not None and capture.active

    def _reset(self) -> None:
        self._grid: tuple[int, int] | None = None
        self._maps: Tensor | None = None
        self._complete = False

    def _start_hook(self, module: nn.Module, args: tuple) -> None:
        """Start of an explained forward pass: fresh buffers for this batch."""
        if not self._active():
            return
        self._reset()
        images = args[0]
        self._grid = tuple(int(s) for s in module.dynamic_feat_size(tuple(images.shape[-2:])))
        maps = self.num_blocks if self.per_block else 1
        patches = self._grid[0] * self._grid[1]
        self._maps = torch.zeros(images.shape[0], maps, patches, device=images.device, dtype=torch.float32)

    def _finish(self) -> None:
        self._complete = True

    @property
    def ready(self) -> bool:
        """The maps of a completed ``daam(...)`` call wait to be read."""
        return self._complete

    def explain(self, images: Tensor | None = None, result: DAAMResult | None = None) -> ExplainerMaps:
        """The maps DAAM's latest pass computed, then forgotten (the arguments are not needed: the maps exist).

        Raises:
            PipelineError: no explanation ran since the last read, or it failed before computing every map.
        """
        if not self._complete:
            raise PipelineError(f"no maps for {[self.name]}: read them once after each completed daam(...) call")
        maps = self._maps.unflatten(-1, self._grid)
        self._reset()
        if self.per_block:
            return ExplainerMaps(arrays={self.name: maps}, blocks=maps, final=maps[:, -1])
        return ExplainerMaps(arrays={self.name: maps[:, 0]}, blocks=None, final=maps[:, 0])
