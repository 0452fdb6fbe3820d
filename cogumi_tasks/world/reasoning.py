"""Reasoning family ``word_arith``: two- and three-step arithmetic word problems with one-digit operands.

"Ana has 12 marbles. Ana buys 5 more and then gives away 3. How many marbles does Ana have now?" The reference
shows each step on its own line and ends with the fixed answer line ``Answer: 14``; the checker compares the
number on the last ``Answer: <integer>`` line with the expected value exactly.
"""

from __future__ import annotations

import random
import re

from cogumi_tasks.world.base import Family, Instance

NAMES = ("Ana", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mo", "Nia",
         "Omar", "Pia")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "stamps", "shells", "books", "coins")

# kind -> story templates ({n} name, {i} item, {a} {b} {c} {d} numbers); every story of a kind means the same
STORIES: dict[str, tuple[str, ...]] = {
    "add_sub": ("{n} has {a} {i}. {n} buys {b} more and then gives away {c}. How many {i} does {n} have now?",
                "{n} starts with {a} {i}, gets {b} more and loses {c}. How many {i} does {n} have left?"),
    "mul_add": ("{n} buys {a} bags with {b} {i} in each bag and finds {c} more {i}. How many {i} does {n} have?",
                "There are {a} boxes of {i} with {b} in each box, and {n} adds {c} loose {i}. How many {i} are "
                "there in total?"),
    "mul_sub": ("{n} has {a} boxes with {b} {i} in each box and gives away {c} {i}. How many {i} are left?",
                "{n} packs {a} rows of {b} {i} and then uses {c} of them. How many {i} remain?"),
    "div_add": ("{n} shares {a} {i} equally among {b} friends. Then each friend gets {c} more. How many {i} does "
                "each friend have now?",
                "{n} splits {a} {i} evenly into {b} groups and adds {c} {i} to each group. How many {i} are in "
                "each group?"),
    "add_mul_sub": ("{n} has {a} {i}, buys {b} packs of {c} {i} and then gives away {d}. How many {i} does {n} "
                    "have now?",
                    "{n} owns {a} {i}, adds {b} bags holding {c} {i} each, and loses {d}. How many {i} does {n} "
                    "have left?"),
}
INSTRUCTIONS = (
    "{story} End your reply with the line \"Answer: <number>\".",
    "Solve the problem and finish with \"Answer: <number>\".\n{story}",
    "{story}\nGive the final answer as \"Answer: <number>\".",
)
_ANSWER = re.compile(r"^answer\s*:\s*(-?\d+)\.?$", re.I)


def steps(params: dict) -> list[tuple[str, int]]:
    """The worked steps as (expression, value); the last value is the answer."""
    kind, (a, b, c, *rest) = params["kind"], params["nums"]
    if kind == "add_sub":
        return [(f"{a} + {b}", a + b), (f"{a + b} - {c}", a + b - c)]
    if kind == "mul_add":
        return [(f"{a} * {b}", a * b), (f"{a * b} + {c}", a * b + c)]
    if kind == "mul_sub":
        return [(f"{a} * {b}", a * b), (f"{a * b} - {c}", a * b - c)]
    if kind == "div_add":
        return [(f"{a} / {b}", a // b), (f"{a // b} + {c}", a // b + c)]
    d = rest[0]
    return [(f"{b} * {c}", b * c), (f"{a} + {b * c}", a + b * c), (f"{a + b * c} - {d}", a + b * c - d)]


def answer_of(params: dict) -> int:
    return steps(params)[-1][1]


def final_answer(text: str) -> int | None:
    """The integer on the last ``Answer: <integer>`` line of ``text``, or None."""
    found = [m.group(1) for line in text.splitlines() if (m := _ANSWER.match(line.strip().strip("*`")))]
    return int(found[-1]) if found else None


class WordArithmetic(Family):
    name = "word_arith"
    domain = "reasoning"

    def sample_params(self, rng: random.Random) -> dict:
        kind = rng.choice(tuple(STORIES))
        # Operands stay small (one digit, products <= 25) so a 135M student learns the steps in minutes of SFT
        # (bench/tiny_world_learning.py; with operands up to 20 it got most subtractions wrong).
        if kind == "add_sub":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            nums = [a, b, rng.randint(1, min(9, a + b - 1))]
        elif kind in ("mul_add", "mul_sub"):
            a, b = rng.randint(2, 5), rng.randint(2, 5)
            nums = [a, b, rng.randint(1, 9) if kind == "mul_add" else rng.randint(1, min(9, a * b - 1))]
        elif kind == "div_add":
            b, q = rng.randint(2, 5), rng.randint(2, 5)
            nums = [b * q, b, rng.randint(1, 9)]
        else:
            a, b, c = rng.randint(2, 9), rng.randint(2, 3), rng.randint(2, 4)
            nums = [a, b, c, rng.randint(1, min(9, a + b * c - 1))]
        return {"kind": kind, "name": rng.choice(NAMES), "item": rng.choice(ITEMS), "nums": nums}

    def render(self, params: dict, rng: random.Random) -> str:
        a, b, c, *rest = params["nums"]
        story = rng.choice(STORIES[params["kind"]]).format(n=params["name"], i=params["item"], a=a, b=b, c=c,
                                                           d=rest[0] if rest else "")
        return rng.choice(INSTRUCTIONS).format(story=story)

    def solve(self, params: dict) -> str:
        lines = [f"{expr} = {value}" for expr, value in steps(params)]
        return "\n".join([*lines, f"Answer: {answer_of(params)}"])

    def payload(self, params: dict, rng: random.Random) -> dict:
        return {"expected": answer_of(params)}

    def parse(self, prompt: str) -> dict | None:
        text = prompt.strip()
        for ins in INSTRUCTIONS:
            head, tail = ins.split("{story}")
            if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
                story = text[len(head):len(text) - len(tail)]
                if (params := _parse_story(story)) is not None:
                    return params
        return None

    def check(self, instance: Instance, answer: str) -> tuple[bool, str]:
        got, want = final_answer(answer), instance.payload["expected"]
        if got is None:
            return False, "no final line 'Answer: <integer>'"
        return (True, f"answer {got} is correct") if got == want else (False, f"answered {got}, expected {want}")


def _story_regex(tpl: str) -> re.Pattern:
    groups = {"n": r"(?P<n>[A-Z][a-z]+)", "i": r"(?P<i>[a-z]+)", "a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)",
              "c": r"(?P<c>\d+)", "d": r"(?P<d>\d+)"}
    out, used = "", set()
    for part in re.split(r"(\{[a-dni]\})", tpl):
        key = part[1:-1] if re.fullmatch(r"\{[a-dni]\}", part) else None
        if key is None:
            out += re.escape(part)
        elif key in used:
            out += f"(?P={key})"
        else:
            out += groups[key]
            used.add(key)
    return re.compile(out)


_STORY_RES = [(kind, _story_regex(t)) for kind, tpls in STORIES.items() for t in tpls]


def _parse_story(story: str) -> dict | None:
    for kind, rx in _STORY_RES:
        m = rx.fullmatch(story)
        if m and m["n"] in NAMES and m["i"] in ITEMS:
            nums = [int(m[k]) for k in "abcd" if k in rx.groupindex]
            params = {"kind": kind, "name": m["n"], "item": m["i"], "nums": nums}
            if kind == "div_add" and nums[0] % nums[1]:
                return None
            return params if answer_of(params) >= 0 else None
    return None
