"""Model backends (llama.cpp in process, transformers, an OpenAI-compatible endpoint) and the
pairwise judge, on the packaged SmolLM2-135M-Instruct.

The judge finding this file records (greedy, deterministic): SmolLM2-135M as a pairwise judge picks
position "1" whatever the answers are, so with both orders asked every planted pair comes out
inconsistent, i.e. a tie (order agreement 0). The both-orders design therefore never lets the biased
judge crown the wrong answer, which is asserted. "Prefers the correct answer in both orders" runs
against the judge of the config named by COGUMI_TEST_JUDGE_CONFIG (default ``tiny``): on the tiny
judge it is a strict xfail that flips to a failure the day the judge can do it; on any other config
(``production``, with its key in the environment) it must pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest

from cogumi_tasks.core.config import EndpointConfig, LLMConfig, config_dir, load_config
from cogumi_tasks.core.ledger import CostLedger, Price, ResponseCache, load_prices
from cogumi_tasks.eval.judge import PairVerdict, judge_pairs, order_agreement, parse_verdict, win_rate
from cogumi_tasks.llm.client import ChatResult

log = logging.getLogger("cogumi.tests")

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
]
# (id, question, correct, wrong)
PLANTED = [
    ("mul", "What is 12*12?", "144", "150"),
    ("capital", "What is the capital of France?", "Paris", "Berlin"),
    ("legs", "How many legs does a spider have?", "8", "6"),
    ("planet", "What is the largest planet in the solar system?", "Jupiter", "Mars"),
]
PRICES = {"local": Price(2.5, 10.0)}


class DictCache(ResponseCache):
    """The response cache in memory."""

    def __init__(self) -> None:
        self.data: dict[str, dict] = {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value


def endpoint(base_url: str) -> EndpointConfig:
    return EndpointConfig(name="local", base_url=base_url, model="smollm2-135m", price="local", max_concurrency=2,
                          timeout_s=120)


FAST_RETRIES = LLMConfig(max_retries=2, backoff_base_s=0.05, backoff_max_s=0.2)


@pytest.fixture(scope="module")
def gguf_answers():
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.models.packaged import smollm2_gguf

    backend = GGUFBackend(smollm2_gguf())
    try:
        t0 = time.monotonic()
        first = backend.generate(PROMPTS, 32)
        log.info("gguf: 2 answers in %.1fs", time.monotonic() - t0)
        second = backend.generate(PROMPTS, 32)
    finally:
        backend.close()
    return first, second


# ---------------------------------------------------------------- backends
@pytest.mark.stack
def test_gguf_backend_answers_greedily(gguf_answers):
    first, second = gguf_answers
    assert len(first) == 2 and all(g.text and g.error is None for g in first)
    assert [g.text for g in first] == [g.text for g in second]
    assert all(g.prompt_tokens > 10 and 0 < g.completion_tokens <= 32 and g.seconds > 0 for g in first)


@pytest.mark.stack
def test_builtin_gguf_via_load_backend():
    from cogumi_tasks.core.config import ModelRef
    from cogumi_tasks.eval.backends import GGUFBackend, load_backend

    def no_fetch(uri: str) -> Path:
        raise AssertionError(f"builtin model must not be fetched ({uri})")

    backend = load_backend(ModelRef(kind="gguf", path="builtin:smollm2-135m"), endpoints={}, llm=LLMConfig(),
                           ledger=CostLedger(PRICES, 1.0), cache=None, fetch=no_fetch)
    try:
        assert isinstance(backend, GGUFBackend)
    finally:
        backend.close()
    with pytest.raises(ValueError, match="unknown builtin model"):
        load_backend(ModelRef(kind="gguf", path="builtin:nope"), endpoints={}, llm=LLMConfig(),
                     ledger=CostLedger(PRICES, 1.0), cache=None, fetch=no_fetch)


@pytest.mark.stack
def test_hf_backend_on_converted_dir(hf_dir, gguf_answers):
    from cogumi_tasks.eval.backends import HFBackend

    assert (hf_dir / "config.json").exists() and '"LlamaForCausalLM"' in (hf_dir / "config.json").read_text()
    backend = HFBackend(hf_dir, batch_size=2)
    try:
        out = backend.generate(PROMPTS, 32)
    finally:
        backend.close()
    assert len(out) == 2 and all(g.text and g.error is None and 0 < g.completion_tokens <= 32 for g in out)
    # Q4_1 in llama.cpp vs the dequantized fp32 model: report, don't assert, agreement.
    for hf, gg in zip(out, gguf_answers[0], strict=True):
        same = len(_common_prefix(hf.text.split(), gg.text.split()))
        log.info("hf vs gguf: %d leading words agree: %r | %r", same, hf.text[:60], gg.text[:60])


@pytest.mark.stack
def test_hf_dir_run_in_llama_cpp_answers_as_transformers_does(hf_dir, tmp_path):
    from cogumi_tasks.core.config import ModelRef
    from cogumi_tasks.eval.backends import GGUFBackend, HFBackend, load_backend

    kw = {"endpoints": {}, "llm": LLMConfig(), "ledger": CostLedger(PRICES, 1.0), "cache": None, "fetch": Path}
    ref = ModelRef(kind="hf", path=str(hf_dir))
    fast = load_backend(ref, hf_runtime="llama_cpp", pre_tokenizer="smollm", work_dir=tmp_path, **kw)
    try:
        assert isinstance(fast, GGUFBackend) and fast.name == f"gguf-f16:{hf_dir}"
        assert (tmp_path / "hf-f16.gguf").exists()
        a = fast.generate(PROMPTS, 24)
    finally:
        fast.close()
    slow = load_backend(ref, **kw)
    try:
        assert isinstance(slow, HFBackend)
        b = slow.generate(PROMPTS, 24)
    finally:
        slow.close()
    # f16 rounding may flip a late greedy choice on another CPU: most of each answer must agree.
    for x, y in zip(a, b, strict=True):
        words = min(len(x.text.split()), len(y.text.split()))
        same = len(_common_prefix(x.text.split(), y.text.split()))
        log.info("f16 GGUF vs transformers: %d of %d leading words agree", same, words)
        assert x.text and words and same >= 0.75 * words, (x.text, y.text)
    with pytest.raises(ValueError, match="takes no adapter"):
        load_backend(ref.model_copy(update={"adapter": "x/"}), hf_runtime="llama_cpp", work_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="unknown hf_runtime"):
        load_backend(ref, hf_runtime="vllm", **kw)


@pytest.mark.stack
def test_float_gguf_decodes_conversations_together(hf_dir, tmp_path):
    """An f16 GGUF decodes conversations in one batch: the same answers for the same batch, ``max_tokens`` and
    ``n_ctx`` kept, and answers like one-at-a-time decoding's and another order's and slot count's (batched
    products round otherwise and may flip a near-tie: 84 of 90 equal in bench/eval_decode.py, so at least half
    must be equal here; mixing up sequences would leave none). A quantized GGUF is decoded one at a time."""
    from cogumi_tasks.core.config import SuiteConfig
    from cogumi_tasks.eval.backends import GGUFBackend
    from cogumi_tasks.eval.suites import world_items
    from cogumi_tasks.models.convert import convert_hf_to_gguf
    from cogumi_tasks.models.packaged import smollm2_gguf

    f16 = convert_hf_to_gguf(hf_dir, tmp_path / "f16.gguf", "f16", "smollm")
    convs = [i.messages for fam in ("list_fn", "word_arith", "tool_call")
             for i in world_items(SuiteConfig(kind="world", family=fam, n=3, seed=0))] + PROMPTS
    too_long = [{"role": "user", "content": "word " * 400}]

    def answers(parallel: int, conversations: list) -> list:
        backend = GGUFBackend(f16, parallel=parallel, n_ctx=384)
        try:
            assert (backend.decoder is not None) == (parallel > 1)
            return backend.generate(conversations, 24)
        finally:
            backend.close()

    batched = answers(4, [*convs, too_long])
    assert batched[-1].text == "" and "exceed context window of 384" in batched[-1].error
    batched = batched[:-1]
    assert all(g.error is None and g.text and 0 < g.completion_tokens <= 24 and g.prompt_tokens > 10
               for g in batched)
    assert [g.text for g in answers(4, convs)] == [g.text for g in batched]
    for other in (answers(1, convs), answers(3, convs[::-1])[::-1]):
        same = sum(x.text == y.text for x, y in zip(batched, other, strict=True))
        log.info("batched vs one at a time / reversed with 3 slots: %d of %d answers equal", same, len(convs))
        assert same >= len(convs) / 2
    quantized = GGUFBackend(smollm2_gguf())
    try:
        assert quantized.decoder is None
    finally:
        quantized.close()


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    out = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        out.append(x)
    return out


@pytest.mark.stack
def test_endpoint_backend_caches_and_prices(llm_server):
    from cogumi_tasks.eval.backends import EndpointBackend

    ledger, cache = CostLedger(PRICES, 1.0), DictCache()
    backend = EndpointBackend(endpoint(llm_server), FAST_RETRIES, ledger, cache, step="test.eval")
    first = backend.generate(PROMPTS, 24)
    assert all(g.text and g.error is None and g.prompt_tokens > 10 for g in first)
    paid = ledger.spent_usd
    assert paid > 0 and len(cache.data) == 2
    second = backend.generate(PROMPTS, 24)
    backend.close()
    assert [g.text for g in second] == [g.text for g in first]
    assert ledger.spent_usd == paid and backend.stats["cache_hits"] == 2


@pytest.mark.stack
def test_endpoint_backend_records_failures():
    from cogumi_tasks.eval.backends import EndpointBackend
    from cogumi_tasks.stack.services import free_port

    dead = endpoint(f"http://127.0.0.1:{free_port()}/v1")
    backend = EndpointBackend(dead, LLMConfig(max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02),
                              CostLedger(PRICES, 1.0))
    out = backend.generate(PROMPTS[:1], 8)
    assert out[0].text == "" and "connection" in out[0].error


# ---------------------------------------------------------------- judge: the logic, with a scripted judge
class ScriptedJudge:
    """Answers judge requests with a fixed rule over the two shown answers."""

    def __init__(self, rule):
        self.rule = rule

    async def chat_many(self, reqs, validate=None, on_result=None):
        out = []
        for r in reqs:
            user = r.messages[-1]["content"]
            first = user.split("Answer 1: ", 1)[1].split("\n\nAnswer 2: ")[0]
            second = user.split("Answer 2: ", 1)[1].split("\n\nWhich")[0]
            text = json.dumps({"winner": self.rule(first, second), "reason": "scripted"})
            out.append(ChatResult(text, 1, 1, False, 1, "k", validate(text)))
        return out


def test_judge_maps_orders_back_to_labels():
    correct = {c for _, _, c, _ in PLANTED}
    knows = ScriptedJudge(lambda x, y: "1" if x in correct else "2")
    items = [(i, q, c, w) for i, q, c, w in PLANTED[:2]] + [(i, q, w, c) for i, q, c, w in PLANTED[2:]]
    verdicts = asyncio.run(judge_pairs(knows, items))
    assert [v.winner for v in verdicts] == ["a", "a", "b", "b"]
    assert all(v.consistent for v in verdicts) and order_agreement(verdicts) == 1.0
    assert win_rate(verdicts) == 0.5

    biased = asyncio.run(judge_pairs(ScriptedJudge(lambda x, y: "1"), items))
    assert all(v.ab == "a" and v.ba == "b" and v.winner == "tie" and not v.consistent for v in biased)
    assert order_agreement(biased) == 0.0 and win_rate(biased) == 0.5


def test_verdict_parsing_and_rates():
    assert parse_verdict('{"winner": "2", "reason": "x"}') == "2"
    assert parse_verdict('{"winner": "TIE"}') == "tie"
    for bad in ("winner 1", '{"winner": "3"}', "[1]"):
        with pytest.raises(ValueError):
            parse_verdict(bad)
    vs = [PairVerdict("x", "a", "a", "a", True), PairVerdict("y", "a", "b", "tie", False)]
    assert win_rate(vs) == 0.75 and order_agreement(vs) == 0.5


# ---------------------------------------------------------------- judge: a real model
async def _planted_verdicts(judge: EndpointConfig, prices: dict[str, Price] = PRICES,
                            ) -> tuple[list, list[tuple[str, str, str, str]], dict[str, str]]:
    from cogumi_tasks.llm.client import LLMClient

    client = LLMClient(judge, FAST_RETRIES, CostLedger(prices, 1.0), step="test.judge")
    # Candidate "a" is the correct answer for half the items and the wrong one for the other half.
    items, right = [], {}
    for k, (item_id, q, good, bad) in enumerate(PLANTED):
        items.append((item_id, q, good, bad) if k % 2 == 0 else (item_id, q, bad, good))
        right[item_id] = "a" if k % 2 == 0 else "b"
    try:
        return await judge_pairs(client, items), items, right
    finally:
        await client.aclose()


@pytest.mark.stack
def test_smollm2_judge_never_crowns_the_wrong_answer(llm_server):
    verdicts, items, right = asyncio.run(_planted_verdicts(endpoint(llm_server)))
    assert len(verdicts) == len(items)  # every JSON verdict parsed, both orders
    agreement = order_agreement(verdicts)
    correct_both = sum(v.consistent and v.winner == right[v.item_id] for v in verdicts)
    log.info("smollm2 judge: order agreement %.2f, correct in both orders %d/%d, verdicts %s", agreement,
             correct_both, len(verdicts), [(v.item_id, v.ab, v.ba) for v in verdicts])
    # With a position-biased judge the two orders disagree, and disagreement is a tie, never a wrong win.
    assert all(v.winner in (right[v.item_id], "tie") for v in verdicts)
    assert all(v.winner == "tie" for v in verdicts if not v.consistent)


@pytest.mark.stack
def test_configured_judge_prefers_correct_in_both_orders(llm_server, request):
    cfg = load_config(os.environ.get("COGUMI_TEST_JUDGE_CONFIG", "tiny"))
    if cfg.name == "tiny":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "SmolLM2-135M picks answer position 1 whatever the content (measured: 0/12 planted pairs right in "
            "both orders, order agreement 0, even with the gold answer in the prompt); gemma3-270m does the same")))
    prices = load_prices(config_dir() / cfg.llm.prices_file)
    verdicts, items, right = asyncio.run(_planted_verdicts(cfg.judge, prices))
    log.info("%s judge %s: order agreement %.2f, verdicts %s", cfg.name, cfg.judge.model, order_agreement(verdicts),
             [(v.item_id, v.ab, v.ba) for v in verdicts])
    assert len(verdicts) == len(items)
    assert all(v.consistent and v.winner == right[v.item_id] for v in verdicts)
