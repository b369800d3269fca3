"""Report arithmetic without Ray: where a curve reaches a score (Figure 3's speed-up) and when a speed-up is noise.

.venv/bin/python -m pytest tests/test_report.py -q
"""

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
