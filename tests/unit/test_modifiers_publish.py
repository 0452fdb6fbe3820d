"""modifiers.publish reads each modifier's chain of manifests (compress <- train <- tiers <- test) and computes the
tier table, the saving against the top tier and the size rows from the figures those steps recorded."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import run_step
from cogumi_tasks.eval.phase_tables import phase3_tables
from cogumi_tasks.modifiers.publish import plan_lora_mb

TIERS = [  # tier, teacher, items_in, attempted, solved, cost at list price
    (1, "teacher-a", 8, 8, 3, 0.001), (2, "teacher-a", 5, 5, 1, 0.002), (3, "teacher-b", 4, 4, 4, 0.04)]
PAID = {1: 0.001, 2: 0.0005, 3: 0.0}  # what each tier's run paid: tier 3's answers all came from the response cache


def _plant(store: ArtifactStore, step: str, key: str, files: dict[str, bytes], **manifest) -> dict[str, str]:
    prefix = store.uri("p3", step, key)
    for rel, data in files.items():
        store.put_bytes(f"{prefix}/{rel}", data)
    store.put_json(f"{prefix}/_manifest.json", {"step": step, "prefix": prefix, "inputs": {}, "params": {},
                                                 "metrics": {}, **manifest,
                                                 "files": {r: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                                           for r, d in files.items()}})
    return {rel.rstrip("/"): f"{prefix}/{rel}" for rel in files}


@pytest.fixture
def config_path(tmp_path):
    from tests.conftest import REPO

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["name"] = "p3"
    data["modifiers"] = data["modifiers"][:1]  # code
    path = tmp_path / "p3.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_publish_tier_table_saving_sizes_and_bundle(s3_server, config_path):
    config = load_config(config_path)
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    test = _plant(store, "modifiers.test", "t", {"remaining.jsonl": b"{}\n"}, params={"modifier": "code"},
                  metrics={"tested": 10, "passed": 2, "failed": 8})
    remaining, solved = test["remaining.jsonl"], []
    for tier, teacher, items_in, attempted, n_solved, cost in TIERS:
        out = _plant(store, "modifiers.tier", f"k{tier}", {"solved.jsonl": b"{}\n", "remaining.jsonl": b"{}\n"},
                     params={"modifier": "code", "tier": tier}, inputs={"remaining": remaining},
                     metrics={"teacher": teacher, "items_in": items_in, "attempted": attempted, "solved": n_solved,
                              "remaining": items_in - n_solved, "calls": attempted, "cost_usd": PAID[tier],
                              "list_cost_usd": cost})
        remaining = out["remaining.jsonl"]
        solved.append(out["solved.jsonl"])
    solved.reverse()  # publish orders tiers by their tier param, not by input order
    train = _plant(store, "modifiers.train", "tr", {"adapter/adapter_model.safetensors": b"w"},
                   inputs={"solved": solved}, metrics={"training": {"steps": 5}})
    variants = [{"sparsity": 0, "rank": 16, "gguf_bytes": 2_000_000, "passed_gate": True,
                 "vs_base": {"points": 25.0, "ci": [5.0, 45.0]},
                 "accuracy": {"accuracy": 0.6, "ci": [0.4, 0.8]}, "pct_of_reference": {"pct": 120.0, "ci": [90, 150]}},
                {"sparsity": 0.5, "rank": 8, "gguf_bytes": 1_000_000, "passed_gate": True,
                 "accuracy": {"accuracy": 0.5, "ci": [0.3, 0.7]}, "pct_of_reference": {"pct": None, "why": "ref 0"}}]
    comp = _plant(store, "modifiers.compress", "c", {"variants.json": b"[]", "adapter.gguf": b"g"},
                  inputs={"adapter": store.uri("p3", "modifiers.train", "tr", "adapter") + "/"},
                  metrics={"variants": variants, "chosen": {"sparsity": 0.5, "rank": 8}, "passed_gate": True})
    summary = _plant(store, "modifiers.evaluate", "e", {"summary.json": json.dumps({"domains": {}}).encode(),
                                                        "items.jsonl": b"{}\n"})
    base = _plant(store, "compress.publish", "b", {"model.gguf": b"m", "recovery.gguf": b"r"})
    assert train

    result = run_step("modifiers.publish", config, {
        "variants": [comp["variants.json"]], "summary": summary["summary.json"], "items": summary["items.jsonl"],
        "modifiers": [comp["adapter.gguf"]], "gguf": base["model.gguf"], "lora": base["recovery.gguf"]}, store=store)
    table = result.metrics
    cascade = table["modifiers"]["code"]["cascade"]
    assert [t["tier"] for t in cascade["tiers"]] == [1, 2, 3]
    assert cascade["tested"] == 10 and cascade["entered_cascade"] == 8 and cascade["solved"] == 8
    spent = sum(t[5] for t in TIERS)
    all_top = 0.04 / 4 * 8  # the top tier's cost per attempted item, for every item that entered tier 1
    assert cascade["cost_usd"] == pytest.approx(spent)  # at list price: a cached answer is not free for the saving
    assert cascade["paid_usd"] == pytest.approx(sum(PAID.values()))
    assert cascade["cost_all_top_tier_usd"] == pytest.approx(all_top)
    assert cascade["saving"] == pytest.approx(1 - spent / all_top, abs=1e-4)
    assert cascade["saving_vs_plan"]["verdict"] == "not met"  # 46% < the plan's 61%
    assert [t["share_of_entered"] for t in cascade["tiers"]] == [round(3 / 8, 4), round(1 / 8, 4), 0.5]
    sizes = table["modifiers"]["code"]["sizes"]
    assert [v["gguf_bytes"] for v in sizes["variants"]] == [2_000_000, 1_000_000]
    assert sizes["plan"]["mb"] == 47 and "Llama-3.1-8B" in sizes["plan"]["note"]
    bundle = json.loads(store.get_bytes(result.outputs["bundle"]))
    assert bundle["base_gguf"] == base["model.gguf"] and bundle["recovery_lora"] == base["recovery.gguf"]
    assert bundle["modifiers"] == [{"name": "code", "domain": "code", "lora_gguf": comp["adapter.gguf"],
                                    "scale": 1.0}]
    # what Phase 4 reads from the cogumi_phase3 Asset, passed on unchanged
    assert result.outputs["items"] == summary["items.jsonl"] and result.outputs["modifiers"] == [comp["adapter.gguf"]]
    assert result.outputs["gguf"] == base["model.gguf"] and result.outputs["lora_gguf"] == base["recovery.gguf"]
    rendered = phase3_tables([{"step": "modifiers.publish", "metrics": table}])
    assert [t["id"] for t in rendered] == ["tier-table", "modifier-sizes"]
    assert len(rendered[0]["rows"]) == 1 + len(TIERS) + 1  # test, the tiers, the total
    sizes_rows = rendered[1]["rows"]
    assert sizes_rows[0][5] == "60.0% (CI 40.0%-80.0%)" and sizes_rows[0][6] == "120.0% (CI 90.0-150.0)"
    assert sizes_rows[0][7] == "+25.0 (CI +5.0 to +45.0)" and sizes_rows[1][7] == "-"
    assert sizes_rows[1][6] == "ref 0" and sizes_rows[1][9] == "chosen" and sizes_rows[0][9] == ""
    assert sizes["variants"][0]["vs_base"]["points"] == 25.0


def test_publish_refuses_a_count_mismatch(s3_server, config_path):
    from cogumi_tasks.core.steps import StepFailed

    config = load_config(config_path)
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    f = _plant(store, "x.y", "z", {"a.json": b"{}"})["a.json"]
    with pytest.raises(StepFailed, match="2 variants and 1 adapters for 1 configured modifiers"):
        run_step("modifiers.publish", config, {"variants": [f, f], "summary": f, "items": f, "modifiers": [f],
                                               "gguf": f},
                 store=store)


def test_plan_lora_arithmetic():
    # q, k, v, o on Llama-3.1-8B: (8192 + 5120 + 5120 + 8192) x 32 layers = 851,968 parameters per rank
    a = plan_lora_mb(128, 0.78, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert a["params_per_rank"] == 851_968
    assert a["mb_f16_dense"] == round(128 * 851_968 * 2 / 1e6, 1)
    assert a["mb_f16_kept"] == round(128 * 851_968 * 0.22 * 2 / 1e6, 1)
