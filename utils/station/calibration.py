"""Pass/fail thresholds from a few good parts (docs/inspecting.md, "Calibration").

A line calibrates on the good parts it has — often 20 to 50. The empirical rule (the score that at most
``floor(rate · n)`` good parts exceed) then takes the largest good score for any rate below 1 / n, so one good
outlier sets the threshold above every defect. The default rule estimates the tail of the good scores instead:
a log-normal fitted robustly (median and median absolute deviation of the log-scores, which one outlier barely
moves), whose (1 − rate) quantile is the threshold; where n good parts cannot resolve the rate (rate < 1 / n) the
fitted tail extrapolates, and the calibration says so. A threshold can also be chosen by the miss rate on
defective examples (a test split), the operating point a line that must not let defects through picks.

Plain functions on score arrays, tested against direct computations (tests/test_inspection.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

DEFAULT_FALSE_ALARM_RATE = 0.01
RULES = ("tail", "empirical")
DEFAULT_RULE = "tail"
MIN_TAIL_PARTS = 5  # fewer good parts than this: no tail can be fitted, the empirical rule is used
MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal distribution is 0.6745 σ


def _scores(values: np.ndarray | list[float], what: str) -> np.ndarray:
    scores = np.sort(np.asarray(values, dtype=np.float64))
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError(f"calibration needs at least one finite score of {what}")
    return scores


def _check_rate(rate: float, what: str) -> None:
    if not 0 <= rate < 1:
        raise ValueError(f"the {what} rate must be in [0, 1), got {rate}")


def empirical_threshold(good_scores: np.ndarray | list[float], false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
                        ) -> float:
    """The smallest threshold t among the scores such that at most ``floor(rate · n)`` of the ``n`` good scores
    exceed it (a part is anomalous when its score > t): the (n − k)-th smallest score, k = floor(rate · n).

    Raises:
        ValueError: no scores, or a rate outside [0, 1).
    """
    scores = _scores(good_scores, "a good part")
    _check_rate(false_alarm_rate, "false-alarm")
    allowed = math.floor(false_alarm_rate * scores.size + 1e-9)
    return float(scores[scores.size - allowed - 1])


@dataclass(frozen=True)
class GoodTail:
    """A log-normal model of the good parts' scores: log(score) ~ N(location, scale²), fitted by the median and the
    median absolute deviation (× 1.4826) of the log-scores. Scores must be positive (every method's are)."""

    location: float
    scale: float
    n: int

    @classmethod
    def fit(cls, good_scores: np.ndarray | list[float]) -> GoodTail:
        """Raises ValueError: fewer than :data:`MIN_TAIL_PARTS` scores, or a score ≤ 0."""
        scores = _scores(good_scores, "a good part")
        if scores.size < MIN_TAIL_PARTS:
            raise ValueError(f"a tail needs at least {MIN_TAIL_PARTS} good parts, got {scores.size}")
        if scores[0] <= 0:
            raise ValueError(f"a log-normal tail needs positive scores, got {scores[0]:.6g}")
        logs = np.log(scores)
        location = float(np.median(logs))
        scale = MAD_TO_SIGMA * float(np.median(np.abs(logs - location)))
        if scale <= 0:  # more than half the scores equal: take the spread of all of them
            scale = float(np.std(logs))
        return cls(location, scale, int(scores.size))

    def threshold(self, false_alarm_rate: float) -> float:
        """The score that a good part exceeds with probability ``false_alarm_rate`` under the model."""
        _check_rate(false_alarm_rate, "false-alarm")
        if false_alarm_rate == 0:
            return math.inf
        return math.exp(self.location + self.scale * NormalDist().inv_cdf(1 - false_alarm_rate))

    def false_alarm_rate(self, threshold: float) -> float:
        """P(good score > threshold) under the model."""
        if threshold <= 0:
            return 1.0
        if self.scale == 0:
            return float(threshold < math.exp(self.location))
        return 1 - NormalDist().cdf((math.log(threshold) - self.location) / self.scale)


def calibrate_threshold(good_scores: np.ndarray | list[float], false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                        rule: str = DEFAULT_RULE) -> float:
    """The threshold for a target false-alarm rate: ``tail`` (the fitted :class:`GoodTail`; the empirical rule
    below :data:`MIN_TAIL_PARTS` good parts) or ``empirical`` (:func:`empirical_threshold`)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    scores = _scores(good_scores, "a good part")
    if rule == "tail" and scores.size >= MIN_TAIL_PARTS and scores[0] > 0:
        return GoodTail.fit(scores).threshold(false_alarm_rate)
    return empirical_threshold(scores, false_alarm_rate)


def resolvable_rate(n_good: int) -> float:
    """The smallest false-alarm rate n good parts can show empirically (one of them above the threshold): 1 / n.
    A smaller target is an extrapolation of the fitted tail."""
    return 1.0 / n_good


def miss_rate_threshold(defective_scores: np.ndarray | list[float], miss_rate: float) -> float:
    """The largest threshold at which at most ``floor(miss_rate · m)`` of the ``m`` defective scores are missed
    (score ≤ threshold): just below the (k + 1)-th smallest defective score, k = floor(miss_rate · m).

    Raises:
        ValueError: no scores, or a rate outside [0, 1).
    """
    scores = _scores(defective_scores, "a defective part")
    _check_rate(miss_rate, "miss")
    allowed = math.floor(miss_rate * scores.size + 1e-9)
    return float(np.nextafter(scores[allowed], -np.inf))
