#!/bin/sh
# Build llama.cpp's own `llama-bench` (or another of its tools) from the llama.cpp sources
# vendored in the source distribution of the llama-cpp-python version installed in a venv,
# with the options that llama-cpp-python's CMakeLists.txt uses on Linux/macOS (Release,
# shared libraries, curl off) plus the CPU options scripts/setup.sh builds
# llama-cpp-python with (scripts/llama-cmake-args.sh). Same code, same flags: the
# comparisons in generation.py and prompt_cache.py measure the Python side only.
#
#   sh benchmarks/build_llama_bench.sh [VENV] [TARGET]   (default: .venv llama-bench)
#
# TARGET is any tool of llama.cpp's CMake build: prompt_cache.py asks for llama-completion.
# Everything lands in ${LLMCTL_BENCH_CACHE:-$HOME/.cache/llmctl-bench}, outside the
# repository; a second run reuses the build. The binary's path is the last line printed.
set -eu
cd "$(dirname "$0")/.."
venv=${1:-.venv}
target=${2:-llama-bench}
cache=${LLMCTL_BENCH_CACHE:-$HOME/.cache/llmctl-bench}
version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
src="$cache/llama_cpp_python-$version"
build="$src/build-bench"
binary="$build/bin/$target"
if [ ! -x "$binary" ]; then
    mkdir -p "$cache"
    if [ ! -d "$src" ]; then
        "$venv/bin/python" -m pip download --quiet --no-binary :all: --no-deps \
            "llama-cpp-python==$version" -d "$cache" >&2
        tar -xzf "$cache/llama_cpp_python-$version.tar.gz" -C "$cache"
    fi
    cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        ${CMAKE_ARGS:-$(sh scripts/llama-cmake-args.sh)} >&2
    cmake --build "$build" --target "$target" -j "$(nproc 2>/dev/null || sysctl -n hw.ncpu)" >&2
fi
echo "$binary"
