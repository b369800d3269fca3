"""Report arithmetic without Ray: where a curve reaches a score (Figure 3's speed-up) and when a speed-up is noise.

.venv/bin/python -m pytest tests/test_report.py -q
"""

from pathlib import Path

import pytest

from bliss_ray.report.build import _noise_note, reach_step


def test_reach_step_interpolates_between_checkpoints():
    assert reach_step([100, 200, 300], [0.30, 0.40, 0.50], 0.45, higher_is_better=True) == pytest.approx(250)
    assert reach_step([100, 200], [5.0, 4.0], 4.5, higher_is_better=False) == pytest.approx(150)
    assert reach_step([100, 200], [0.30, 0.40], 0.41, higher_is_better=True) is None


def test_a_difference_within_two_standard_errors_is_called_noise():
    base = {"paper_average": 0.300, "paper_average_stderr": 0.010}
    close = {"paper_average": 0.310, "paper_average_stderr": 0.010}  # diff 1.0 pt, se 1.41 pt
    far = {"paper_average": 0.350, "paper_average_stderr": 0.010}  # diff 5.0 pt
    assert "not evidence of a speed-up" in _noise_note(base, close, "paper_average")
    assert "not evidence" not in _noise_note(base, far, "paper_average")
    assert "5.00 ± 1.41" in _noise_note(base, far, "paper_average")
    assert _noise_note({"reference_loss": 4.0}, {"reference_loss": 3.9}, "reference_loss") == ""  # no stderr


def test_seed_groups_pool_variants_that_differ_only_in_seeds():
    from bliss_ray.report.collect import Variant, seed_groups

    def variant(method: str, seed: int, z_init: str = "zero") -> Variant:
        exp = {"name": f"demo-s{seed}", "seed": seed, "selection": {"method": method, "seed": seed}}
        return Variant(root=Path(f"runs/demo-s{seed}"), exp=exp | {"bilevel": {"z_init": z_init}}, evaluate={})

    vs = [variant("bliss", s, z) for s in (0, 1, 2) for z in ("zero", "constant")] + [variant("random", 0)]
    groups = dict(seed_groups(vs))
    assert sorted(groups) == ["bliss (z_init=constant)", "bliss (z_init=zero)", "random"]
    assert [v.exp["seed"] for v in groups["bliss (z_init=zero)"]] == [0, 1, 2]
    assert len(groups["random"]) == 1
