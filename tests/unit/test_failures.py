"""Failure analysis: MiniLM embeddings, KMeans clusters of planted failures, judge labels from llama.cpp."""

from __future__ import annotations

import asyncio
import logging
import math

import numpy as np
import pytest

from cogumi_tasks.train.failures import (
    UNLABELLED,
    Cluster,
    cluster_failures,
    embed,
    failure_text,
    failures_of,
    label_clusters,
    load_embedder,
    parse_label,
)

log = logging.getLogger("test")

DATES = [
    "What date is 45 days after March 3, 2024?",
    "If today is Friday, January 31, what is the date two weeks from today?",
    "How many days are there between June 12 and September 1 of the same year?",
    "What day of the week will it be 100 days after Monday?",
    "Add 3 months and 10 days to November 25, 2023. What is the resulting date?",
    "A project starts on February 20, 2024 (a leap year) and lasts 15 days. On which date does it end?",
    "How many days from December 25, 2023 until April 1, 2024?",
    "What was the date 90 days before July 4, 2025?",
    "If a subscription renews every 30 days starting January 15, when is the third renewal date?",
    "Compute the number of weeks and days between May 5 and August 19.",
]
SQL = [
    "Write a SQL query joining the orders and customers tables to list each customer's total order amount.",
    "Using a LEFT JOIN, list all employees and their department names, including employees without a department.",
    "Write SQL that joins products, order_items and orders to find the best-selling product per month.",
    "Explain why this INNER JOIN between users and payments returns duplicate rows, and fix the SQL query.",
    "Write a SQL query with a self join on the employees table to show each employee with their manager.",
    "Join the students and enrollments tables in SQL to find students enrolled in no course.",
    "Write a SQL FULL OUTER JOIN between inventory and suppliers and explain NULL handling in the result.",
    "Write SQL to join three tables, authors, books and reviews, and return the average rating per author.",
    "In SQL, join sales to regions on region_id and group by region name to compute total revenue.",
    "Rewrite this SQL subquery as a JOIN: SELECT name FROM customers WHERE id IN (SELECT customer_id FROM orders).",
]
TOOLS = [
    'Call the get_weather tool for Paris. Respond only with a JSON tool call: {"name": ..., "arguments": {...}}.',
    "Emit a JSON function call to send_email with arguments to, subject and body for a meeting reminder.",
    'Use the search_flights tool (arguments: origin, destination, date) as a JSON tool call for LHR to JFK.',
    "Produce the JSON tool call that invokes create_calendar_event with title, start and end ISO timestamps.",
    'Given the tool schema {"name": "convert_currency", "parameters": {"amount", "from", "to"}}, output the call.',
    "Return a JSON object calling the lookup_stock_price function with the ticker symbol AAPL.",
    "Call the tool set_thermostat with temperature 21 and mode heat; answer with the JSON function call only.",
    "Output a JSON tool call to the translate_text function with text, source_lang and target_lang arguments.",
    "Invoke the book_restaurant tool via JSON with arguments restaurant_id, party_size and time.",
    "Format a JSON function call for the get_directions tool from the train station to the museum, mode walking.",
]
WRONG = {
    "dates": "The date is April 10, 2024.",
    "sql": "SELECT * FROM a, b;",
    "tools": 'get_weather(city="Paris")',
}


def planted_rows() -> tuple[list[dict], list[int]]:
    """30 failures from three obvious topics (plus two correct rows that must be filtered out)."""
    rows, truth = [], []
    for topic, (name, prompts) in enumerate((("dates", DATES), ("sql", SQL), ("tools", TOOLS))):
        for i, prompt in enumerate(prompts):
            rows.append({"id": f"{name}-{i}", "suite": "planted", "domain": name, "prompt": prompt,
                         "answer": WRONG[name], "score": 0.0, "correct": False, "error": None,
                         "reference_answer": None, "reference_score": 1.0})
            truth.append(topic)
    rows += [{"id": "ok-0", "prompt": "2+2?", "answer": "4", "correct": True},
             {"id": "ok-1", "prompt": "Capital of France?", "answer": "Paris", "correct": True}]
    return rows, truth


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("builtin:all-minilm-l6-v2")


@pytest.fixture(scope="module")
def planted(embedder):
    rows, truth = planted_rows()
    failures = failures_of(rows)
    assert len(failures) == len(truth) == 30
    return failures, truth, embed(embedder, [failure_text(r) for r in failures])


def test_paraphrases_are_closer_than_unrelated_texts(embedder):
    vecs = embed(embedder, ["How do I join two tables in SQL?",
                            "What is the SQL syntax to combine rows from two tables with a join?",
                            "What date is 45 days after March 3?",
                            "Bananas are rich in potassium."])
    assert vecs.shape == (4, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    sim = vecs @ vecs.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2


def test_failure_text_has_prompt_and_short_answer():
    text = failure_text({"prompt": "Add 2 and 2.", "answer": "five " * 500})
    assert text.startswith("Add 2 and 2.\nWrong answer: five") and len(text) < 400
    assert failure_text({"prompt": "p", "answer": "", "error": None}) == "p"


def test_kmeans_recovers_planted_topics(planted):
    from sklearn.metrics import adjusted_rand_score

    failures, truth, vecs = planted
    clusters, silhouette = cluster_failures(failures, vecs, k=3, examples_per_cluster=4)
    pred = {m: c.id for c in clusters for m in c.member_ids}
    ari = adjusted_rand_score(truth, [pred[r["id"]] for r in failures])
    log.info("planted failures: ARI %.3f, silhouette %.3f, sizes %s", ari, silhouette, [c.size for c in clusters])
    print(f"planted failures: ARI {ari:.3f}, silhouette {silhouette:.3f}, sizes {[c.size for c in clusters]}")
    assert ari >= 0.9
    assert silhouette > 0.1
    assert [c.id for c in clusters] == [0, 1, 2] and sum(c.size for c in clusters) == 30
    assert all(a.size >= b.size for a, b in zip(clusters, clusters[1:], strict=False))
    for c in clusters:
        assert len(c.examples) == 4 and c.label is None and c.centroid_distance_mean > 0
        dists = [e["distance"] for e in c.examples]
        assert dists == sorted(dists) and {e["id"] for e in c.examples} <= set(c.member_ids)
        assert len({e["domain"] for e in c.examples}) == 1  # examples are typical members


def test_k_is_capped_and_tiny_inputs(planted):
    failures, _, vecs = planted
    few, few_vecs = failures[:5], vecs[:5]
    clusters, silhouette = cluster_failures(few, few_vecs, k=10, examples_per_cluster=2)
    assert len(clusters) == 4 and sum(c.size for c in clusters) == 5 and not math.isnan(silhouette)
    clusters, silhouette = cluster_failures(failures[:2], vecs[:2], k=10, examples_per_cluster=5)
    assert len(clusters) == 1 and clusters[0].size == 2 and len(clusters[0].examples) == 2
    assert math.isnan(silhouette)
    clusters, silhouette = cluster_failures(failures[:3], vecs[:3], k=1, examples_per_cluster=1)
    assert len(clusters) == 2 and not math.isnan(silhouette)  # k raised to 2
    assert cluster_failures([], vecs[:0], k=3, examples_per_cluster=2)[0] == []
    with pytest.raises(ValueError, match="embeddings"):
        cluster_failures(failures[:4], vecs[:3], k=2, examples_per_cluster=1)


def test_parse_label_validates():
    assert parse_label('{"pattern": " Date math ", "description": "Off by days."}') == {
        "pattern": "Date math", "description": "Off by days."}
    assert parse_label('{"pattern": "x"}')["description"] == ""
    bad_labels = ("not json", "[1]", '{"pattern": ""}', '{"description": "d"}', '{"pattern": 3}',
                  '{"pattern": "<short name>"}', '{"pattern": "Wrong answer"}', '{"pattern": "pattern"}',
                  '{"pattern": "Tasks the model got wrong: 1. Write"}', '{"pattern": "' + "word " * 9 + '"}')
    for bad in bad_labels:
        with pytest.raises(ValueError):
            parse_label(bad)


class _FakeResult:
    def __init__(self, text: str):
        self.text, self.parsed = text, None


class _FakeClient:
    """Answers the first request, fails the second, as chat_many would report it."""

    async def chat_many(self, reqs, validate=None):
        assert all(r.response_format["type"] == "json_object" for r in reqs)
        return [_FakeResult('{"pattern": "SQL joins", "description": "Wrong join."}'),
                RuntimeError("gave up after 7 attempts")][: len(reqs)]


def test_label_failure_marks_unlabelled():
    clusters = [Cluster(0, 2, ["a", "b"], [{"id": "a", "prompt": "p", "answer": "x"}]),
                Cluster(1, 1, ["c"], [{"id": "c", "prompt": "q", "answer": "y"}]),
                Cluster(2, 0, [], [])]
    out = asyncio.run(label_clusters(_FakeClient(), clusters))
    assert out[0].label == "SQL joins" and out[0].description == "Wrong join." and out[0].error is None
    assert out[1].label == UNLABELLED and "gave up" in out[1].error
    assert out[2].label == UNLABELLED and out[2].error == "no examples"


@pytest.mark.stack
def test_label_clusters_with_llama_server(llm_server, planted):
    from cogumi_tasks.core.config import EndpointConfig, LLMConfig, config_dir
    from cogumi_tasks.core.ledger import CostLedger, load_prices
    from cogumi_tasks.llm.client import LLMClient

    failures, _, vecs = planted
    clusters, silhouette = cluster_failures(failures, vecs, k=3, examples_per_cluster=3)
    endpoint = EndpointConfig(name="judge", base_url=llm_server, model="smollm2-135m",
                              price="local-as-gpt-4o-mini", max_concurrency=1, timeout_s=120)
    llm = LLMConfig(max_retries=3, backoff_base_s=0.05, backoff_max_s=0.2)
    ledger = CostLedger(load_prices(config_dir() / "prices.yaml"), 1.0)

    async def run() -> list[Cluster]:
        client = LLMClient(endpoint, llm, ledger, step="test.failures")
        try:
            return await label_clusters(client, clusters, max_tokens=96)
        finally:
            await client.aclose()

    labelled = asyncio.run(run())
    summary = [(c.size, c.label, c.description, c.error) for c in labelled]
    log.info("labels (silhouette %.3f): %s", silhouette, summary)
    print(f"labels (silhouette {silhouette:.3f}): {summary}")
    assert len(labelled) == 3
    assert all(isinstance(c.label, str) and c.label.strip() for c in labelled)
    assert ledger.spent_usd > 0
