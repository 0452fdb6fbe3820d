"""Phase 2 end to end through Airflow on CPU: the DAG run alone on an HF model directory (the `model` param),
a GGUF that llama-cpp-python loads and answers with, the size/quality table with measured figures, and the step
cache: an unchanged re-run runs nothing, a new GGUF quant type re-runs only export_gguf and what follows.

Marked e2e: three DAG runs, about 5 minutes on 2 cores, with smaller settings than tiny.yaml.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config

# three Phase 2 DAG runs in the module fixture: 900 s of setup beside a make demo and the other xdist worker, at the
# 900 s default; the timeout is a hang guard, not a speed check
pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
SMALL = {
    "name": "p2-e2e",
    "compress.prune.schedule": [0.3, 0.5],
    "compress.prune.calibration_samples": 8,
    "compress.prune.ppl_rows": 4,
    "compress.prune.max_seq_len": 128,
    "compress.awq.calibration_samples": 4,
    "compress.awq.n_grid": 3,
    "compress.awq.max_seq_len": 128,
    "compress.gguf.agreement_prompts": 8,
    "compress.gguf.agreement_tokens": 16,
    "compress.recover.min_examples": 2,
    "compress.recover.hardest_fraction": 0.02,  # with min_examples: exactly 2 hard rows of the test's dataset
    "compress.recover.max_tokens": 32,
    "eval.max_tokens": 48,
    **{f"eval.suites.{i}.limit": 2 for i in range(4)},
}
STEPS = ("compress.prune", "compress.quantize_awq", "compress.export_gguf", "compress.pack_zstd", "eval.run",
         "compress.calibrate", "compress.recover", "compress.publish")


def _config(tmp: Path, name: str, extra: dict) -> str:
    import yaml

    from cogumi_tasks.core.config import apply_overrides, resolve_config_path

    data = apply_overrides(yaml.safe_load(resolve_config_path("tiny").read_text()), {**SMALL, **extra}, "t")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _manifests(store: ArtifactStore) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for step in STEPS:
        uris = [u for u in store.list(store.uri("p2-e2e", step) + "/") if u.endswith("/_manifest.json")]
        out[step] = [store.get_json(u) for u in uris]
    return out


@pytest.fixture(scope="module")
def phase2(dagbag, s3_server, llm_server, hf_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2")
    path = _config(tmp, "p2-e2e", {})
    config = load_config(path)
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    # the session's converted SmolLM2 (what train.base_model makes of tiny.yaml's GGUF), as an HF directory in S3
    model = store.uri("p2-e2e", "inputs", "base") + "/"
    for f in sorted(hf_dir.iterdir()):
        store.upload(f, model + f.name)
    prompts = [json.loads(x) for x in (REPO / "cogumi_tasks/resources/tiny_prompts.jsonl").read_text().splitlines()]
    dataset = tmp / "dataset.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p["prompt"], "response": f"Here is a clear answer about "
                                            f"{p['domain']}: it depends on the details, step by step."}) + "\n"
                               for p in prompts[:24]))
    conf = {"config": path, "model": model, "dataset": str(dataset)}
    first = dagbag.dags["phase2_compression"].test(run_conf=conf)
    after_first = _manifests(store)
    second = dagbag.dags["phase2_compression"].test(run_conf=conf)
    after_second = _manifests(store)
    q4 = _config(tmp, "p2-e2e-q4", {"compress.gguf.quant_type": "Q4_K_M"})
    third = dagbag.dags["phase2_compression"].test(run_conf={**conf, "config": q4})
    return {"runs": [first, second, third], "store": store, "model": model,
            "manifests": [after_first, after_second, _manifests(store)]}


def test_every_task_succeeds_and_the_gguf_answers(phase2, tmp_path):
    from llama_cpp import Llama

    for run in phase2["runs"]:
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert set(states.values()) == {"success"} and len(states) == 8, states
    export = phase2["manifests"][0]["compress.export_gguf"][0]
    store = phase2["store"]
    gguf = store.fetch(export["outputs"]["gguf"], tmp_path)
    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False, seed=0)
    try:
        out = llm.create_chat_completion([{"role": "user", "content": "What is 2 + 2?"}], max_tokens=16,
                                         temperature=0.0)
    finally:
        llm.close()
    assert out["choices"][0]["message"]["content"].strip()
    m = export["metrics"]
    assert 0 < m["token_agreement"] <= 1 and m["agreement_positions"] > 0 and m["quant_type"] == "Q5_K_M"
    assert m["gguf_bytes"] == gguf.stat().st_size < m["f16_bytes"]


def test_prune_awq_pack_calibrate_figures(phase2):
    first = phase2["manifests"][0]
    prune = first["compress.prune"][0]["metrics"]
    assert [s["target"] for s in prune["stages"]] == [0.3, 0.5]
    assert [round(s["sparsity"], 2) for s in prune["stages"]] == [0.3, 0.5]
    assert len(prune["stages"][-1]["per_layer"]) == 30
    awq = first["compress.quantize_awq"][0]["metrics"]
    assert awq["group_size"] == 64 and awq["bits_per_weight"] < 16
    pack = first["compress.pack_zstd"][0]["metrics"]
    assert pack["round_trip_ok"] and pack["ratio"] > 1.0
    cal = first["compress.calibrate"][0]["metrics"]
    assert 0 <= cal["ece_after"] <= 1 and cal["ece_gate_passed"] == (cal["ece_after_ci"][1] < 0.05)
    assert cal["ece_floor"]["items"] == cal["test_items"] and "perfectly calibrated" in cal["ece_gate"]["reason"]
    rec = first["compress.recover"][0]
    assert rec["metrics"]["improved"] >= 1 and rec["metrics"]["lora_gguf_bytes"] > 0
    assert rec["outputs"]["lora_gguf"].endswith("adapter.gguf")
    table = first["compress.publish"][0]["metrics"]
    assert table["answer_with_lora"].strip() and table["recovery"]["hardest"] == 2
    stages = [r["stage"] for r in table["rows"]]
    assert stages[0] == "base (safetensors)" and stages[-2:] == ["GGUF + zstd (transfer only)",
                                                                  "recovery LoRA (GGUF, applied at load time)"]
    assert table["shipped_mb"] == round(first["compress.export_gguf"][0]["metrics"]["gguf_bytes"] / 1e6, 2)
    print("phase2 table:", json.dumps(table["rows"]))


def test_unchanged_rerun_is_cached_and_a_new_quant_type_reruns_only_what_follows(phase2):
    first, second, third = (Counter({k: len(v) for k, v in m.items()}) for m in phase2["manifests"])
    assert second == first, "an unchanged re-run published nothing new"
    assert all(n == 1 for n in first.values()), first
    rerun = {k for k in third if third[k] > first[k]}
    assert rerun == {"compress.export_gguf", "compress.pack_zstd", "eval.run", "compress.calibrate",
                     "compress.publish"}
    q4 = [m for m in phase2["manifests"][2]["compress.export_gguf"] if m["metrics"]["quant_type"] == "Q4_K_M"]
    assert len(q4) == 1
