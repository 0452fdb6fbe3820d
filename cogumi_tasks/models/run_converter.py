"""Run a llama.cpp converter script, optionally naming the BPE pre-tokenizer; or print the name it gives one.

    python -m cogumi_tasks.models.run_converter <dir>/convert_hf_to_gguf.py [--pre-tokenizer smollm] -- <args>
    python -m cogumi_tasks.models.run_converter <dir>/convert_hf_to_gguf.py --print-pre-tokenizer <model dir>

The converter recognises a tokenizer by hashing the ids of a probe string; a trimmed vocabulary changes
them, so ``--pre-tokenizer`` supplies the type that the untrimmed tokenizer had (llama.cpp then tokenizes
exactly as the HF tokenizer does). ``--print-pre-tokenizer`` prints that type for an untrimmed tokenizer, or
exits with status 3 when the converter does not recognise it.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="run_converter")
    p.add_argument("script")
    p.add_argument("--pre-tokenizer")
    p.add_argument("--print-pre-tokenizer", metavar="MODEL_DIR")
    args = p.parse_args(argv[:split])
    script = Path(args.script)
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
    if args.print_pre_tokenizer:
        from conversion.base import TextModel
        from transformers import AutoTokenizer

        try:  # the method reads only the tokenizer
            print(TextModel.get_vocab_base_pre(None, AutoTokenizer.from_pretrained(args.print_pre_tokenizer)))
        except NotImplementedError:
            sys.exit(3)
        return
    if args.pre_tokenizer:
        from conversion.base import TextModel

        TextModel.get_vocab_base_pre = lambda self, tokenizer: args.pre_tokenizer
    sys.argv = [str(script), *argv[split + 1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
