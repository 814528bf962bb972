"""The job runner: checks a job, then drives its stages over every unit on Ray actors or in this process.

- :mod:`~pipeline.runner.preflight`: checks in the driver before any worker starts;
- :mod:`~pipeline.runner.plan`: how many actors, on which devices;
- :mod:`~pipeline.runner.pools`: the workers (Ray actors, or one in this process), retries, replacements;
- :mod:`~pipeline.runner.job`: resume, the bank and explain stages, the summary.
"""

from pipeline.runner.job import run_job
from pipeline.runner.plan import ActorPlan, describe_plan, plan_actors
from pipeline.runner.summary import JobSummary

__all__ = ["ActorPlan", "JobSummary", "describe_plan", "plan_actors", "run_job"]
