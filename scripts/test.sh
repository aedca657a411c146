#!/bin/sh
# Set up the test environment and run the whole test suite (what CI runs).
#   sh scripts/test.sh [pytest arguments]
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh llama,demo,dev,mlx,convert,diffusers,coreml,torch,onnx,executorch,whisper,ray
sh scripts/debian-packages.sh
# Two workers (one per core here), each test file on one worker so that a module's
# conversion fixture runs once: 38 min instead of 66 on the 2-core machine.
exec .venv/bin/python -m pytest -n "${LLMCTL_TEST_WORKERS:-auto}" --dist loadfile "$@"
