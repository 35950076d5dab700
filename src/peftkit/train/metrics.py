"""GLUE metrics (accuracy, F1, Matthews correlation, Pearson/Spearman) and perplexity.

Inputs are 1-D sequences of equal length; values are plain floats. Definitions follow GLUE
(Wang et al., 2019, arXiv:1804.07461): F1 of the positive class 1, Matthews correlation of binary
labels, Pearson/Spearman on regression scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of entries where ``pred`` equals ``gold`` (same length), in [0, 1]; 0 for empty inputs."""
    p, g = np.asarray(pred), np.asarray(gold)
    return float((p == g).mean()) if len(g) else 0.0


def f1(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of class ``positive`` (0 when it is never predicted nor present)."""
    p, g = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float((p & g).sum())
    denom = float(p.sum() + g.sum())
    return 2 * tp / denom if denom else 0.0


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation coefficient of ``pred`` against ``gold`` as binary labels (1 is positive, any other
    value negative), in [-1, 1] (0 when undefined)."""
    p, g = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = float((p & g).sum()), float((~p & ~g).sum())
    fp, fn = float((p & ~g).sum()), float((~p & g).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Pearson correlation of ``pred`` and ``gold`` (same length), in [-1, 1]; 0 when either side is constant,
    NaN when a value is NaN."""
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if p.std() == 0 or g.std() == 0:
        return 0.0
    return float(np.corrcoef(p, g)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # average the ranks of ties
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(uniq))
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman rank correlation of ``pred`` and ``gold`` (ties get average ranks); NaN when a value is NaN (a diverged regression),
    as Pearson's is, rather than ranking NaN as the largest value."""
    if np.isnan(np.asarray(pred, dtype=np.float64)).any() or np.isnan(np.asarray(gold, dtype=np.float64)).any():
        return float("nan")
    return pearson(_ranks(np.asarray(pred, dtype=np.float64)), _ranks(np.asarray(gold, dtype=np.float64)))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute(names: Sequence[str], pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """``{name: value}`` for each metric name in ``names`` (see :data:`METRICS`)."""
    return {n: METRICS[n](pred, gold) for n in names}
