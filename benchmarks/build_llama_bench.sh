#!/bin/sh
# Build llama.cpp's own `llama-bench` from the llama.cpp sources vendored in the source
# distribution of the llama-cpp-python version installed in a venv, configured the way
# llama-cpp-python's own build configures them. Same code, same flags: the gap that
# benchmarks/generation.py measures between llama-bench and llmctl is then the cost of the
# Python side, not of a different compiler setup.
#
#   sh benchmarks/build_llama_bench.sh [VENV]        VENV defaults to the repository's .venv
#
# Everything (sdist, sources, build tree) lands in ${LLMCTL_BENCH_CACHE:-$HOME/.cache/llmctl-bench},
# outside the repository. A second run with the same version and flags reuses the build and
# returns at once. Progress goes to stderr; the last line on stdout is the binary's path.
#
# The flags, from llama-cpp-python's CMakeLists.txt and pyproject.toml (Linux, no Apple/wasm
# branches):
#   CMAKE_BUILD_TYPE=Release   scikit-build-core's default build type (pyproject sets none)
#   BUILD_SHARED_LIBS=ON       llama-cpp-python forces it; ggml is then a set of .so files
#   LLAMA_BUILD_COMMON=ON      forced by llama-cpp-python (llama-bench needs it anyway)
#   LLAMA_CURL=OFF             forced by llama-cpp-python
#   GGML_*                     none set: ggml's defaults, so GGML_NATIVE=ON (-march=native),
#                              GGML_OPENMP=ON, GGML_LLAMAFILE=ON, GGML_CUDA=OFF, as in the
#                              wheel pip built on this machine
# plus, since only the llama-bench target is built, tests/examples/server switched off to
# keep the configure step short (they change no compile flag), and GGML_CUDA=OFF spelled out.
# $CMAKE_ARGS is passed on as scikit-build-core passes it: if llama-cpp-python was installed
# with CMAKE_ARGS="...", build this with the same value. Note that ggml turns GGML_NATIVE off
# by default when $SOURCE_DATE_EPOCH is set (reproducible builds): keep that environment
# identical too. generation.py compares the SIMD features of both builds and warns on a
# mismatch.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$repo/.venv}
cache=${LLMCTL_BENCH_CACHE:-$HOME/.cache/llmctl-bench}

version=$("$venv/bin/python" -c \
    'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
src=$cache/llama_cpp_python-$version
build=$src/build-bench
binary=$build/bin/llama-bench

# ${CMAKE_ARGS} is left unquoted on purpose: it is a space-separated list of options, as
# scikit-build-core reads it. The fixed flags come last so that CUDA and curl stay off.
flags="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=ON \
-DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
all_flags="${CMAKE_ARGS:-} $flags"
stamp=$build/llmctl-bench-flags.txt

# Reuse: the binary exists and was built with exactly these flags.
if [ -x "$binary" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$all_flags" ]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$cache"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
    # Download into and unpack in a scratch directory, then move into place, so that an
    # interrupted run never leaves a half-unpacked tree that a later run would trust.
    tmp=$(mktemp -d "$cache/.download.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "downloading llama-cpp-python==$version (sdist) into $cache" >&2
    "$venv/bin/python" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$version" -d "$tmp" >&2
    tar -xzf "$tmp"/*.tar.gz -C "$tmp"
    rm -rf "$src"
    mv "$tmp"/llama*cpp*python-"$version" "$src"
    mv "$tmp"/*.tar.gz "$cache"/
fi

jobs=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
echo "configuring $src/vendor/llama.cpp in $build" >&2
# shellcheck disable=SC2086  # word splitting of the flag lists is intended
cmake -S "$src/vendor/llama.cpp" -B "$build" ${CMAKE_ARGS:-} $flags >&2
echo "building llama-bench with $jobs jobs (several minutes on 2 cores)" >&2
cmake --build "$build" --target llama-bench --config Release -j "$jobs" >&2
printf '%s' "$all_flags" >"$stamp"
echo "$binary"
