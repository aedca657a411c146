#!/bin/sh
# Create (or update) the project's virtual environment in .venv with the given extras.
# Used by quickstart.sh and test.sh; safe to run again: pip skips what is installed, and
# llama-cpp-python's compiled wheel (about 9 minutes to build) is reused from pip's cache.
set -eu
cd "$(dirname "$0")/.."
extras=${1:-llama,demo}
python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
    done
fi
[ -n "$python" ] || { echo "error: no python3 found; install Python 3.11 or newer" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "error: $python is $("$python" --version 2>&1); llmctl needs Python 3.11 or newer" >&2
    exit 1
}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $("$python" --version 2>&1)" >&2
    "$python" -m venv .venv
fi
echo "installing llmctl[$extras] into .venv (the first time compiles llama.cpp: ~10 minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip >&2
# constraints/test.txt pins torch to the CPU build (see the file); it only constrains
# packages something asks for, so it costs nothing when torch is not needed.
# llama.cpp's build options (a portable CPU build: see the script); CMAKE_ARGS, when set,
# is used as it is.
CMAKE_ARGS=${CMAKE_ARGS:-$(sh scripts/llama-cmake-args.sh)}
export CMAKE_ARGS
.venv/bin/python -m pip install --quiet --constraint constraints/test.txt -e ".[$extras]" >&2
