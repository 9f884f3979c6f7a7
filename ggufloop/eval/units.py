"""The unit of evaluation and its results key, computed in one place.

A unit is one (model, task, shots, prompt format, plan): the rows of its items are stored under
this key, whichever engine scores them (this process, worker processes, a Ray cluster). Every
engine asks ``unit_for`` for the key, so the engines cannot disagree about it (they once did: the
Ray driver keyed units without the shot count).
"""

from __future__ import annotations

from ..plan import LoopPlan
from .store import Unit
from .tasks import FewshotPool, Task


def unit_for(
    model_sha: str, task: Task, shots: int | None, plan: LoopPlan | str | None, pool: FewshotPool | None
) -> Unit:
    """The key of a task's rows for a model file (sha256) and plan, with ``shots`` few-shot examples
    (None: the task's default) drawn from ``pool`` (None: the task's own source)."""
    shots = task.default_shots if shots is None else shots
    return Unit(model_sha, task.name, shots, task.prompt_key(pool, shots), str(LoopPlan.parse(plan)))
