"""Cost ledger and run budget.

Every teacher or judge call appends a row (tokens in/out x the price table). A run has a budget:
once the run's total (this process plus every other task of the run, refreshed from S3) reaches
it, no new call starts (:class:`BudgetExceeded`); calls already in flight finish and are recorded,
so the ledger exceeds the budget by at most those.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cogumi_tasks.core.artifacts import ArtifactStore, join_uri


class BudgetExceeded(RuntimeError):
    """The run's budget is spent; results already paid for are kept."""


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    batch_discount: float = 0.5
    stands_in_for: str | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        usd = (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6
        return usd * (1 - self.batch_discount) if batch else usd


def load_prices(path: str | Path) -> dict[str, Price]:
    """Read a price table: ``{name: {input_per_mtok, output_per_mtok, batch_discount?}}``."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    try:
        return {name: Price(**row) for name, row in data.items()}
    except TypeError as exc:
        raise ValueError(f"{path}: bad price row: {exc}") from exc


class CostLedger:
    """Rows for one process's calls, appended to S3 under ``<ledger_prefix>/``.

    Each flush writes the rows recorded since the last one as a new object, ``<part>-<uuid>-<seq>.jsonl``,
    never rewritten: every row is in exactly one object. The spend of the run's other parts is summed
    from the objects not seen before, listed at most every ``refresh_s``.
    """

    def __init__(
        self,
        prices: dict[str, Price],
        budget_usd: float,
        *,
        store: ArtifactStore | None = None,
        ledger_prefix: str | None = None,
        part: str = "",
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.prices = prices
        self.budget_usd = budget_usd
        self.store = store
        self.ledger_prefix = ledger_prefix
        self.part = f"{part or 'part'}-{uuid.uuid4().hex[:8]}"
        self.rows: list[dict] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushed = 0  # rows[:_flushed] are in S3
        self._seq = 0
        self._seen: set[str] = set()  # other parts' objects already summed into _others
        self._others = 0.0
        self._others_at = -1e18
        self._refresh_s = refresh_s
        self._clock = clock

    # ------------------------------------------------------------ spending
    def price(self, name: str) -> Price:
        if name not in self.prices:
            raise KeyError(f"price table has no entry {name!r} (known: {sorted(self.prices)})")
        return self.prices[name]

    @property
    def spent_usd(self) -> float:
        return sum(r["usd"] for r in self.rows)

    def run_total_usd(self) -> float:
        now = self._clock()
        if self.store and self.ledger_prefix and now - self._others_at > self._refresh_s:
            self._others = self._read_others()
            self._others_at = now
        return self._others + self.spent_usd

    def check_budget(self) -> None:
        """Raise before a new call if the run's budget is already spent."""
        total = self.run_total_usd()
        if total >= self.budget_usd:
            raise BudgetExceeded(
                f"budget of ${self.budget_usd:.4f} reached (run total ${total:.4f}); "
                "no new teacher/judge calls; paid results are kept. Raise llm.budget_usd to continue."
            )

    def record(
        self,
        *,
        step: str,
        endpoint: str,
        model: str,
        price: str,
        prompt_tokens: int,
        completion_tokens: int,
        batch: bool = False,
        cached: bool = False,
        request_hash: str = "",
    ) -> dict:
        usd = 0.0 if cached else self.price(price).cost(prompt_tokens, completion_tokens, batch)
        row = {
            "ts": time.time(),
            "step": step,
            "endpoint": endpoint,
            "model": model,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "batch": batch,
            "cached": cached,
            "usd": usd,
            "request_hash": request_hash,
        }
        with self._lock:
            self.rows.append(row)
        return row

    # ------------------------------------------------------------ persistence
    def flush(self) -> None:
        """Write the rows recorded since the last flush as one new object (none if there are none)."""
        if not (self.store and self.ledger_prefix):
            return
        with self._flush_lock:  # one writer at a time: each row goes into exactly one object
            with self._lock:
                new = self.rows[self._flushed :]
            if not new:
                return
            uri = join_uri(self.ledger_prefix, f"{self.part}-{self._seq:06d}.jsonl")
            self.store.put_bytes(uri, "".join(json.dumps(r) + "\n" for r in new).encode())
            self._flushed += len(new)
            self._seq += 1

    def _read_others(self) -> float:
        """The other parts' spend: the running sum plus the objects that appeared since the last look."""
        own = join_uri(self.ledger_prefix, self.part + "-")
        for uri in self.store.list(self.ledger_prefix + "/"):
            if uri in self._seen or uri.startswith(own) or not uri.endswith(".jsonl"):
                continue
            body = self.store.get_bytes(uri).decode()
            self._others += sum(json.loads(line)["usd"] for line in body.splitlines() if line.strip())
            self._seen.add(uri)
        return self._others

    def totals(self) -> dict:
        """Calls, tokens and USD, overall and per endpoint, for this process's rows."""
        return summarize(self.rows)


def summarize(rows: list[dict]) -> dict:
    out: dict = {"calls": 0, "cached_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}
    per: dict[str, dict] = {}
    for r in rows:
        for agg in (out, per.setdefault(r["endpoint"], {"calls": 0, "cached_calls": 0, "prompt_tokens": 0,
                                                       "completion_tokens": 0, "usd": 0.0})):
            agg["calls"] += 1
            agg["cached_calls"] += int(r["cached"])
            agg["prompt_tokens"] += r["prompt_tokens"]
            agg["completion_tokens"] += r["completion_tokens"]
            agg["usd"] += r["usd"]
    out["per_endpoint"] = per
    return out


def read_run_ledger(store: ArtifactStore, ledger_prefix: str) -> list[dict]:
    """Every ledger row under ``ledger_prefix`` (one run's ledger, or ``_runs`` for all runs)."""
    rows: list[dict] = []
    for uri in store.list(ledger_prefix + "/"):
        if "/ledger/" in uri and uri.endswith(".jsonl"):
            rows += [json.loads(x) for x in store.get_bytes(uri).decode().splitlines() if x.strip()]
    return rows


class ResponseCache:
    """LLM responses keyed by request hash, one S3 object each: a re-run never pays twice."""

    def __init__(self, store: ArtifactStore, prefix_uri: str):
        self.store = store
        self.prefix_uri = prefix_uri

    def _uri(self, key: str) -> str:
        return join_uri(self.prefix_uri, key[:2], f"{key}.json")

    def get(self, key: str) -> dict | None:
        uri = self._uri(key)
        if not self.store.exists(uri):
            return None
        return self.store.get_json(uri)

    def put(self, key: str, value: dict) -> None:
        self.store.put_json(self._uri(key), value)
