"""Reading a model's answer: the code block, the JSON object, values equal after normalisation.

Shared by the task families' checkers and the benchmark suites (:mod:`cogumi_tasks.eval.suites`), so a family
task and a suite item of the same kind read an answer the same way. Formats in ``docs/eval-formats.md``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(output: str, entry_point: str | None = None) -> str:
    """Python code in a model output: the fenced block defining ``entry_point`` (else the first python block, else
    the first block; an unclosed fence runs to the end), or the raw output when there is no fence."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(output)]
    if not blocks:
        return output.strip("\n")
    if entry_point:
        for _, body in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.M):
                return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body
    return blocks[0][1]


def extract_json_object(output: str) -> dict | None:
    """The first JSON object in the output (inside a ```json fence when there is one)."""
    decoder = json.JSONDecoder()
    texts = [body for _, body in _FENCE.findall(output)] + [output]
    for text in texts:
        for m in re.finditer(r"\{", text):
            try:
                obj, _ = decoder.raw_decode(text, m.start())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def same_value(got: Any, want: Any) -> bool:
    """Equal after normalisation: numbers numerically, strings stripped and case-insensitive, booleans and null
    exactly, lists element by element, objects key by key (no extra or missing keys)."""
    if isinstance(got, bool) or isinstance(want, bool) or got is None or want is None:
        return type(got) is type(want) and got == want
    if isinstance(got, int | float) and isinstance(want, int | float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(got, str) and isinstance(want, str):
        return got.strip().lower() == want.strip().lower()
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(same_value(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(got, dict) and isinstance(want, dict):
        return set(got) == set(want) and all(same_value(got[k], want[k]) for k in want)
    return False
