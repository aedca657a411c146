#!/bin/sh
# The CMake options llama-cpp-python's build of llama.cpp gets (CMAKE_ARGS), in one place
# for scripts/setup.sh and benchmarks/build_llama_bench.sh.
#
# On x86-64 Linux: ggml's portable AVX2 set (AVX, AVX2, FMA, F16C, BMI2) instead of
# -march=native. A native build on a CPU with AMX uses AMX tiles in its matrix products,
# and in virtual machines that advertise AMX without enabling its state (measured here:
# a Firecracker guest on a Xeon) the first `llama_decode` dies of SIGSEGV at `ldtilecfg`.
# A native build is also tied to the CPU it was built on, while pip's wheel cache is not.
# AVX-512 (with VNNI, VBMI, BF16) was measured here against this set on SmolLM2 Q4_1, 2
# threads: prompt +5%, generation -6%; not worth a build that needs it.
# Elsewhere (macOS, arm64): ggml's defaults (Metal on Apple Silicon).
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64)
        echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
    *) echo "" ;;
esac
