"""GLUE metrics (accuracy, F1, Matthews correlation, Pearson/Spearman) and perplexity.

Inputs are 1-D sequences of equal length; values are plain floats. Definitions follow GLUE
(Wang et al., 2019, arXiv:1804.07461): F1 of the positive class 1, Matthews correlation of binary
labels, Pearson/Spearman on regression scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _pair(pred: Sequence[float], gold: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as 1-D arrays. Raises ValueError when their lengths differ (numpy would broadcast one entry
    against all)."""
    p, g = np.asarray(pred), np.asarray(gold)
    if p.ndim != 1 or g.ndim != 1 or len(p) != len(g):
        raise ValueError(f"pred and gold must be 1-D sequences of one length; got shapes {p.shape} and {g.shape}")
    return p, g


def _has_nan(x: np.ndarray) -> bool:
    return x.dtype.kind in "fc" and bool(np.isnan(x).any())


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of entries where ``pred`` equals ``gold``, in [0, 1]; 0 for empty inputs; NaN when a prediction
    is NaN (a diverged model's, see :func:`peftkit.train.trainer.predict`).

    Raises:
        ValueError: ``pred`` and ``gold`` differ in length (or are not 1-D)."""
    p, g = _pair(pred, gold)
    if _has_nan(p):
        return math.nan
    return float((p == g).mean()) if len(g) else 0.0


def f1(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of class ``positive`` (0 when it is never predicted nor present; NaN when a prediction is NaN).

    Raises:
        ValueError: ``pred`` and ``gold`` differ in length (or are not 1-D)."""
    p, g = _pair(pred, gold)
    if _has_nan(p):
        return math.nan
    p, g = p == positive, g == positive
    tp = float((p & g).sum())
    denom = float(p.sum() + g.sum())
    return 2 * tp / denom if denom else 0.0


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation coefficient of ``pred`` against ``gold`` as binary labels (1 is positive, any other
    value negative), in [-1, 1] (0 when undefined; NaN when a prediction is NaN).

    Raises:
        ValueError: ``pred`` and ``gold`` differ in length (or are not 1-D)."""
    p, g = _pair(pred, gold)
    if _has_nan(p):
        return math.nan
    p, g = p == 1, g == 1
    tp, tn = float((p & g).sum()), float((~p & ~g).sum())
    fp, fn = float((p & ~g).sum()), float((~p & g).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Pearson correlation of ``pred`` and ``gold`` (same length), in [-1, 1]; NaN when a value is NaN, else 0
    when either side is constant. Each side is scaled by a power of two near its largest magnitude first, so values near the float
    range's ends (1e160, 1e-160) neither overflow nor underflow.

    Raises:
        ValueError: ``pred`` and ``gold`` differ in length (or are not 1-D)."""
    p, g = (x.astype(np.float64) for x in _pair(pred, gold))
    if _has_nan(p) or _has_nan(g):
        return math.nan
    if not len(p):
        return 0.0
    if np.all(p == p[0]) or np.all(g == g[0]):  # a constant side (compared as given: a mean has rounding)
        return 0.0
    scaled = []
    for x in (p, g):
        top = np.abs(x).max()
        if not np.isfinite(top):
            return math.nan
        x = np.ldexp(x, -np.frexp(top)[1])  # divided by a power of two: exact, so offsets keep their precision
        x = x - x.mean()
        scaled.append(x / np.linalg.norm(x))
    return float(np.clip(np.dot(*scaled), -1.0, 1.0))


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
    _pair(pred, gold)
    if np.isnan(np.asarray(pred, dtype=np.float64)).any() or np.isnan(np.asarray(gold, dtype=np.float64)).any():
        return float("nan")
    return pearson(_ranks(np.asarray(pred, dtype=np.float64)), _ranks(np.asarray(gold, dtype=np.float64)))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute(names: Sequence[str], pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """``{name: value}`` for each metric name in ``names`` (see :data:`METRICS`)."""
    return {n: METRICS[n](pred, gold) for n in names}
