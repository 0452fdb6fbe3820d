"""Negative log-likelihood of chat-formatted texts under a causal LM: token perplexity and bits per UTF-8 byte.

Token-level perplexity is not comparable across tokenizations (a trimmed vocabulary predicts more, easier tokens);
bits per byte over the same texts is, so gates compare per-byte perplexity (``2 ** bits_per_byte``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class NLLStats:
    """Negative log-likelihood over a text set: token perplexity and bits per UTF-8 byte."""

    token_ppl: float
    bits_per_byte: float
    tokens: int
    bytes: int

    @property
    def byte_ppl(self) -> float:
        """Per-byte perplexity, comparable across vocabularies."""
        return 2.0 ** self.bits_per_byte


def chat_texts(tokenizer: Any, pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Format (prompt, response) pairs through the tokenizer's chat template: the target chat distribution."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                          tokenize=False) for p, r in pairs]


def nll_stats(model_dir: Path | Any, texts: list[str], max_len: int = 256, tokenizer: Any = None) -> NLLStats:
    """Summed NLL of each text (tokens after a leading BOS, truncated to ``max_len``) -> token ppl and bits/byte.

    ``model_dir`` is a directory or an already loaded model (then pass its ``tokenizer``). The byte count is that
    of the decoded, scored span, so truncation does not bias bits per byte.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_dir, (str, Path)):
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    else:
        tok, model = tokenizer, model_dir.eval()
    bos = model.config.bos_token_id
    bos = bos[0] if isinstance(bos, list) else bos
    nll, n_tokens, n_bytes = 0.0, 0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)[:max_len]
            if not ids:
                continue
            inp = torch.tensor([[bos, *ids]])
            logits = model(inp).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, inp[0, 1:], reduction="sum").item()
            n_tokens += len(ids)
            n_bytes += len(tok.decode(ids, skip_special_tokens=False).encode("utf-8"))
    return NLLStats(token_ppl=math.exp(nll / max(n_tokens, 1)), bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
                    tokens=n_tokens, bytes=n_bytes)
