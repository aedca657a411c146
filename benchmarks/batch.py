"""Batch throughput: `llmctl batch --parallel N` against a shell loop of `llmctl run`, and
llmctl's parallel loop against llama.cpp's own `llama-batched-bench`, in one script.

  loop vs batch  the same 40 prompts (tests/test_batch.py's), temperature 0, at most 64
                 tokens each: total generated tokens / wall time of the whole job, model
                 loads included (one per prompt for the loop, one for batch)
  batched-bench  N sequences, a 32-token prompt and 64 generated tokens each (-npp 32
                 -ntg 64 -npl N): (prompt + generated tokens) / total time, for
                 llama-batched-bench and for llmctl's engines.parallel.generate_many on the
                 same file, threads and per-sequence context, run in a fresh process each

Each repetition runs every tool once in a shuffled order (machine noise hits them alike);
the tables give the best run and the median.

    sh benchmarks/build_llama_bench.sh .venv llama-batched-bench   # once
    .venv/bin/python benchmarks/batch.py [--reps 3] [--threads 2] [--parallel 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generation import default_model
from repetitions import shuffled

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE.parent / "tests"))
from test_batch import PROMPTS  # noqa: E402  (the prompts the tests run)

MAX_TOKENS = 64
PP, TG = 32, 64
CTX = 1024  # per sequence, for both tools of the batched-bench comparison

# llmctl's side of the batched-bench comparison, in its own process like llama's.
PARALLEL = r"""
import json, sys, time
from pathlib import Path
from llmctl.engines.llama import LlamaEngine
from llmctl.engines.parallel import Request, generate_many
from llmctl.engines.text import GenerationOptions, LoadOptions
model, threads, n, pp, tg, ctx = sys.argv[1], *map(int, sys.argv[2:])
engine = LlamaEngine(Path(model), LoadOptions(context_length=ctx, threads=threads,
                                              sequences=n))
options = GenerationOptions(temperature=0, max_tokens=tg, ignore_eos=True)
prompt = [engine.lib.llama_vocab_bos(engine.vocab)] + [100 + i for i in range(pp - 1)]
requests = [Request(i, prompt, options) for i in range(n)]
started = time.perf_counter()
generated = sum(1 for _, event in generate_many(engine, requests, n)
                if type(event).__name__ == "Token")
seconds = time.perf_counter() - started
print(json.dumps({"speed": (pp * n + generated) / seconds, "generated": generated}))
"""


def batched_bench(binary: str, model: Path, threads: int, n: int) -> float:
    out = subprocess.run([binary, "-m", str(model), "-c", str(CTX * n), "-npp", str(PP),
                          "-ntg", str(TG), "-npl", str(n), "-t", str(threads),
                          "--output-format", "jsonl"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["speed"]


def llmctl_parallel(model: Path, threads: int, n: int) -> float:
    out = subprocess.run([sys.executable, "-c", PARALLEL, str(model), str(threads), str(n),
                          str(PP), str(TG), str(CTX)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["speed"]


def shell_loop(model: Path, threads: int) -> float:
    started, generated = time.perf_counter(), 0
    for prompt in PROMPTS:
        out = subprocess.run([str(BIN / "llmctl"), "run", str(model), prompt,
                              "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
                              "--threads", str(threads), "--json"],
                             capture_output=True, text=True, check=True,
                             stdin=subprocess.DEVNULL).stdout
        generated += json.loads(out.splitlines()[-1])["generated_tokens"]
    return generated / (time.perf_counter() - started)


def llmctl_batch(model: Path, threads: int, n: int, prompts: Path) -> float:
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "llmctl"), "batch", str(model), str(prompts),
                          "--parallel", str(n), "--temperature", "0", "--max-tokens",
                          str(MAX_TOKENS), "--threads", str(threads)],
                         capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL).stdout
    seconds = time.perf_counter() - started
    return sum(json.loads(line)["generated_tokens"] for line in out.splitlines()) / seconds


def table(title: str, samples: dict[str, list[float]], baseline: str) -> None:
    best = max(samples[baseline])
    middle = statistics.median(samples[baseline])
    print(f"\n{title}\n\n| tool | best t/s | × {baseline} | median t/s | × median |")
    print("|---|---:|---:|---:|---:|")
    for name, values in samples.items():
        print(f"| {name} | {max(values):.1f} | {max(values) / best:.2f} | "
              f"{statistics.median(values):.1f} | {statistics.median(values) / middle:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", default="1,2,4,8")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--binary", default=None, help="llama-batched-bench [default: built "
                        "by build_llama_bench.sh]")
    args = parser.parse_args()
    model = args.model or default_model()
    counts = [int(n) for n in args.parallel.split(",")]
    binary = args.binary or subprocess.run(
        ["sh", str(HERE / "build_llama_bench.sh"), str(BIN.parent), "llama-batched-bench"],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLMCTL_HOME"] = str(Path(tmp) / "home")
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                                   for i, p in enumerate(PROMPTS)))
        tools = {"shell loop of llmctl run": lambda: shell_loop(model, args.threads)}
        for n in counts:
            tools[f"llmctl batch -p {n}"] = (
                lambda n=n: llmctl_batch(model, args.threads, n, prompts))
        jobs = shuffled(tools, args.reps)
        table(f"40 prompts, at most {MAX_TOKENS} tokens each, {args.threads} threads: "
              "generated tokens/s of the whole job", jobs, "shell loop of llmctl run")
        pairs = {}
        for n in counts:
            pairs[f"llama-batched-bench -npl {n}"] = (
                lambda n=n: batched_bench(binary, model, args.threads, n))
            pairs[f"llmctl parallel {n}"] = (
                lambda n=n: llmctl_parallel(model, args.threads, n))
        speeds = shuffled(pairs, args.reps)
        for n in counts:
            table(f"{n} sequences, pp {PP} + tg {TG} each: (prompt + generated) tokens/s",
                  {name: speeds[name] for name in (f"llama-batched-bench -npl {n}",
                                                  f"llmctl parallel {n}")},
                  f"llama-batched-bench -npl {n}")


if __name__ == "__main__":
    main()
