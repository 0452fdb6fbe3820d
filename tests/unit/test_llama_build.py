"""The llama.cpp build: this CPU's instruction sets, never AMX (tools/llama_cmake_args.sh; a native build on a VM
that reports AMX it cannot run died with a general protection fault on the first matrix product)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "llama_cmake_args.sh"
MACROS = {"SSE42": ["SSE4_2"], "AVX": ["AVX"], "AVX2": ["AVX2"], "FMA": ["FMA"], "F16C": ["F16C"], "BMI2": ["BMI2"],
          "AVX_VNNI": ["AVXVNNI"], "AVX512": ["AVX512F", "AVX512CD", "AVX512VL", "AVX512DQ", "AVX512BW"],
          "AVX512_VBMI": ["AVX512VBMI"], "AVX512_VNNI": ["AVX512VNNI"], "AVX512_BF16": ["AVX512BF16"]}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (the build needs one)")
def test_the_build_arguments_name_this_cpus_instruction_sets_and_no_amx():
    args = dict(re.findall(r"-D(GGML_\w+)=(ON|OFF)", subprocess.run(
        ["sh", str(SCRIPT)], capture_output=True, text=True, check=True).stdout))
    assert args["GGML_NATIVE"] == "OFF"
    assert {args[f"GGML_AMX_{k}"] for k in ("TILE", "INT8", "BF16")} == {"OFF"}
    native = subprocess.run(["cc", "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                            check=True).stdout
    for flag, macros in MACROS.items():
        expected = all(f"#define __{m}__ 1" in native for m in macros)
        assert args[f"GGML_{flag}"] == ("ON" if expected else "OFF"), flag


def test_the_installed_llama_cpp_has_no_amx_instruction():
    import llama_cpp

    libs = sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml-cpu*.so*"))
    if not libs or shutil.which("objdump") is None:
        pytest.skip("no libggml-cpu in the llama_cpp package, or no objdump")
    for lib in libs:
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                              check=True).stdout
        assert "ldtilecfg" not in code and "tdpbssd" not in code, f"{lib} holds AMX instructions"
