"""The stages a worker runs unit by unit: explain (maps and statistics) and bank (memory-bank features).

Each stage turns a batch of decoded samples into a typed result on the device; the worker copies it to the host once
and hands it, with the batch (and its failed samples), to the unit's sink, a writer of :mod:`pipeline.store` that
commits the unit. :class:`~pipeline.worker.UnitWorker` owns the loop: stream -> decode -> ``stage.compute`` -> one
copy to the host -> ``sink.write`` -> ``sink.commit``.
"""

from pipeline.stages.bank import BankStage
from pipeline.stages.base import Stage, UnitSink, UnitState
from pipeline.stages.explain import ExplainStage

__all__ = ["BankStage", "ExplainStage", "Stage", "UnitSink", "UnitState"]
