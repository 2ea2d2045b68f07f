"""Class balance relative to the number of classes: when is a data set really skewed?

A share alone misleads: 54% for one of two answers is a near-even split, 40% for one of twenty is
heavy skew. So both data reports compare the largest class with the others:
    chat      the most common answer against the average of the other answers (`dominance`)
    classify  the largest class against the smallest (classify_data.IMBALANCE_RATIO)
and warn at SKEW_RATIO or more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SKEW_RATIO = 3.0  # the largest class has 3x the rows of the others' average: over two labels, 75/25
MIN_SKEW_SHARE = 0.1  # chat: an answer under a tenth of the rows is a repeated reply, not a label to favour


def dominance(counts: Sequence[int]) -> float:
    """The largest count over the average of the others (1.0 when even; inf for a single class)."""
    if len(counts) < 2:
        return math.inf if counts else 0.0
    top = max(counts)
    rest = (sum(counts) - top) / (len(counts) - 1)
    return top / rest if rest else math.inf
