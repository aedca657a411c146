#!/bin/sh
# Set up the test environment and run the whole test suite (what CI runs).
#   sh scripts/test.sh [pytest arguments]
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh llama,demo,dev,mlx,convert,diffusers,coreml,torch,onnx,whisper,ray
sh scripts/debian-packages.sh
exec .venv/bin/python -m pytest "$@"
