"""What every benchmark here reports for a timed quantity: the median over its repeats, with min and max."""

from __future__ import annotations

import statistics


def summary(values: list[float], digits: int = 4) -> dict:
    """``{"median", "min", "max"}`` of ``values``, rounded to ``digits``."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}
