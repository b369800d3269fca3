"""The Ray Train callback that forwards a sweep trial's rank-0 metrics to Tune (``bliss_ray.studies.sweep``).

A module of its own that imports nothing else of bliss_ray: Train's controller unpickles the callbacks of the run
config, so it imports their module, in series with the start of every stage of a trial (``_ray.torch_trainer``).
"""

from __future__ import annotations

import math

from ray.tune.integration.ray_train import TuneReportCallback


class ForwardToTune(TuneReportCallback):
    """Rank-0 metrics → Tune, tagged with the stage. The sweep metric is always present (Tune and Optuna reject
    results without it): NaN where this stage does not measure it."""

    def __init__(self, extra: dict, metric: str):
        super().__init__()
        self.extra, self.metric = extra, metric

    def after_report(self, run_context, metrics, checkpoint):
        first = {self.metric: math.nan, **metrics[0], **self.extra}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)
