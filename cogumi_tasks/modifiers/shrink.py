"""Smaller LoRA adapters by rank reduction: a sparsity level ``s`` becomes a truncated SVD of each module's delta.

Zeros in a dense file save nothing, so a LoRA "pruned" to sparsity ``s`` is stored as a real lower-rank adapter:
each module's delta ``scale * B @ A`` (``scale = alpha / r``, ``B`` out x r, ``A`` r x in) is replaced by its best
rank ``r' = max(1, round(r * (1 - s)))`` approximation (Eckart-Young: the truncated SVD). A LoRA module holds
``r * (in + out)`` parameters, so the share kept is exactly ``r' / r`` and the share removed ``1 - r' / r``
(e.g. rank 16 at s = 0.78: r' = round(3.52) = 4, 25% kept, 75% removed; the measured bytes say the rest).

The reduced factors are ``B' = U_r' sqrt(S_r')`` and ``A' = sqrt(S_r') V_r'^T`` with ``alpha' = r'``, so the
scaled delta ``(alpha' / r') B' A'`` is the truncated SVD itself. Written twice from the same rule: a peft
adapter (safetensors, from the fp32 factors) and a GGUF LoRA (from the full-rank GGUF LoRA that llama.cpp's
converter wrote, whose tensor names and q/k row permutation it keeps: a row permutation commutes with the SVD).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def reduced_rank(rank: int, sparsity: float) -> int:
    """``max(1, round(rank * (1 - sparsity)))``: the rank that keeps ``1 - sparsity`` of a LoRA's parameters."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity}: must be in [0, 1)")
    return max(1, round(rank * (1 - sparsity)))


def truncate_pair(a: np.ndarray, b: np.ndarray, scale: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(A', B')`` (rank x in, out x rank) with ``B' @ A'`` the best rank-``rank`` approximation of
    ``scale * b @ a`` (``a``: r x in, ``b``: out x r), in float64. The SVD runs on the r x r core of the two QR
    factorizations, never on the out x in product."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.ndim != 2 or b64.ndim != 2 or b64.shape[1] != a64.shape[0]:
        raise ValueError(f"LoRA factors of shapes {a64.shape} (A) and {b64.shape} (B) do not chain")
    if not 1 <= rank <= a64.shape[0]:
        raise ValueError(f"rank {rank}: must be between 1 and the adapter's rank {a64.shape[0]}")
    qb, rb = np.linalg.qr(b64)  # b = qb rb
    qa, ra = np.linalg.qr(a64.T)  # a = ra^T qa^T
    u, s, vt = np.linalg.svd(scale * rb @ ra.T)
    root = np.sqrt(s[:rank])
    return (root[:, None] * vt[:rank]) @ qa.T, qb @ (u[:, :rank] * root[None, :])


def lora_pairs(names: list[str], a_suffix: str, b_suffix: str) -> list[tuple[str, str]]:
    """(A name, B name) of every module, matched by the suffixes; an A without its B (or the reverse) raises."""
    a = {n[: -len(a_suffix)]: n for n in names if n.endswith(a_suffix)}
    b = {n[: -len(b_suffix)]: n for n in names if n.endswith(b_suffix)}
    if set(a) != set(b) or not a:
        raise ValueError(f"unpaired LoRA tensors ({len(a)} A, {len(b)} B; e.g. {sorted(set(a) ^ set(b))[:3]})")
    return [(a[k], b[k]) for k in sorted(a)]


def reduce_peft(src: Path, dst: Path, rank: int) -> dict:
    """Write the peft adapter in ``src`` at ``rank`` into ``dst`` (fp32 factors, ``r = lora_alpha = rank``).
    Returns ``{"rank", "from_rank", "modules", "parameters", "bytes"}`` (bytes of the safetensors file)."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((src / PEFT_CONFIG).read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ValueError(f"{src}: per-module ranks, rsLoRA or DoRA are not supported by the rank reduction")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    weights = load_file(str(src / PEFT_WEIGHTS))
    out: dict[str, np.ndarray] = {}
    pairs = lora_pairs(list(weights), ".lora_A.weight", ".lora_B.weight")
    for a_name, b_name in pairs:
        a2, b2 = truncate_pair(weights[a_name], weights[b_name], alpha / r, rank)
        out[a_name], out[b_name] = a2.astype(np.float32), b2.astype(np.float32)
    for name, value in weights.items():  # anything else (none for plain LoRA) is kept as it is
        out.setdefault(name, value)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / PEFT_WEIGHTS), metadata={"format": "pt"})
    (dst / PEFT_CONFIG).write_text(json.dumps({**cfg, "r": rank, "lora_alpha": rank}, indent=2))
    for extra in src.iterdir():  # tokenizer files and the like travel with the adapter
        if extra.is_file() and extra.name not in (PEFT_CONFIG, PEFT_WEIGHTS):
            shutil.copy2(extra, dst / extra.name)
    return {"rank": rank, "from_rank": r, "modules": len(pairs), "parameters": int(sum(v.size for v in out.values())),
            "bytes": (dst / PEFT_WEIGHTS).stat().st_size}


def reduce_gguf_lora(src: Path, dst: Path, rank: int) -> dict:
    """Write the GGUF LoRA ``src`` (``convert_lora_to_gguf.py``'s output) at ``rank`` into ``dst``: the same
    metadata with ``adapter.lora.alpha = rank``, each ``*.lora_a``/``*.lora_b`` pair truncated, stored in f16.
    Returns ``{"rank", "from_rank", "modules", "bytes"}``."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    fields = reader.fields
    if fields["general.type"].contents() != "adapter" or fields["adapter.type"].contents() != "lora":
        raise ValueError(f"{src}: not a GGUF LoRA adapter")
    alpha = float(fields["adapter.lora.alpha"].contents())
    tensors = {t.name: t for t in reader.tensors}
    pairs = lora_pairs(list(tensors), ".lora_a", ".lora_b")
    r = int(tensors[pairs[0][0]].data.shape[0])
    writer = gguf.GGUFWriter(str(dst), arch=str(fields["general.architecture"].contents()))
    for key, field in fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "adapter.lora.alpha"):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    writer.add_float32("adapter.lora.alpha", float(rank))
    for a_name, b_name in pairs:
        a, b = tensors[a_name].data, tensors[b_name].data
        if a.shape[0] != r:
            raise ValueError(f"{src}: {a_name} has rank {a.shape[0]}, the first module {r}")
        a2, b2 = truncate_pair(a, b, alpha / r, rank)
        writer.add_tensor(a_name, a2.astype(np.float16))
        writer.add_tensor(b_name, b2.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"rank": rank, "from_rank": r, "modules": len(pairs), "bytes": dst.stat().st_size}
