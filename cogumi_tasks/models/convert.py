"""Model format conversion: a GGUF to an fp32 transformers directory, and an HF directory (or a peft LoRA) to
GGUF with llama.cpp's converter.

The converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/``, ``gguf-py/``) is not in
the llama-cpp-python wheel: ``make install`` extracts it from the sdist into ``<venv>/share/llama-convert``
(``COGUMI_LLAMA_CONVERT`` overrides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class ConverterMissing(RuntimeError):
    """llama.cpp's converter scripts are not where setup puts them."""


def converter_dir() -> Path:
    path = Path(os.environ.get("COGUMI_LLAMA_CONVERT") or Path(sys.prefix) / "share" / "llama-convert")
    if not (path / "convert_hf_to_gguf.py").exists() or not (path / "conversion").is_dir():
        raise ConverterMissing(f"llama.cpp's converter is not in {path}: run `make install` (it extracts "
                               "convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist), "
                               "or point COGUMI_LLAMA_CONVERT at a llama.cpp checkout")
    return path


# The key in a model directory's tokenizer_config.json that names llama.cpp's BPE pre-tokenizer for a tokenizer
# whose hash the converter no longer knows (a trimmed vocabulary). transformers keeps unknown keys there when it
# loads and saves a tokenizer again, so the name follows the model through every later step.
PRE_TOKENIZER_KEY = "llama_cpp_pre_tokenizer"


def detect_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's name for the BPE pre-tokenizer of the tokenizer in ``model_dir`` (``smollm`` for SmolLM2,
    ``llama-bpe`` for Llama 3), or None when its converter does not recognise it."""
    proc = _converter_process("convert_hf_to_gguf.py", ["--print-pre-tokenizer", str(model_dir)], ok=(0, 3))
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None


def recorded_pre_tokenizer(model_dir: Path) -> str | None:
    """The pre-tokenizer name recorded under :data:`PRE_TOKENIZER_KEY` in ``model_dir``, if any."""
    path = Path(model_dir) / "tokenizer_config.json"
    return json.loads(path.read_text()).get(PRE_TOKENIZER_KEY) if path.exists() else None


def _converter_process(script: str, args: list[str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's converter scripts in a subprocess (:mod:`cogumi_tasks.models.run_converter`); an
    exit code outside ``ok`` raises with the tail of its output."""
    cmd = [sys.executable, "-m", "cogumi_tasks.models.run_converter", str(converter_dir() / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in ok:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        hint = ""
        if "pre-tokenizer was not recognized" in tail:
            hint = (f"\n(a trimmed vocabulary changes the tokenizer's hash, and tokenizer_config.json has no "
                    f"{PRE_TOKENIZER_KEY}: set compress.gguf.pre_tokenizer, e.g. smollm)")
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{tail}{hint}")
    return proc


def run_converter(script: str, args: list[str], pre_tokenizer: str | None = None) -> None:
    """Run one of llama.cpp's converter scripts with ``args``, naming ``pre_tokenizer`` for an unknown hash."""
    _converter_process(script, [*(["--pre-tokenizer", pre_tokenizer] if pre_tokenizer else []), "--", *args])


def convert_hf_to_gguf(model_dir: Path, out: Path, outtype: str = "f16", pre_tokenizer: str | None = None) -> Path:
    """An HF model directory -> one GGUF file of ``outtype`` (f32, f16, bf16, q8_0). ``pre_tokenizer`` defaults to
    the one recorded in the directory (:func:`recorded_pre_tokenizer`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", outtype],
                  pre_tokenizer or recorded_pre_tokenizer(model_dir))
    return out


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """A peft LoRA adapter -> a GGUF LoRA that llama.cpp applies at load time (``Llama(lora_path=...)``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run_converter("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out),
                                             "--outtype", "f16"])
    return out


def hf_dir_from_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF (e.g. the packaged SmolLM2 Q4_1) into an fp32 transformers directory.

    Dequantizes, saves model and tokenizer, sets ``architectures`` (the GGUF loader leaves it out, and llama.cpp's
    converter needs it) and records the GGUF's own pre-tokenizer name under :data:`PRE_TOKENIZER_KEY`. Returns
    ``out_dir``.
    """
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    with _parse_gguf_once():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    model.config.architectures = [type(model).__name__]
    _restore_byte_level(tokenizer, model.generation_config)
    if field is not None:  # saved into tokenizer_config.json with the rest, as any later save keeps it
        tokenizer.init_kwargs[PRE_TOKENIZER_KEY] = bytes(field.parts[field.data[0]]).decode()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Within this block each GGUF file is parsed once, and gguf-py's tensor name map built once per architecture.

    transformers' GGUF loader parses the whole file (every vocabulary string) for the config, for the weights and
    twice for the tokenizer, and rebuilds the name map for every module: converting the packaged 135M model took
    24-25 s that way and 8-10 s with this block, with byte-identical files (docs/phase1.md). Both are looked up on
    the ``gguf`` package when the loader runs, so they are swapped for memoizing ones here and put back after; a
    loader that imports them otherwise just parses as before."""
    import functools

    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | Path, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = saved[0](path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def _restore_byte_level(tokenizer: Any, generation_config: Any) -> None:
    """Undo two artefacts of transformers' GGUF tokenizer import, so the directory matches the original model:
    a byte-level BPE gets a SentencePiece-style decoder (ByteFallback, Replace "▁"), which makes llama.cpp's
    converter treat it as a Llama SPM vocabulary; and eos comes from the GGUF's token types (SmolLM2: ``<|im_start|>``)
    instead of the model's end of turn (``generation_config.eos_token_id``)."""
    from tokenizers import decoders

    backend = tokenizer.backend_tokenizer
    if type(backend.pre_tokenizer).__name__ == "ByteLevel" and type(backend.decoder).__name__ == "Sequence":
        backend.decoder = decoders.ByteLevel()
    eos = generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if isinstance(eos, int) and eos != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token is None and isinstance(generation_config.pad_token_id, int):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(generation_config.pad_token_id)
