"""The LLM client and the Batch API path against the real llama.cpp server (SmolLM2-135M), with the
fault proxy or the test batch server in front, and the response cache, ledger and batch state in S3.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import pytest

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import EndpointConfig, LLMConfig, StorageConfig, config_dir
from cogumi_tasks.core.ledger import CostLedger, ResponseCache, load_prices, read_run_ledger
from cogumi_tasks.llm.batch import run_batch
from cogumi_tasks.llm.client import ChatRequest, ChatResult, LLMClient
from tests.servers.batch_server import batch_stats, start_batch_server
from tests.servers.fault_proxy import proxy_stats, start_fault_proxy

pytestmark = pytest.mark.stack

PRICE = "local-as-gpt-4o-mini"


@pytest.fixture(scope="module")
def store(s3_server) -> ArtifactStore:
    s = ArtifactStore(StorageConfig(bucket="cogumi-test", endpoint_url=s3_server.endpoint), s3_server.credentials())
    s.ensure_bucket()
    return s


@pytest.fixture(scope="module")
def llm(llm_server) -> str:
    """The llama.cpp server, warmed up: its first answer (model paging in) can take seconds."""
    import httpx

    httpx.post(llm_server + "/chat/completions", timeout=120, json={
        "model": "smollm2-135m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).raise_for_status()
    return llm_server


@pytest.fixture(scope="module")
def batch_server(llm, tmp_root):
    from cogumi_tasks.stack.services import free_port, stop

    port = free_port()
    proc = start_batch_server(llm, port, tmp_root / "logs" / "batch-server.log",
                              state_dir=tmp_root / "batch-server", line_delay_s=0.2)
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


def prompts(tag: str, n: int) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": f"{tag}: say the number {i} in words."}],
                        max_tokens=16, seed=0) for i in range(n)]


def make_client(store: ArtifactStore, base_url: str, prefix: str, *, llm: LLMConfig, timeout: float = 60,
                concurrency: int = 2, batch: bool = False) -> LLMClient:
    endpoint = EndpointConfig(name="local", base_url=base_url, model="smollm2-135m", price=PRICE, timeout_s=timeout,
                              max_concurrency=concurrency, batch=batch)
    ledger = CostLedger(load_prices(config_dir() / "prices.yaml"), 1.0, store=store,
                        ledger_prefix=store.uri(prefix, "ledger"), part="t")
    return LLMClient(endpoint, llm, ledger, step="test", cache=ResponseCache(store, store.uri(prefix, "cache")),
                     rng=random.Random(0), progress=True)


async def closing(client: LLMClient, coro):
    try:
        return await coro
    finally:
        await client.aclose()


def test_faults_are_retried_counted_and_cached(llm, store, tmp_root):
    from cogumi_tasks.stack.services import free_port, stop

    port = free_port()
    # The first five calls to arrive fail, one of each kind and a second hang; every later call is forwarded.
    planted = ("429", "500", "hang", "garbage", "hang")
    proc = start_fault_proxy(llm.removesuffix("/v1"), port, fault_rate=0.0, seed=0, hang_s=21,
                             log_path=tmp_root / "logs" / "llm-faults.log", plan=planted)
    proxy = f"http://127.0.0.1:{port}"
    prefix = f"faults-{uuid.uuid4().hex[:6]}"
    cfg = LLMConfig(max_retries=10, backoff_base_s=0.05, backoff_max_s=1.0)
    reqs = prompts("faults", 12)
    try:
        client = make_client(store, proxy + "/v1", prefix, llm=cfg, timeout=20)
        results = asyncio.run(closing(client, client.chat_many(reqs)))
        seen = proxy_stats(proxy)
        again = make_client(store, proxy + "/v1", prefix, llm=cfg, timeout=20)
        second = asyncio.run(closing(again, again.chat_many(reqs)))
        after = proxy_stats(proxy)
    finally:
        stop(proc)
    assert all(isinstance(r, ChatResult) and r.text for r in results), results
    s = client.stats
    assert seen["faults"] == {"429": 1, "500": 1, "hang": 2, "garbage": 1}
    # On a loaded machine a real answer can outlast the timeout: the client then retries a call the
    # proxy forwarded (``forwarded`` > 12), and counts it as a timeout.
    gave_up = seen["forwarded"] - 12
    assert (s["429"], s["5xx"], s["timeout"], s["unparseable"], s["connection"]) == (1, 1, 2 + gave_up, 1, 0)
    assert s["calls"] == seen["requests"] == 12 + len(planted) + gave_up and s["failed"] == 0
    assert s["retries"] == len(planted) + gave_up
    assert s["no_usage"] == len(planted) + gave_up  # each fault ended a call without a ledger row
    rows = read_run_ledger(store, store.uri(prefix, "ledger"))  # both clients' parts, from S3
    paid, free = [r for r in rows if not r["cached"]], [r for r in rows if r["cached"]]
    assert len(paid) == 12 and all(r["usd"] > 0 and not r["batch"] for r in paid)
    assert len(free) == 12 and all(r["usd"] == 0 for r in free)
    # the re-run is served from the S3 cache: no request reaches the proxy, nothing is paid
    assert after == seen
    assert all(r.cached for r in second) and [r.text for r in second] == [r.text for r in results]
    assert again.stats["cache_hits"] == 12 and again.ledger.spent_usd == 0


def _output_by_custom_id(client: LLMClient, batch_id: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        batch = await client.openai.batches.retrieve(batch_id)
        content = await client.openai.files.content(batch.output_file_id)
        rows = [json.loads(x) for x in content.text.splitlines() if x.strip()]
        return {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in rows}

    return asyncio.run(closing(client, read()))


def test_batch_maps_back_by_custom_id_and_falls_back(batch_server, store):
    prefix = f"batch-{uuid.uuid4().hex[:6]}"
    llm = LLMConfig(batch_poll_s=0.2, batch_timeout_s=120)
    reqs = prompts("batch", 4)
    state_uri = store.uri(prefix, "state.json")
    seen: list[str] = []

    def reject_first(text: str) -> str:  # the first answer validated is rejected once
        seen.append(text)
        if len(seen) == 1:
            raise ValueError("rejected once")
        return text.upper()

    before = batch_stats(batch_server)
    client = make_client(store, batch_server, prefix, llm=llm, batch=True)
    results = asyncio.run(closing(client, run_batch(client, reqs, state_uri=state_uri, store=store,
                                                    validate=reject_first)))
    after = batch_stats(batch_server)
    assert {k: after[k] - before[k] for k in after} == {"batches_created": 1, "files_uploaded": 1,
                                                        "lines_executed": 4, "chat_proxied": 1}
    assert all(isinstance(r, ChatResult) for r in results), results
    state = store.get_json(state_uri)
    assert state["custom_ids"] == [r.key("smollm2-135m") for r in reqs]
    out = _output_by_custom_id(make_client(store, batch_server, prefix, llm=llm, batch=True), state["batch_id"])
    for req, res in zip(reqs, results, strict=True):
        assert res.request_hash == req.key("smollm2-135m") and res.text == out[res.request_hash]
        assert res.parsed == res.text.upper()
    assert client.stats["unparseable"] == 1 and results[0].attempts == 1
    rows = client.ledger.rows
    assert [r["batch"] for r in rows].count(True) == 4 and [r["batch"] for r in rows].count(False) == 1
    price = client.ledger.price(PRICE)
    for r in rows:
        assert r["usd"] == pytest.approx(price.cost(r["prompt_tokens"], r["completion_tokens"], r["batch"]))

    # a re-run with a new state object is answered from the cache: no new batch
    again = make_client(store, batch_server, prefix, llm=llm, batch=True)
    cached = asyncio.run(closing(again, run_batch(again, reqs, state_uri=store.uri(prefix, "other.json"),
                                                  store=store)))
    assert all(r.cached for r in cached) and batch_stats(batch_server) == after
    assert not store.exists(store.uri(prefix, "other.json"))


def test_batch_resumes_after_interruption(batch_server, store):
    prefix = f"resume-{uuid.uuid4().hex[:6]}"
    llm = LLMConfig(batch_poll_s=0.2, batch_timeout_s=120)
    reqs = prompts("resume", 4)
    state_uri = store.uri(prefix, "state.json")
    before = batch_stats(batch_server)

    async def interrupted() -> str:
        """Run until the batch state is stored, then cancel: a task killed while polling."""
        client = make_client(store, batch_server, prefix, llm=llm, batch=True)
        task = asyncio.create_task(run_batch(client, reqs, state_uri=state_uri, store=store))
        while not await asyncio.to_thread(store.exists, state_uri):
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = (await client.openai.batches.retrieve(store.get_json(state_uri)["batch_id"])).status
        await client.aclose()
        assert client.ledger.rows == []
        return status

    assert asyncio.run(interrupted()) in ("validating", "in_progress")
    client = make_client(store, batch_server, prefix, llm=llm, batch=True)
    results = asyncio.run(closing(client, run_batch(client, reqs, state_uri=state_uri, store=store)))
    after = batch_stats(batch_server)
    assert {k: after[k] - before[k] for k in after} == {"batches_created": 1, "files_uploaded": 1,
                                                        "lines_executed": 4, "chat_proxied": 0}
    state = store.get_json(state_uri)
    out = _output_by_custom_id(make_client(store, batch_server, prefix, llm=llm, batch=True), state["batch_id"])
    assert [r.request_hash for r in results] == [q.key("smollm2-135m") for q in reqs] == state["custom_ids"]
    assert all(r.text == out[r.request_hash] and not r.cached for r in results)
    assert len(client.ledger.rows) == 4 and all(r["batch"] for r in client.ledger.rows)


class _TaskInstance:
    """What the operator touches of ``context["ti"]``: XCom pushes, recorded."""

    def __init__(self) -> None:
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.xcom[key] = value


def test_a_step_waiting_on_a_batch_defers_and_resumes_without_resubmitting(batch_server, s3_server, store_for,
                                                                         write_config, airflow_db):
    """data.generate with Batch API teachers, run by the operator: each batch defers the task to a BatchTrigger
    (rebuilt from its serialized form, as the triggerer does), whose run() polls the batch server until the
    batch completes; the resumed task runs the step again, which reads that batch and submits no other."""
    from airflow.sdk.exceptions import TaskDeferred
    from airflow.sdk.module_loading import import_string
    from cogumi_provider.operators import CogumiStepOperator
    from cogumi_provider.triggers import BatchTrigger

    from cogumi_tasks.core.config import load_config
    from cogumi_tasks.core.steps import run_step

    path = write_config(f"batchdefer-{uuid.uuid4().hex[:6]}", {
        "dataset.prompts.limit": 3, "dataset.prompts.world.families": {}, "dataset.prompts.shards": 1,
        "dataset.generate.max_tokens": 16, "llm.batch_poll_s": 0.2,
        "teachers.0.base_url": batch_server, "teachers.0.batch": True, "teachers.0.weight": 0.5,
        "teachers.1.base_url": batch_server, "teachers.1.batch": True, "teachers.1.families": "null",
        "teachers.1.weight": 0.5})  # each teacher gets some of the 3 prompts, whatever tiny.yaml's weights
    config = load_config(path)
    store_for(config)
    shard = run_step("data.prompts", config, run_id="batchdefer").outputs["shards"][0]
    task = CogumiStepOperator(task_id="generate", step="data.generate", config_name=path, input_name="shard",
                              input_uri=shard, return_output="answers")
    context = {"run_id": "batchdefer", "ti": _TaskInstance(), "outlet_events": {}, "inlet_events": {}}

    before = batch_stats(batch_server)
    call, batches = (lambda: task.execute(context)), []
    while True:
        try:
            answers = call()
            break
        except TaskDeferred as deferred:
            assert isinstance(deferred.trigger, BatchTrigger) and deferred.method_name == "execute_batch_done"
            assert deferred.timeout.total_seconds() == config.llm.batch_timeout_s
            classpath, kwargs = deferred.trigger.serialize()
            # plain config data: the endpoint names where its key is, never the key
            teacher = next(t for t in config.teachers if t.name == kwargs["endpoint"]["name"])
            assert kwargs["endpoint"] == teacher.model_dump(mode="json", include=set(EndpointConfig.model_fields))
            trigger = import_string(classpath)(**kwargs)
            event = asyncio.run(anext(trigger.run())).payload
            assert event == {"status": "completed", "batch_id": kwargs["batch_id"]}
            batches.append(kwargs["batch_id"])
            assert len(batches) <= 2, "a teacher's batch was waited on twice"

            def call(method=deferred.method_name, event=event):
                return getattr(task, method)(context, event=event)
    after = batch_stats(batch_server)
    used = {k: after[k] - before[k] for k in after}
    assert len(set(batches)) == len(batches) == 2  # one batch per teacher, each waited on once
    assert used["batches_created"] == used["files_uploaded"] == len(batches)
    assert used["lines_executed"] == 3 and used["chat_proxied"] == 0
    assert answers == context["ti"].xcom["answers"] and context["ti"].xcom["skipped"] is False
    rows = [json.loads(x) for x in store_for(config).get_bytes(answers).decode().splitlines() if x.strip()]
    assert len(rows) == 3 and {r["teacher"] for r in rows} == {"teacher-a", "teacher-b"}


def test_batch_trigger_reports_an_unknown_batch_as_an_error_the_task_raises(batch_server):
    from cogumi_provider.operators import CogumiStepOperator
    from cogumi_provider.triggers import BatchTrigger

    endpoint = EndpointConfig(name="local", base_url=batch_server, model="smollm2-135m", price=PRICE, batch=True)
    trigger = BatchTrigger(endpoint=endpoint.model_dump(mode="json"), batch_id="batch_gone", state_uri="s3://b/s.json",
                           poll_s=0.1)
    event = asyncio.run(anext(trigger.run())).payload
    assert event["status"] == "error" and "batch batch_gone (from s3://b/s.json) is unknown to" in event["message"]
    task = CogumiStepOperator(task_id="generate", step="data.generate", config_name="tiny")
    with pytest.raises(RuntimeError, match="delete that state object to submit a new batch"):
        task.execute_batch_done({"run_id": "r"}, event=event)


def test_the_llama_server_resumes_interleaved_prompts_from_its_prompt_cache(tmp_root):
    """With ``prompt_cache_bytes`` set, a prompt sent again after another one resumes from its cached state (the
    server logs a cache hit) instead of reading its prefix again; without it, llama-cpp-python has no cache."""
    import httpx

    from cogumi_tasks.stack.services import free_port, start_llama_server, stop

    prefix = "Here are worked examples. " + " ".join(f"Example {i}: {i} plus {i} is {2 * i}." for i in range(40))
    for cache_bytes in (64 * 2**20, 0):  # the long prompt's KV state is ~16 MB: room for both states
        port = free_port()
        log = tmp_root / "logs" / f"llama-prompt-cache-{cache_bytes}.log"
        proc = start_llama_server("smollm2-135m", port, log, prompt_cache_bytes=cache_bytes)
        try:
            for tail in ("What is 3 plus 3?", "Name a colour.", "What is 4 plus 4?"):
                content = prefix + " " + tail if "plus" in tail else tail
                httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
                    "model": "smollm2-135m", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": content}]}).raise_for_status()
        finally:
            stop(proc)
        hits = log.read_text(errors="replace").count("Llama._create_completion: cache hit")
        assert (hits > 0) == (cache_bytes > 0), (cache_bytes, hits)
