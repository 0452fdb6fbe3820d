"""Rank reduction of LoRA adapters (cogumi_tasks.modifiers.shrink), the variant gate and the choice among variants
(cogumi_tasks.modifiers.lora_steps.variant_gate, choose), on small synthetic adapters and scores: no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cogumi_tasks.eval.tables import paired_difference, pct_entry
from cogumi_tasks.modifiers.lora_steps import choose, variant_gate
from cogumi_tasks.modifiers.shrink import reduce_gguf_lora, reduce_peft, reduced_rank, truncate_pair


def _factors(rank: int, n_in: int = 24, n_out: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rank, n_in)), rng.normal(size=(n_out, rank))


def test_reduced_rank_keeps_the_share_the_sparsity_leaves():
    assert [reduced_rank(16, s) for s in (0.0, 0.5, 0.78)] == [16, 8, 4]  # 16 * 0.22 = 3.52 -> 4
    assert reduced_rank(12, 0.82) == 2 and reduced_rank(8, 0.85) == 1 and reduced_rank(2, 0.99) == 1
    with pytest.raises(ValueError, match="sparsity"):
        reduced_rank(8, 1.0)


def test_truncation_is_exact_at_full_rank_and_its_error_falls_with_rank():
    a, b = _factors(8)
    delta = 2.0 * b @ a
    a8, b8 = truncate_pair(a, b, 2.0, 8)
    assert a8.shape == (8, 24) and b8.shape == (20, 8)
    np.testing.assert_allclose(b8 @ a8, delta, atol=1e-9)
    errors = []
    for k in range(1, 9):
        ak, bk = truncate_pair(a, b, 2.0, k)
        assert ak.shape == (k, 24) and bk.shape == (20, k)
        errors.append(np.linalg.norm(bk @ ak - delta))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False)), errors
    s = np.linalg.svd(delta, compute_uv=False)  # Eckart-Young: the error is the norm of the dropped values
    np.testing.assert_allclose(errors[2], np.sqrt((s[3:] ** 2).sum()), rtol=1e-9)
    with pytest.raises(ValueError, match="rank 9"):
        truncate_pair(a, b, 1.0, 9)


def test_reduce_peft_writes_a_lower_rank_adapter_with_the_truncated_delta(tmp_path):
    from safetensors.numpy import load_file, save_file

    a, b = _factors(4)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a.astype(np.float32), f"{prefix}.lora_B.weight": b.astype(np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    out = tmp_path / "r2"
    info = reduce_peft(tmp_path, out, 2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (2, 2, "LORA")
    w = load_file(str(out / "adapter_model.safetensors"))
    a2, b2 = truncate_pair(a, b, 2.0, 2)
    np.testing.assert_allclose(w[f"{prefix}.lora_B.weight"] @ w[f"{prefix}.lora_A.weight"], b2 @ a2, atol=1e-4)
    assert info == {"rank": 2, "from_rank": 4, "modules": 1, "parameters": 2 * (24 + 20),
                    "bytes": (out / "adapter_model.safetensors").stat().st_size}


def test_reduce_gguf_lora_keeps_names_and_metadata_and_sets_alpha(tmp_path):
    import gguf

    a, b = _factors(4)
    src = tmp_path / "full.gguf"
    writer = gguf.GGUFWriter(str(src), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", a.astype(np.float16))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", b.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = reduce_gguf_lora(src, tmp_path / "r2.gguf", 2)
    reader = gguf.GGUFReader(str(tmp_path / "r2.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 2.0}
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in reader.tensors}
    a16, b16 = a.astype(np.float16).astype(np.float64), b.astype(np.float16).astype(np.float64)
    a2, b2 = truncate_pair(a16, b16, 2.0, 2)
    got = t["blk.0.attn_q.weight.lora_b"] @ t["blk.0.attn_q.weight.lora_a"]
    np.testing.assert_allclose(got, b2 @ a2, atol=2e-2 * np.abs(b2 @ a2).max())
    assert info["rank"] == 2 and info["from_rank"] == 4 and info["bytes"] < src.stat().st_size


def _variant(rank: int, nbytes: int, verdict: str, pct: float | None, acc: float) -> dict:
    return {"rank": rank, "gguf_bytes": nbytes, "gate": {"verdict": verdict},
            "pct_of_reference": {"pct": pct}, "accuracy": {"accuracy": acc}}


def test_choose_takes_the_smallest_variant_whose_gate_is_met():
    table = [_variant(16, 1600, "met", 150.0, 0.6), _variant(8, 800, "met", 120.0, 0.5),
             _variant(4, 400, "inconclusive", 140.0, 0.55)]
    chosen, passed = choose(table)
    assert (chosen["rank"], passed) == (8, True)  # rank 4 straddles the gate: not met, however high its point


def test_choose_reports_the_best_as_failing_when_none_is_met():
    table = [_variant(16, 1600, "not met", 60.0, 0.3), _variant(8, 800, "inconclusive", 90.0, 0.45),
             _variant(4, 400, "undefined", None, 0.5)]
    chosen, passed = choose(table)
    assert (chosen["rank"], passed) == (8, False)
    undefined = [_variant(16, 1600, "undefined", None, 0.2), _variant(4, 400, "undefined", None, 0.4)]
    assert choose(undefined)[0]["rank"] == 4  # no % of reference anywhere: the higher accuracy


def _gate(ours: list[int], base: list[int], ref: list[int], gate_pct: float = 100.0) -> dict:
    return variant_gate(pct_entry(ours, ref, 1000, 0), paired_difference(ours, base, 1000, 0), gate_pct)


def test_gate_against_a_reference_that_solved_nothing_asks_for_a_gain_over_the_base():
    ref = [0] * 20
    base = [1] * 9 + [0] * 11  # the last demo's automation: base 9/20, every variant 8/20
    same = _gate([1] * 8 + [0] * 12, base, ref)
    assert same["parts"]["pct_of_reference"]["verdict"] == "met"  # any score above 0 clears "100% of 0"
    assert same["parts"]["over_base"]["verdict"] == "not met" and same["verdict"] == "not met"
    gain = _gate([1] * 18 + [0] * 2, base, ref)  # +45 points, paired interval well above 0
    assert gain["verdict"] == "met" and "over_base: met" in gain["reason"]
    small = _gate([1] * 10 + [0] * 10, base, ref)  # +5 points: the interval straddles 0
    assert small["verdict"] == "inconclusive"


def test_gate_takes_the_worse_verdict_of_its_two_parts():
    base, ref = [0] * 20, [1] * 20
    low = _gate([1] * 12 + [0] * 8, base, ref, gate_pct=100)  # far over the base, 60% of the reference
    assert low["parts"]["over_base"]["verdict"] == "met" and low["verdict"] == "not met"
    assert _gate([1] * 12 + [0] * 8, base, ref, gate_pct=40)["verdict"] == "met"
    none = variant_gate({"pct": None, "ci": None, "why": "undefined (no items)"}, {"points": 10.0, "ci": [5.0, 15.0]},
                        100)
    assert none["verdict"] == "undefined"
