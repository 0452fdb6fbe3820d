"""Pairwise LLM judge for open-ended answers, asked in both orders to cancel position bias.

Each pair (candidate ``a``, reference ``b``) is shown twice: a as answer 1 and b as answer 2, then
swapped. The judge replies with JSON ``{"winner": "1" | "2" | "tie", "reason": ...}`` (schema-
constrained where the endpoint supports it; a reply that does not parse is rejected, so the client
resamples it). Verdicts are mapped back to the original labels; a pair whose two orders disagree is
a tie.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cogumi_tasks.core.ledger import BudgetExceeded
from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMClient

log = logging.getLogger("cogumi.eval")

PAIR_SYSTEM = "You are a strict judge. You compare two answers to a question and pick the correct one."
PAIR_USER = (
    "Question: {question}\n\n"
    "Answer 1: {first}\n\n"
    "Answer 2: {second}\n\n"
    "Which answer is correct? Reply with JSON: "
    '{{"winner": "1" or "2" or "tie", "reason": "<a few words>"}}'
)
PAIR_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["1", "2", "tie"]}, "reason": {"type": "string"}},
    "required": ["winner", "reason"],
}
MAX_ANSWER_CHARS = 4000  # per answer shown to the judge; longer ones are cut with a marker


@dataclass
class PairVerdict:
    """``ab``/``ba``: the winner from each order, in the original labels (a = candidate, b = reference)."""

    item_id: str
    ab: str
    ba: str
    winner: str
    consistent: bool


def parse_verdict(text: str) -> str:
    """``"1"``, ``"2"`` or ``"tie"`` from the judge's JSON; ValueError otherwise (the client resamples)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {text[:80]!r}") from exc
    winner = str(data.get("winner", "")).strip().lower() if isinstance(data, dict) else ""
    if winner not in ("1", "2", "tie"):
        raise ValueError(f"winner must be '1', '2' or 'tie', got {winner!r}")
    return winner


def _clip(text: str) -> str:
    text = text.strip() or "(no answer)"
    return text if len(text) <= MAX_ANSWER_CHARS else text[:MAX_ANSWER_CHARS] + " [...cut]"


def pair_request(question: str, first: str, second: str, max_tokens: int = 128) -> ChatRequest:
    """The judge request with ``first`` shown as answer 1 and ``second`` as answer 2."""
    user = PAIR_USER.format(question=question.strip(), first=_clip(first), second=_clip(second))
    return ChatRequest(messages=[{"role": "system", "content": PAIR_SYSTEM}, {"role": "user", "content": user}],
                       max_tokens=max_tokens, temperature=0.0,
                       response_format={"type": "json_object", "schema": PAIR_SCHEMA})


def _unswap(winner: str, swapped: bool) -> str:
    """Position verdict -> original label (a = candidate, b = reference)."""
    if winner == "tie":
        return "tie"
    first, second = ("b", "a") if swapped else ("a", "b")
    return first if winner == "1" else second


async def judge_pairs(client: LLMClient, items: list[tuple[str, str, str, str]],
                      max_tokens: int = 128) -> list[PairVerdict]:
    """Verdicts for ``(item_id, question, answer_a, answer_b)`` items, each judged in both orders.

    An item whose judge calls fail after the client's retries is left out (and logged); a spent
    budget raises :class:`BudgetExceeded` (paid verdicts stay in the cache for a re-run).
    """
    reqs = []
    for _, question, a, b in items:
        reqs.append(pair_request(question, a, b, max_tokens))
        reqs.append(pair_request(question, b, a, max_tokens))
    results = await client.chat_many(reqs, validate=parse_verdict)
    spent = [r for r in results if isinstance(r, BudgetExceeded)]
    if spent:
        raise spent[0]
    out, failed = [], []
    for k, (item_id, *_rest) in enumerate(items):
        r_ab, r_ba = results[2 * k], results[2 * k + 1]
        if not (isinstance(r_ab, ChatResult) and isinstance(r_ba, ChatResult)):
            err = r_ab if isinstance(r_ab, Exception) else r_ba
            failed.append(f"{item_id}: {type(err).__name__}: {err}")
            continue
        ab, ba = _unswap(r_ab.parsed, False), _unswap(r_ba.parsed, True)
        out.append(PairVerdict(item_id, ab, ba, ab if ab == ba else "tie", ab == ba))
    if failed:
        log.warning("judge: %d of %d pairs failed and are left out: %s", len(failed), len(items),
                    "; ".join(failed[:5]))
    return out


def order_agreement(verdicts: Sequence[PairVerdict]) -> float:
    """Share of items whose two orders agree after un-swapping (NaN when there are none)."""
    return sum(v.consistent for v in verdicts) / len(verdicts) if verdicts else math.nan


def win_rate(verdicts: Sequence[PairVerdict]) -> float:
    """(wins + 0.5 * ties) / n for the candidate ``a`` (NaN when there are no verdicts)."""
    if not verdicts:
        return math.nan
    return sum(1.0 if v.winner == "a" else 0.5 if v.winner == "tie" else 0.0 for v in verdicts) / len(verdicts)
