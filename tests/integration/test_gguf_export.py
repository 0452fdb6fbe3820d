"""llama.cpp's converter on real models: the packaged SmolLM2 round-trips through HF -> GGUF with the same greedy
tokens, and a vocabulary-trimmed model converts once its pre-tokenizer is named, tokenizing exactly as HF does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi_tasks.compress.gguf import hf_greedy, quantize_gguf, token_agreement
from cogumi_tasks.models.convert import convert_hf_to_gguf

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [json.loads(x)["prompt"] for x in (REPO / "cogumi_tasks/resources/tiny_prompts.jsonl").read_text()
           .splitlines()[:6]]


def test_f16_gguf_agrees_with_hf_and_q5_k_m_is_smaller(hf_dir, tmp_path):
    f16 = convert_hf_to_gguf(hf_dir, tmp_path / "f16.gguf", "f16")
    q = quantize_gguf(f16, tmp_path / "q5.gguf", "Q5_K_M")
    reference = hf_greedy(hf_dir, PROMPTS, 16)
    f16_agree, q_agree = token_agreement(f16, reference), token_agreement(q, reference)
    assert f16_agree.positions == sum(len(c) for _, c in reference) > 0
    assert f16_agree.rate >= 0.98, f16_agree
    assert 0.5 < q_agree.rate <= 1.0
    assert q.stat().st_size < f16.stat().st_size / 2
    with pytest.raises(ValueError, match="unknown GGUF quant type"):
        quantize_gguf(f16, tmp_path / "x.gguf", "Q7_Z")
    print(f"gguf agreement: f16 {f16_agree.rate:.4f}, Q5_K_M {q_agree.rate:.4f}")


def test_trimmed_vocabulary_carries_its_pre_tokenizer_to_the_gguf(hf_dir, tmp_path):
    """Trimming renumbers the ids the converter hashes to recognise a pre-tokenizer: trim_model records the
    untrimmed tokenizer's name (the one a GGUF-made base carries, else the converter's by hash), a tokenizer saved
    again keeps it, and the conversion reads it. Without it the conversion fails and says what to set."""
    import json
    import os
    import shutil

    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from cogumi_tasks.models.convert import PRE_TOKENIZER_KEY, detect_pre_tokenizer
    from cogumi_tasks.models.nll import chat_texts
    from cogumi_tasks.train.vocab import trim_model

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = chat_texts(tok, [(p, "Here is a short answer with a list and a number: 42.") for p in PROMPTS * 3])
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())[PRE_TOKENIZER_KEY] == "smollm"  # the GGUF's
    assert detect_pre_tokenizer(hf_dir) == "smollm"  # the converter's own, by hash
    unrecorded = tmp_path / "unrecorded"  # the base without the record: trim_model asks the converter
    shutil.copytree(hf_dir, unrecorded, copy_function=os.link)
    cfg = json.loads((unrecorded / "tokenizer_config.json").read_text())
    del cfg[PRE_TOKENIZER_KEY]
    (unrecorded / "tokenizer_config.json").unlink()  # a hard link to the shared base: replace, do not write through
    (unrecorded / "tokenizer_config.json").write_text(json.dumps(cfg))
    trimmed = tmp_path / "trimmed"
    assert trim_model(unrecorded, trimmed, texts, 0.999).pre_tokenizer == "smollm"
    assert detect_pre_tokenizer(trimmed) is None  # the hash no longer matches
    resaved = tmp_path / "resaved"  # as SFT's merge and Phase 2's steps save it
    AutoTokenizer.from_pretrained(str(trimmed)).save_pretrained(str(resaved))
    assert json.loads((resaved / "tokenizer_config.json").read_text())[PRE_TOKENIZER_KEY] == "smollm"

    out = convert_hf_to_gguf(trimmed, tmp_path / "trimmed.gguf", "f16")
    cfg_path = trimmed / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg[PRE_TOKENIZER_KEY]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="compress.gguf.pre_tokenizer"):
        convert_hf_to_gguf(trimmed, tmp_path / "bad.gguf", "f16")
    new_tok = AutoTokenizer.from_pretrained(str(trimmed))
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        for text in texts[:6] + ["Unseen words: quixotic zephyr 3.14159!"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == new_tok.encode(
                text, add_special_tokens=False)
    finally:
        llm.close()
