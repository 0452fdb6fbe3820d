"""What every benchmark here reports for a timed quantity (the median over its repeats, with min and max), and how
it hands its JSON out."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def summary(values: list[float], digits: int = 4) -> dict:
    """``{"median", "min", "max"}`` of ``values``, rounded to ``digits``."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as indented JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)
