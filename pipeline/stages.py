"""Types every stage shares with the orchestrator (:mod:`pipeline.run`).

Kept apart from :mod:`pipeline.run` so that a stage can import them at module level: the
orchestrator imports the stages' modules, so a stage importing ``pipeline.run`` would need a
function-local import to dodge the cycle.
"""

from __future__ import annotations


class StageSkipped(Exception):
    """Raised by a stage that has nothing to do for this config (the reason is recorded).

    ``details`` (optional) are recorded in run.json beside the reason.
    """

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.details = dict(details or {})
