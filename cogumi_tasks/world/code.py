"""Code family ``list_fn``: one-line Python functions over a list of integers, composed as reduce(map(filter(xs))).

"Write a Python function `sum_squares_even(xs)` that returns the sum of the squares of the even numbers in xs."
The reference is a fenced one-liner (``return sum(x * x for x in xs if x % 2 == 0)``). Hidden tests are lists of
small integers; they are drawn so that every near miss (one component changed: another filter, map or reduce) that
differs from the task on one of up to 200 random lists fails at least one of them. Answers run in the bubblewrap sandbox
(:mod:`cogumi_tasks.world.sandbox`); several answers can share one sandboxed program (``batch``), which is only
fair when the answers are trusted not to interfere with each other (a reference self-check, not model output).
"""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any

from cogumi_tasks.world.base import Family, Instance

if TYPE_CHECKING:
    from cogumi_tasks.world.sandbox import Limits

# name -> (English, name part, condition); k fills {k}
FILTERS: dict[str, tuple[str, str, str]] = {
    "all": ("numbers", "all", ""),
    "even": ("even numbers", "even", "x % 2 == 0"),
    "odd": ("odd numbers", "odd", "x % 2 == 1"),
    "positive": ("positive numbers", "pos", "x > 0"),
    "negative": ("negative numbers", "neg", "x < 0"),
    "gt": ("numbers greater than {k}", "gt{kn}", "x > {k}"),
    "lt": ("numbers less than {k}", "lt{kn}", "x < {k}"),
    "div": ("numbers divisible by {k}", "div{kn}", "x % {k} == 0"),
}
K_RANGE = {"gt": [k for k in range(-9, 10) if k != 0], "lt": [k for k in range(-9, 10) if k != 0],
           "div": list(range(3, 10))}
MAPS: dict[str, tuple[str, str, str]] = {  # name -> (English prefix, name part, expression)
    "id": ("", "", "x"),
    "square": ("the squares of ", "squares", "x * x"),
    "double": ("the doubles of ", "doubles", "2 * x"),
    "triple": ("the triples of ", "triples", "3 * x"),
    "abs": ("the absolute values of ", "abs", "abs(x)"),
}
REDUCES: dict[str, tuple[str, str]] = {  # name -> (English with {m}, code with {e} and {g})
    "sum": ("the sum of {m}", "sum({e} for x in xs{g})"),
    "count": ("the number of {m}", "sum(1 for x in xs{g})"),
    "list": ("a list of {m}, in their original order", "[{e} for x in xs{g}]"),
    "max": ("the largest of {m}, or 0 if there are none", "max(({e} for x in xs{g}), default=0)"),
    "min": ("the smallest of {m}, or 0 if there are none", "min(({e} for x in xs{g}), default=0)"),
    "first": ("the first of {m}, or 0 if there are none", "next(({e} for x in xs{g}), 0)"),
}
TEMPLATES = (
    "Write a Python function `{name}(xs)` that returns {desc}.",
    "Implement `{name}(xs)` in Python: given a list of integers xs, return {desc}.",
    "Define a Python function `{name}(xs)`. It takes a list of integers xs and returns {desc}.",
)
VALUES = range(-12, 13)
PROBES = 200  # random lists searched for a witness that tells a near miss from the task
REASON_CHARS = 150  # a verdict's length in the program's output, so a batch's verdicts fit the sandbox's capture
MARK = "@@cogumi-world-results@@"


def _filter_fn(f: str, k: int | None):
    return {"all": lambda x: True, "even": lambda x: x % 2 == 0, "odd": lambda x: x % 2 == 1,
            "positive": lambda x: x > 0, "negative": lambda x: x < 0, "gt": lambda x: x > k,
            "lt": lambda x: x < k, "div": lambda x: x % k == 0}[f]  # type: ignore[operator]


_MAP_FN = {"id": lambda x: x, "square": lambda x: x * x, "double": lambda x: 2 * x, "triple": lambda x: 3 * x,
           "abs": abs}


def evaluate(params: dict, xs: list[int]) -> Any:
    """The task's value on ``xs``, computed on the host (trusted): the hidden tests' expected values."""
    keep, fn = _filter_fn(params["filter"], params["k"]), _MAP_FN[params["map"]]
    vals = [fn(x) for x in xs if keep(x)]
    red = params["reduce"]
    if red == "sum":
        return sum(vals)
    if red == "count":
        return len(vals)
    if red == "list":
        return vals
    if red == "first":
        return vals[0] if vals else 0
    return (max if red == "max" else min)(vals, default=0)


def _k_name(k: int) -> str:
    return f"m{-k}" if k < 0 else str(k)


def entry_point(params: dict) -> str:
    k = params["k"]
    parts = [params["reduce"], MAPS[params["map"]][1], FILTERS[params["filter"]][1].format(kn=_k_name(k or 0))]
    return "_".join(p for p in parts if p)


def describe(params: dict) -> str:
    """The English task: "the sum of the squares of the even numbers in xs"."""
    group = "the " + FILTERS[params["filter"]][0].format(k=params["k"]) + " in xs"
    return REDUCES[params["reduce"]][0].format(m=MAPS[params["map"]][0] + group)


def _all_params() -> list[dict]:
    out = []
    for red in REDUCES:
        for mp in MAPS if red != "count" else ("id",):
            for flt in FILTERS:
                if red == "count" and flt == "all":
                    continue
                for k in K_RANGE.get(flt, [None]):
                    out.append({"reduce": red, "map": mp, "filter": flt, "k": k})
    return out


ALL_PARAMS = _all_params()
_VALID = {(p["reduce"], p["map"], p["filter"], p["k"]) for p in ALL_PARAMS}
_BY_DESC = {describe(p): p for p in ALL_PARAMS}


def near_misses(params: dict) -> list[dict]:
    """Every valid task one component away: another reduce, another map, or another filter (or its k)."""
    filters = [(f, k) for f in FILTERS for k in K_RANGE.get(f, [None])]
    out = [{**params, "reduce": r} for r in REDUCES if r != params["reduce"]]
    out += [{**params, "map": m} for m in MAPS if m != params["map"]]
    out += [{**params, "filter": f, "k": k} for f, k in filters if (f, k) != (params["filter"], params["k"])]
    return [p for p in out if (p["reduce"], p["map"], p["filter"], p["k"]) in _VALID]


def _random_list(rng: random.Random) -> list[int]:
    return [rng.choice(VALUES) for _ in range(rng.randint(1, 7))]


class ListFunctions(Family):
    name = "list_fn"
    domain = "code"

    def sample_params(self, rng: random.Random) -> dict:
        return dict(rng.choice(ALL_PARAMS))

    def render(self, params: dict, rng: random.Random) -> str:
        return rng.choice(TEMPLATES).format(name=entry_point(params), desc=describe(params))

    def solve(self, params: dict) -> str:
        flt, k = params["filter"], params["k"]
        guard = f" if {FILTERS[flt][2].format(k=k)}" if flt != "all" else ""
        body = REDUCES[params["reduce"]][1].format(e=MAPS[params["map"]][2], g=guard)
        return f"```python\ndef {entry_point(params)}(xs):\n    return {body}\n```"

    def payload(self, params: dict, rng: random.Random) -> dict:
        cases: list[list[int]] = [[], *(_random_list(rng) for _ in range(4))]
        probes: list[list[int]] = []
        for other in near_misses(params):
            if any(evaluate(other, xs) != evaluate(params, xs) for xs in cases):
                continue
            for i in range(PROBES):  # a witness list; none: the near miss equals the task (abs of positives)
                if i == len(probes):
                    probes.append(_random_list(rng))
                if evaluate(other, probes[i]) != evaluate(params, probes[i]):
                    cases.append(probes[i])
                    break
        name = entry_point(params)
        tests = [{"xs": xs, "expected": evaluate(params, xs)} for xs in cases]
        return {"entry_point": name, "cases": tests,
                "tests": [f"assert {name}({c['xs']!r}) == {c['expected']!r}" for c in tests]}

    def parse(self, prompt: str) -> dict | None:
        for tpl in TEMPLATES:
            pattern = re.escape(tpl).replace(re.escape("{name}"), r"(\w+)").replace(re.escape("{desc}"), "(.+)")
            m = re.fullmatch(pattern, prompt.strip())
            if m and (params := _BY_DESC.get(m.group(2))) is not None and entry_point(params) == m.group(1):
                return dict(params)
        return None

    def check(self, instance: Instance, answer: str) -> tuple[bool, str]:
        return check_many([instance], [answer])[0]


def program(pairs: list[tuple[Instance, str]]) -> str:
    """One sandbox program that runs each answer's hidden tests in its own namespace and prints the verdicts."""
    from cogumi_tasks.world.answers import extract_code

    cases = [(extract_code(ans, inst.payload["entry_point"]), inst.payload["entry_point"], inst.payload["cases"])
             for inst, ans in pairs]
    return f"""import json
_CASES = json.loads({json.dumps(json.dumps(cases))})
_OUT = []
for _code, _name, _tests in _CASES:
    _ns = {{"__name__": "answer"}}
    try:
        exec(compile(_code, "answer.py", "exec"), _ns)
        _fn = _ns.get(_name)
        if not callable(_fn):
            raise NameError("no function " + _name + " in the answer")
        for _i, _t in enumerate(_tests):
            _got = _fn(list(_t["xs"]))
            if _got != _t["expected"]:
                _OUT.append(("hidden test %d of %d failed: %s(%r) returned %r, expected %r"
                             % (_i + 1, len(_tests), _name, _t["xs"], _got, _t["expected"]))[:{REASON_CHARS}])
                break
        else:
            _OUT.append("ok")
    except BaseException as _e:
        _OUT.append(("%s: %s" % (type(_e).__name__, _e))[:{REASON_CHARS}])
print({MARK!r} + json.dumps(_OUT))
"""


def _verdicts(stdout: str, n: int) -> list[str] | None:
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(MARK)), None)
    try:
        out = json.loads(line[len(MARK):]) if line else None
    except ValueError:
        return None
    return out if isinstance(out, list) and len(out) == n and all(isinstance(v, str) for v in out) else None


def check_many(instances: list[Instance], answers: list[str], limits: Limits | None = None, workers: int = 2,
               batch: int = 1) -> list[tuple[bool, str]]:
    """(ok, reason) per answer, run in the sandbox ``batch`` answers per program (at most as many as the
    sandbox's output capture has room for; a failed batch is re-run one answer per program, so a crash, a timeout
    or an early exit only ever blames its own answer)."""
    from cogumi_tasks.world.sandbox import OUTPUT_LIMIT, run_many
    from cogumi_tasks.world.sandbox import Limits as _Limits

    lim = limits or _Limits()
    batch = max(1, min(batch, (OUTPUT_LIMIT - 100) // (REASON_CHARS + 20)))  # verdicts must fit the capture
    if len(instances) != len(answers):
        raise ValueError(f"{len(instances)} instances but {len(answers)} answers")
    out: list[tuple[bool, str] | None] = [None] * len(answers)
    groups = [list(range(i, min(i + max(1, batch), len(answers)))) for i in range(0, len(answers), max(1, batch))]
    results = run_many([program([(instances[i], answers[i]) for i in g]) for g in groups], lim, workers)
    retry: list[int] = []
    for g, res in zip(groups, results, strict=True):
        verdicts = _verdicts(res.stdout, len(g)) if res.reason == "ok" else None
        if verdicts is not None:
            for i, v in zip(g, verdicts, strict=True):
                out[i] = (v == "ok", "passed every hidden test" if v == "ok" else v)
        elif len(g) > 1:
            retry += g
        else:
            tail = res.stderr.strip().splitlines()[-1:] if res.stderr.strip() else []
            how = "exited early" if res.reason == "ok" else res.reason
            out[g[0]] = (False, f"the program did not finish its tests ({how}){': ' + tail[0] if tail else ''}")
    if retry:
        again = check_many([instances[i] for i in retry], [answers[i] for i in retry], lim, workers, batch=1)
        for i, v in zip(retry, again, strict=True):
            out[i] = v
    return [v for v in out if v is not None]
