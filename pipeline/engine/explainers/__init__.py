"""The comparison explainers, one file each over a shared base (:mod:`.base`), and the set a job runs beside DAAM.

- :mod:`.rollout`, :mod:`.attention`, :mod:`.gradcam`, :mod:`.gae`: hooks in DAAM's own forward and backward pass;
- :mod:`.lrp`: AttnLRP and CP-LRP, relevance in a forward and backward pass of their own, after DAAM's.

::

    with DAAM(model) as daam, Explainers(daam, ["rollout", "gae", "attnlrp"]) as explainers:
        result = daam(images)
        maps = explainers.explain(images, result)  # {"rollout": ExplainerMaps, ...} in the order given
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from pipeline.engine.daam import DAAM, DAAMResult
from pipeline.engine.explainers.attention import RawAttention
from pipeline.engine.explainers.base import Explainer, ExplainerMaps, PassExplainer
from pipeline.engine.explainers.gae import GAE
from pipeline.engine.explainers.gradcam import GradCAM
from pipeline.engine.explainers.lrp import CPLRP, AttnLRP
from pipeline.engine.explainers.rollout import Rollout
from pipeline.errors import ConfigError, PipelineError
from pipeline.names import COMPARISON_EXPLAINERS

__all__ = ["EXPLAINER_TYPES", "Explainer", "ExplainerMaps", "Explainers"]

EXPLAINER_TYPES: dict[str, type[Explainer]] = {
    cls.name: cls for cls in (Rollout, RawAttention, GradCAM, GAE, AttnLRP, CPLRP)
}
"""Each comparison explainer's class, by its name in :data:`pipeline.names.COMPARISON_EXPLAINERS`."""


class Explainers:
    """The comparison explainers a job runs beside DAAM; a context manager that removes their hooks on exit.

    Args:
        daam: The DAAM engine whose score Y they explain (opened now or later).
        names: Explainers among :data:`pipeline.names.COMPARISON_EXPLAINERS`.

    Raises:
        ConfigError: an unknown or empty list of names.
        UnsupportedModelError: an explainer cannot explain the model (Grad-CAM on one block, LRP without its rules).
    """

    def __init__(self, daam: DAAM, names: Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in COMPARISON_EXPLAINERS]
        if unknown or not names:
            raise ConfigError(f"unknown explainers {unknown or names}; valid names: {', '.join(COMPARISON_EXPLAINERS)}")
        self.names = tuple(dict.fromkeys(names))
        self.explainers: dict[str, Explainer] = {}
        try:
            for name in self.names:
                self.explainers[name] = EXPLAINER_TYPES[name](daam)
        except BaseException:
            self.remove()
            raise

    def explain(self, images: Tensor, result: DAAMResult) -> dict[str, ExplainerMaps]:
        """Every explainer's maps of the batch DAAM explained last (``result = daam(images, ...)``).

        Pass explainers hand over what their hooks computed in that pass, once; the others run their own pass on
        ``images`` with ``result``'s score.

        Returns:
            ``{name: ExplainerMaps}`` in the order the names were given.

        Raises:
            PipelineError: no explanation ran since the last read, or it failed before computing every map.
        """
        missing = [name for name, e in self.explainers.items() if isinstance(e, PassExplainer) and not e.ready]
        if missing:
            raise PipelineError(f"no maps for {missing}: read them once after each completed daam(...) call")
        return {name: explainer.explain(images, result) for name, explainer in self.explainers.items()}

    def remove(self) -> None:
        """Remove every explainer's hooks and drop their state."""
        for explainer in self.explainers.values():
            explainer.remove()

    def __enter__(self) -> Explainers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
