"""The stages a worker runs unit by unit: explain (maps and statistics) and bank (memory-bank features).

Each stage turns a batch of decoded samples into a typed result on the device and writes the host copy of that
result into a per-unit sink, which commits the unit (:mod:`pipeline.store.units`). :class:`~pipeline.worker.
UnitWorker` owns the loop: stream -> decode -> ``stage.compute`` -> one copy to the host -> ``sink.write`` ->
``sink.commit``.
"""

from pipeline.stages.bank import BankStage
from pipeline.stages.base import Stage, UnitSink
from pipeline.stages.explain import ExplainedBatch, ExplainStage

__all__ = ["BankStage", "ExplainStage", "ExplainedBatch", "Stage", "UnitSink"]
