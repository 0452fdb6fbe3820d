"""The strong-tier server on loopback: the official ``openai`` client gets checker-verified answers to family prompts
and fresh tasks on request, unparseable prompts get a 4xx, and LLMClient calls land in the ledger at its price."""

from __future__ import annotations

import asyncio
import shutil

import openai
import pytest

from cogumi_tasks.core.config import EndpointConfig, LLMConfig, config_dir
from cogumi_tasks.core.ledger import CostLedger, load_prices
from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMCallFailed, LLMClient
from cogumi_tasks.stack.services import free_port, stop
from cogumi_tasks.world import FAMILIES, check_many, generate, instance_from_prompt, normalise_text
from cogumi_tasks.world.strong_tier import parse_tasks_reply, tasks_request
from tests.servers.procs import server_stats, start_test_server

PER_FAMILY = 100
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    port = free_port()
    proc = start_test_server("cogumi_tasks.world.strong_tier", port, ["--host", "127.0.0.1"],
                             tmp_path_factory.mktemp("strong") / "strong_tier.log")
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.fixture(scope="module")
def client(base):
    with openai.OpenAI(base_url=base, api_key="sk-local", max_retries=0, timeout=30) as c:
        yield c


def _ask(client: openai.OpenAI, prompt: str, system: bool = False, max_tokens: int = 512) -> str:
    messages = [SYSTEM] if system else []
    resp = client.chat.completions.create(model="strong-tier", max_tokens=max_tokens, temperature=0,
                                          messages=[*messages, {"role": "user", "content": prompt}])
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens > 0
    return resp.choices[0].message.content


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (code answers run in it)")
def test_openai_client_gets_correct_answers_to_every_family_prompt(client):
    insts = [i for name in FAMILIES for i in generate(name, PER_FAMILY, seed=21)]
    answers = [_ask(client, inst.prompt, system=k % 2 == 0) for k, inst in enumerate(insts)]
    verdicts = check_many(insts, answers, code_batch=25)
    assert len(verdicts) == 3 * PER_FAMILY
    assert [(i.id, r) for i, (ok, r) in zip(insts, verdicts, strict=True) if not ok] == []


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (code answers run in it)")
def test_write_new_tasks_returns_fresh_checkable_instances_of_the_family(client):
    for name in FAMILIES:
        examples = generate(name, 3, seed=5)
        request = tasks_request(name, [e.prompt for e in examples], 6)
        tasks = parse_tasks_reply(_ask(client, request, max_tokens=4096))
        assert len(tasks) == 6
        insts = [instance_from_prompt(t["prompt"], name) for t in tasks]
        assert all(i is not None and i.family == name for i in insts)
        seen = {normalise_text(e.prompt) for e in examples} | {e.id for e in examples}
        assert not {normalise_text(t["prompt"]) for t in tasks} & seen and not {i.id for i in insts} & seen
        assert all(ok for ok, _ in check_many(insts, [t["answer"] for t in tasks], code_batch=25))
        assert parse_tasks_reply(_ask(client, request, max_tokens=4096)) == tasks  # same request, same tasks


def test_unparseable_requests_are_refused_with_an_openai_error_body(client, base):
    before = server_stats(base)["refused"]
    cases = [
        ("Tell me a joke about mushrooms.", "unparseable_prompt"),
        (tasks_request("word_arith", ["What is the capital of France?"], 2), "unparseable_example"),
        (tasks_request("word_arith", [generate("word_arith", 1, seed=1)[0].prompt], 500), "too_many_tasks"),
        (tasks_request("poetry", [generate("word_arith", 1, seed=1)[0].prompt], 2), "unknown_family"),
    ]
    for prompt, code in cases:
        with pytest.raises(openai.BadRequestError) as err:
            _ask(client, prompt)
        assert err.value.status_code == 400 and err.value.code == code
        assert err.value.body["message"] and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="strong-tier", prompt="hi")
    assert server_stats(base)["refused"] == before + len(cases) + 1


def test_streaming_and_max_tokens(client):
    inst = generate("word_arith", 1, seed=8)[0]
    stream = client.chat.completions.create(model="strong-tier", messages=[{"role": "user", "content": inst.prompt}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == inst.reference
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    cut = client.chat.completions.create(model="strong-tier", max_tokens=3,
                                         messages=[{"role": "user", "content": inst.prompt}])
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert inst.reference.startswith(cut.choices[0].message.content)


def test_llm_client_calls_land_in_the_ledger_at_the_strong_tier_price(base):
    prices = load_prices(config_dir() / "prices.yaml")
    endpoint = EndpointConfig(name="strong", base_url=base, model="strong-tier", price="strong-tier-local")
    ledger = CostLedger(prices, budget_usd=1.0)
    insts = [i for name in ("word_arith", "tool_call") for i in generate(name, 15, seed=3)]
    before = server_stats(base)["answered"]

    async def run():
        client = LLMClient(endpoint, LLMConfig(max_retries=2, backoff_base_s=0.01), ledger, step="test")
        try:
            ok = await client.chat_many([ChatRequest([{"role": "user", "content": i.prompt}], 256) for i in insts])
            with pytest.raises(LLMCallFailed, match="HTTP 400"):
                await client.chat(ChatRequest([{"role": "user", "content": "Write a haiku."}], 64))
            return ok, dict(client.stats)
        finally:
            await client.aclose()

    results, stats = asyncio.run(run())
    assert all(isinstance(r, ChatResult) for r in results)
    assert all(ok for ok, _ in check_many(insts, [r.text for r in results]))
    price = prices["strong-tier-local"]
    assert len(ledger.rows) == len(insts) and {r["endpoint"] for r in ledger.rows} == {"strong"}
    for row, res in zip(sorted(ledger.rows, key=lambda r: r["request_hash"]),
                        sorted(results, key=lambda r: r.request_hash), strict=True):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (res.prompt_tokens, res.completion_tokens)
        assert row["usd"] == pytest.approx(price.cost(res.prompt_tokens, res.completion_tokens)) and row["usd"] > 0
    assert ledger.spent_usd == pytest.approx(sum(price.cost(r.prompt_tokens, r.completion_tokens) for r in results))
    assert stats["failed"] == 1 and stats["retries"] == 0  # a 400 is not retried
    assert server_stats(base)["answered"] == before + len(insts)
