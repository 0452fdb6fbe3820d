"""A real, small release for the serving tests: the packaged SmolLM2 GGUF, seeded random GGUF LoRAs (three
modifiers and a recovery), a router trained on the planted verdicts and an escalation student fitted in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODIFIERS = ("code", "reasoning", "automation")
# a calibrator that maps every raw confidence far below any threshold: the router decides every auto request
LOW_CALIBRATOR = {"method": "platt", "a": 1.0, "b": -8.0}


def noise_lora(out: Path, seed: int, std: float = 0.05, rank: int = 4, kinds=("attn_q", "attn_v")) -> Path:
    """A GGUF LoRA on the packaged SmolLM2's ``kinds`` projections with seeded random factors."""
    import gguf

    from cogumi_tasks.models.packaged import smollm2_gguf

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in kinds:
            n_in, n_out = (int(x) for x in t.shape)
            writer.add_tensor(t.name + ".lora_a", rng.normal(0, std, size=(rank, n_in)).astype(np.float16))
            writer.add_tensor(t.name + ".lora_b", rng.normal(0, std, size=(n_out, rank)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def small_router(out: Path, embedder) -> Path:
    """The router MLP on planted verdicts (16 PCA dims), saved as a bundle. The verdicts are planted without
    noise (a domain query: only its modifier is right; a general prompt: only the base), so what the router learns
    is the domain of a query's embedding, and a tiny-world code prompt routes to code, a general prompt to base."""
    from cogumi_tasks.core.config import RouterConfig
    from cogumi_tasks.routing.features import VerdictRow, embed_queries
    from cogumi_tasks.routing.planted import planted_verdicts
    from cogumi_tasks.routing.router_steps import fit_router

    rows = [VerdictRow.model_validate(r) for r in planted_verdicts(per_domain=15, general=30, base_domain=0.0,
                                                                   base_general=1.0, other=0.0)]
    cfg = RouterConfig(pca_dims=16, bootstrap=100, max_epochs=150, patience=15)
    router, _ = fit_router(rows, embed_queries(embedder, [r.query for r in rows]), cfg)
    return router.save(out)


def small_escalation(out: Path) -> Path:
    """An escalation student trained on generated messages with a stand-in teacher (the hard labels as logits)."""
    import torch

    from cogumi_tasks.core.config import EscalationConfig
    from cogumi_tasks.routing.escalation import build_vocab, save_student, train_student
    from cogumi_tasks.routing.escalation_data import generate

    cfg = EscalationConfig(student_epochs=4, hidden=32, embed_dim=32, layers=1, seed=5)
    examples = generate(200, (0.5, 1 / 3, 1 / 6), seed=0)
    train = [e for e in examples if e.split == "train"]
    val = [e for e in examples if e.split == "val"]

    def soft(rows):
        return torch.tensor([[2.0, -2.0] if e.label == 0 else [-2.0, 2.0] for e in rows])

    texts = [e.text for e in train]
    vocab = build_vocab(texts, cfg.max_words, cfg.min_count)
    result = train_student(texts, [e.label for e in train], soft(train), vocab, val, soft(val), cfg)
    save_student(result, cfg, out)
    return out


def build_small_release(tmp: Path, embedder) -> Path:
    from cogumi_tasks.models.packaged import smollm2_gguf
    from cogumi_tasks.serve.release import build_release

    loras = {name: noise_lora(tmp / f"{name}.gguf", seed=i + 1) for i, name in enumerate(MODIFIERS)}
    recovery = noise_lora(tmp / "recovery.gguf", seed=99, std=0.01)
    build_release(tmp / "release", base=smollm2_gguf(), modifiers=loras, recovery=recovery,
                  router=small_router(tmp / "router", embedder), escalation=small_escalation(tmp / "escalation"),
                  calibrator=LOW_CALIBRATOR, lineage=[{"step": "test"}], release_id="test-release")
    return tmp / "release"


def phase_bundles(parts: Path, out: Path, calibrator: dict, config=None) -> dict[str, str]:
    """What Phase 5 reads from Phases 3 and 4, naming the small release parts in ``parts`` (as
    :func:`build_small_release` leaves them) with ``calibrator``: ``routing`` and ``modifiers`` (the bundles'
    JSON), and with a pipeline ``config``, ``items``: the reference's score (1.0) per held-out item of its modifiers."""
    import json

    from cogumi_tasks.models.packaged import smollm2_gguf

    out.mkdir(parents=True, exist_ok=True)
    (out / "calibrator.json").write_text(json.dumps(calibrator))
    routing = {"router": str(parts / "router"), "escalation": str(parts / "escalation"),
               "calibrator": str(out / "calibrator.json"), "threshold": 0.8, "models": ["base", *MODIFIERS],
               "costs": {"base": 1.0, **dict.fromkeys(MODIFIERS, 1.2)}}
    mods = {"base_gguf": str(smollm2_gguf()), "recovery_lora": str(parts / "recovery.gguf"),
            "modifiers": [{"name": n, "domain": n, "lora_gguf": str(parts / f"{n}.gguf"), "scale": 1.0}
                          for n in MODIFIERS]}
    (out / "routing.json").write_text(json.dumps(routing))
    (out / "modifiers.json").write_text(json.dumps(mods))
    paths = {"routing": str(out / "routing.json"), "modifiers": str(out / "modifiers.json")}
    if config is not None:
        from cogumi_tasks.modifiers.lora_steps import heldout

        class Ctx:  # heldout() only needs fetch for builtin/world suites
            fetch = staticmethod(lambda uri: uri)

        ids = [it.id for m in config.modifiers for it in heldout(Ctx, m.heldout)]
        (out / "items.jsonl").write_text("".join(json.dumps({"id": i, "model": "base", "reference_score": 1.0})
                                                 + "\n" for i in ids))
        paths["items"] = str(out / "items.jsonl")
    return paths
