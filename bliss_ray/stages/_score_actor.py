"""The scoring stage's Ray Data actor: ``Scorer`` plus the source-file column its partitioned write needs, and a
census of the actors that ran.

Kept apart from ``stages/score.py`` on purpose: Ray imports an actor class's module in the actor's process, and
``score.py`` also imports the config layer (pydantic) and the Train glue (``ray.train``), which an actor never
uses — ~1.5 s of a scoring actor's start at a load average of 35 (``python -X importtime``), paid once per actor
per round. This module needs only ``bliss_ray.scoring``.

    ds.map_batches(RayScorer, fn_constructor_kwargs={"census_dir": d, "model_dir": m}, compute=ActorPoolStrategy())
"""

from __future__ import annotations

from pathlib import Path

from bliss_ray.scoring import Scorer


class RayScorer(Scorer):
    """The scorer plus the source-file column (``src``) and an actor census (one empty file per actor pid)."""

    def __init__(self, census_dir: str, **kwargs):
        super().__init__(**kwargs)
        Path(census_dir, str(self.pid)).touch()

    def __call__(self, batch: dict) -> dict:
        return super().__call__(batch) | {"src": batch["src"]}
