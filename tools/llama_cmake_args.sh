#!/bin/sh
# CMake arguments for building llama-cpp-python on this machine (the Makefile's `install`): the instruction sets
# the compiler enables for this CPU (what -march=native would), named one by one with GGML_NATIVE=OFF, and never
# AMX. Some virtual machines report AMX in cpuid without supporting it: llama.cpp's AMX kernels then die with a
# general protection fault on their first `ldtilecfg` (seen on an Intel Xeon VM with 2 cores), and a native build
# turns them on wherever cpuid says AMX. Prints one line, e.g. "-DGGML_NATIVE=OFF -DGGML_AVX2=ON ...".
set -eu
macros=$(${CC:-cc} -march=native -dM -E - </dev/null)
on() {  # ON when every named compiler macro (__NAME__) is defined for this CPU
    for m in "$@"; do
        printf '%s\n' "$macros" | grep -q "^#define __${m}__ 1" || { echo OFF; return; }
    done
    echo ON
}
printf '%s' "-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
printf ' -DGGML_SSE42=%s -DGGML_AVX=%s -DGGML_AVX2=%s -DGGML_FMA=%s -DGGML_F16C=%s -DGGML_BMI2=%s' \
    "$(on SSE4_2)" "$(on AVX)" "$(on AVX2)" "$(on FMA)" "$(on F16C)" "$(on BMI2)"
printf ' -DGGML_AVX_VNNI=%s -DGGML_AVX512=%s -DGGML_AVX512_VBMI=%s -DGGML_AVX512_VNNI=%s -DGGML_AVX512_BF16=%s\n' \
    "$(on AVXVNNI)" "$(on AVX512F AVX512CD AVX512VL AVX512DQ AVX512BW)" "$(on AVX512VBMI)" "$(on AVX512VNNI)" \
    "$(on AVX512BF16)"
