"""Pictures of the attention flow: per-image grids and animations, the HTML dataset report.

``render`` and ``report`` are imported here (not lazily) so that these names are the functions, not their modules.
"""

from pipeline.viz.display import overlay
from pipeline.viz.render import render
from pipeline.viz.report import report
from pipeline.viz.select import select_samples, settle_table

__all__ = ["overlay", "render", "report", "select_samples", "settle_table"]
