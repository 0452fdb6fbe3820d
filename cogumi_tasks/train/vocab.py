"""Vocabulary trimming for byte-level BPE Llama models (SmolLM2-135M: 49,152 tokens, tied embeddings, ChatML).

Trimming that stays correct (see stack-facts "Compression"):

* count token occurrences over the *target chat distribution* (chat-templated prompt + response pairs);
* keep the smallest top-frequency set reaching ``coverage``, plus every special/added token, the byte alphabet
  and the chat-template scaffolding tokens, closed under merge ancestry (a kept merged token keeps both parents,
  recursively);
* rebuild ``tokenizer.json`` with the kept vocabulary renumbered in the old order and only the merges whose parts
  and result are kept, slice ``embed_tokens`` (and ``lm_head`` when untied; re-tie when tied);
* refuse the result unless every text round-trips exactly (:func:`check_round_trip`);
* record in ``tokenizer_config.json`` the name llama.cpp's converter gave the untrimmed tokenizer's pre-tokenizer:
  it recognises a tokenizer by the ids of a probe string, which trimming renumbers
  (under :data:`~cogumi_tasks.models.convert.PRE_TOKENIZER_KEY`; GGUF export reads it).

With the closure, any text whose original tokens are all kept tokenizes to exactly the same token sequence
(renumbered): every intermediate of its merge sequence is an ancestor of a kept token, so every merge that fired
before is still present, and removed merges only produce tokens that never appeared. Texts with dropped tokens
fall back to their kept sub-pieces (down to bytes) and get longer; nothing becomes unencodable.

Perplexity across vocabularies: token-level perplexity is not comparable when the tokenization changes (a
trimmed model predicts more, easier tokens). :func:`~cogumi_tasks.models.nll.nll_stats` therefore also reports
bits per UTF-8 byte over the same texts; :func:`ppl_increase_pct` compares ``2 ** bits_per_byte`` (per-byte
perplexity), and that is the figure the ``max_ppl_increase_pct`` gate uses.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogumi_tasks.core.verdict import Verdict, judge
from cogumi_tasks.models.convert import PRE_TOKENIZER_KEY, detect_pre_tokenizer, recorded_pre_tokenizer
from cogumi_tasks.models.nll import NLLStats, chat_texts

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
CANNED_RESPONSE = "Sure. Here is a short, clear answer to your question, with an example where it helps."


class TokenizerBroken(Exception):
    """A (trimmed) tokenizer that cannot be used: it fails to load or some text does not round-trip."""

    def __init__(self, file: Path | str, text: str | None, detail: str):
        self.file, self.text, self.detail = str(file), text, detail
        shown = "" if text is None else f"; first failing text: {text[:120]!r}"
        super().__init__(f"tokenizer {self.file} refused: {detail}{shown}")


@dataclass
class TrimResult:
    """What :func:`trim_model` did. ``old_to_new[old_id]`` is the new id, or -1 when the token was dropped."""

    vocab_before: int
    vocab_after: int
    coverage: float  # share of counted token occurrences covered by the kept set
    texts_longer: int  # texts that now encode to more tokens
    texts_total: int
    param_bytes_saved: int
    old_to_new: list[int] = field(repr=False)
    pre_tokenizer: str | None = None  # llama.cpp's name, recorded in tokenizer_config.json; None: not recognised

    @property
    def kept_old_ids(self) -> list[int]:
        """The kept old ids in new-id order."""
        return [old for old, new in enumerate(self.old_to_new) if new >= 0]


# ---------------------------------------------------------------- counting and choosing
def load_prompt_texts(path: Path | str, tokenizer: Any, response: str = CANNED_RESPONSE) -> list[str]:
    """Chat-formatted texts from a prompts JSONL (``{"prompt": ..., "response"?: ...}`` per line)."""
    from cogumi_tasks.core.records import iter_jsonl_dicts

    return chat_texts(tokenizer, [(r["prompt"], r.get("response") or response) for r in iter_jsonl_dicts(Path(path))])


def count_tokens(tokenizer: Any, texts: Iterable[str]) -> Counter:
    """Token-id occurrence counts over already chat-formatted texts (special tokens in the text are matched)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokenizer.encode(text, add_special_tokens=False))
    return counts


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None) or tokenizer
    return json.loads(backend.to_str())


def _template_ids(tokenizer: Any) -> set[int]:
    """Token ids of the chat-template scaffolding (role headers, system prompt, separators)."""
    ids: set[int] = set()
    convs = [[{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
             [{"role": "system", "content": ""}, {"role": "user", "content": ""}]]
    for conv in convs:
        for gen in (False, True):
            try:
                text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            except Exception:  # noqa: BLE001 - templates may reject some role orders
                continue
            ids.update(tokenizer.encode(text, add_special_tokens=False))
    return ids


def choose_tokens(counts: Counter, tokenizer: Any, coverage: float) -> set[int]:
    """Smallest top-frequency set reaching ``coverage`` of occurrences, plus specials, bytes and template tokens.

    Closed under merge ancestry: each kept merged token keeps the parents of every merge producing it.
    """
    from tokenizers import pre_tokenizers

    data = _tokenizer_json(tokenizer)
    vocab: dict[str, int] = data["model"]["vocab"]
    total = sum(counts.values())
    kept: set[int] = set()
    running = 0
    for tid, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if total and running / total >= coverage:
            break
        kept.add(tid)
        running += n
    kept.update(t["id"] for t in data.get("added_tokens", []))
    kept.update(vocab[ch] for ch in pre_tokenizers.ByteLevel.alphabet() if ch in vocab)  # 235 of 256 in SmolLM2
    kept.update(_template_ids(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            kept.add(tid)
    id_to_tok = {i: t for t, i in vocab.items()}
    parents: dict[str, list[tuple[str, str]]] = {}
    for merge in data["model"]["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        parents.setdefault(a + b, []).append((a, b))
    stack = [id_to_tok[i] for i in kept if i in id_to_tok]
    while stack:
        for a, b in parents.get(stack.pop(), ()):
            for part in (a, b):
                pid = vocab[part]
                if pid not in kept:
                    kept.add(pid)
                    stack.append(part)
    return kept


# ---------------------------------------------------------------- rebuilding
def trimmed_tokenizer_json(data: dict, kept: set[int]) -> tuple[dict, list[int]]:
    """Tokenizer JSON restricted to ``kept`` (renumbered in old order) and the old->new id map (-1: dropped)."""
    vocab: dict[str, int] = data["model"]["vocab"]
    size = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    old_to_new = [-1] * size
    for new, old in enumerate(sorted(kept)):
        old_to_new[old] = new
    out = json.loads(json.dumps(data))
    out["model"]["vocab"] = {tok: old_to_new[i] for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
                             if old_to_new[i] >= 0}
    new_vocab = out["model"]["vocab"]
    merges = []
    for merge in data["model"]["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a in new_vocab and b in new_vocab and a + b in new_vocab:
            merges.append(merge)
    out["model"]["merges"] = merges
    for tok in out.get("added_tokens", []):
        tok["id"] = old_to_new[tok["id"]]
    _remap_post_processor(out.get("post_processor"), old_to_new)
    return out, old_to_new


def _remap_post_processor(node: Any, old_to_new: list[int]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [old_to_new[i] for i in value]
            elif key == "id" and isinstance(value, int):  # RobertaProcessing-style ("<s>", id) pairs are lists
                node[key] = old_to_new[value]
            else:
                _remap_post_processor(value, old_to_new)
    elif isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int):
            node[1] = old_to_new[node[1]]
        else:
            for item in node:
                _remap_post_processor(item, old_to_new)


def _remap_ids(cfg: dict, old_to_new: list[int]) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
        value = cfg.get(key)
        if isinstance(value, int) and 0 <= value < len(old_to_new):
            cfg[key] = old_to_new[value]
        elif isinstance(value, list):
            cfg[key] = [old_to_new[v] for v in value if 0 <= v < len(old_to_new) and old_to_new[v] >= 0]


def trim_model(model_dir: Path, out_dir: Path, texts: list[str], coverage: float) -> TrimResult:
    """Trim the vocabulary of the model in ``model_dir`` to ``coverage`` of ``texts`` (chat-formatted); save to
    ``out_dir``. Raises :class:`TokenizerBroken` (and writes nothing usable) if ``texts`` do not round-trip."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    counts = count_tokens(tokenizer, texts)
    kept = choose_tokens(counts, tokenizer, coverage)
    data, old_to_new = trimmed_tokenizer_json(_tokenizer_json(tokenizer), kept)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    cfg_path = out_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    _remap_ids(tcfg, old_to_new)
    pre_tokenizer = recorded_pre_tokenizer(model_dir) or detect_pre_tokenizer(model_dir)
    if pre_tokenizer:
        tcfg[PRE_TOKENIZER_KEY] = pre_tokenizer
    if tcfg:
        cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
    check_round_trip(out_dir, texts)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    index = torch.tensor(sorted(kept), dtype=torch.long)
    old_emb = model.get_input_embeddings()
    vocab_before, hidden = old_emb.weight.shape
    if len(old_to_new) < vocab_before:  # embedding rows past the tokenizer (padding) are dropped too
        old_to_new += [-1] * (vocab_before - len(old_to_new))
    new_emb = torch.nn.Embedding(len(index), hidden, dtype=old_emb.weight.dtype)
    new_emb.weight.data = old_emb.weight.data[index].clone()
    model.set_input_embeddings(new_emb)
    old_head = model.get_output_embeddings()
    heads = 1
    if old_head is not None:
        new_head = torch.nn.Linear(hidden, len(index), bias=old_head.bias is not None, dtype=old_head.weight.dtype)
        if tied:
            new_head.weight = new_emb.weight
        else:
            heads = 2
            new_head.weight.data = old_head.weight.data[index].clone()
        if old_head.bias is not None:
            new_head.bias.data = old_head.bias.data[index].clone()
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(index)
    _remap_ids(model.config.__dict__, old_to_new)
    if getattr(model, "generation_config", None) is not None:
        _remap_ids(model.generation_config.__dict__, old_to_new)
    if tied:
        model.tie_weights()
    model.save_pretrained(str(out_dir))

    new_tok = AutoTokenizer.from_pretrained(str(out_dir))
    longer = sum(len(new_tok.encode(t, add_special_tokens=False)) > len(tokenizer.encode(t, add_special_tokens=False))
                 for t in texts)
    total = sum(counts.values())
    covered = sum(n for tid, n in counts.items() if tid in kept)
    return TrimResult(vocab_before=vocab_before, vocab_after=len(index), coverage=covered / total if total else 1.0,
                      texts_longer=longer, texts_total=len(texts),
                      param_bytes_saved=(vocab_before - len(index)) * hidden * old_emb.weight.element_size() * heads,
                      old_to_new=old_to_new, pre_tokenizer=pre_tokenizer)


# ---------------------------------------------------------------- checks
def check_round_trip(tokenizer_dir: Path, texts: list[str]) -> None:
    """Refuse (raise :class:`TokenizerBroken`) unless the tokenizer loads, its ids fit the model's
    ``vocab_size`` (when a config.json is there) and ``decode(encode(t)) == t`` for every text."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    file = tokenizer_dir / "tokenizer.json"
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # noqa: BLE001 - any load failure means the tokenizer is unusable
        raise TokenizerBroken(file, None, f"does not load: {type(exc).__name__}: {exc}") from exc
    data = _tokenizer_json(tok)
    ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))]
    if sorted(set(ids)) != list(range(len(set(ids)))):
        raise TokenizerBroken(file, None, "token ids are not contiguous from 0")
    cfg = tokenizer_dir / "config.json"
    if cfg.exists():
        vocab_size = json.loads(cfg.read_text()).get("vocab_size")
        if isinstance(vocab_size, int) and max(ids) >= vocab_size:
            raise TokenizerBroken(file, None, f"token id {max(ids)} >= model vocab_size {vocab_size}")
    unk = tok.unk_token_id
    for text in texts:
        enc = tok.encode(text, add_special_tokens=False)
        back = tok.decode(enc, skip_special_tokens=False)
        if back != text:
            where = next((i for i, (a, b) in enumerate(zip(back, text, strict=False)) if a != b),
                         min(len(back), len(text)))
            detail = (f"decode(encode(text)) differs at char {where}: got {back[where:where + 40]!r}, "
                      f"expected {text[where:where + 40]!r}")
            if unk is not None and unk in enc and unk not in tok.encode(back, add_special_tokens=False):
                detail += " (unknown token produced: missing byte-alphabet tokens?)"
            raise TokenizerBroken(file, text, detail)


def ppl_increase_pct(before: NLLStats, after: NLLStats) -> float:
    """Increase of per-byte perplexity (``2 ** bits_per_byte``) in percent; the vocab-trim gate figure."""
    return (after.byte_ppl / before.byte_ppl - 1.0) * 100.0


def trim_gate(before: NLLStats, after: NLLStats, max_ppl_increase_pct: float) -> Verdict:
    """``VocabTrimConfig.max_ppl_increase_pct`` gate on the per-byte perplexity increase (``core.verdict.judge``:
    one figure on the held-out rows, compared directly)."""
    return judge(ppl_increase_pct(before, after), "<=", max_ppl_increase_pct)
