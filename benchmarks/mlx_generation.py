"""Generation speed of llmctl's MLX engine against mlx-lm's own `stream_generate`, on the
same model, prompt and weights, in one process.

  pp  prompt processing, tokens/s: a prompt of about --pp tokens, up to its first token
  tg  generation, tokens/s over --tg tokens after the first (end-of-turn ignored)

Both tools drive the same loaded model: the engine's (`llmctl.engines.mlx.load`, which on a
CPU upcasts half-precision parameters to float32) and mlx-lm's `stream_generate` given that
engine's model and tokenizer. So the ratio measures what llmctl's loop costs around mlx-lm's
generator, not a difference in weights. Each repetition runs both in a shuffled order; the
table gives the best and the median run and their ratios to mlx-lm's.

--plain adds a row for mlx-lm as its own `load` leaves the model (half precision), run with
a short prompt and few tokens: on a CPU it is the row that shows what the upcast buys.

On Linux these are CPU figures (mlx[cpu]): they say nothing of MLX's speed on Apple Silicon.

    .venv/bin/python benchmarks/mlx_generation.py [--reps 5] [--pp 128] [--tg 64] [--model DIR]

Without --model, SmolLM2 is converted to MLX 4-bit once (`llmctl convert smollm2 --to mlx
-q`) into a store kept under the system's temporary folder for later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repetitions import STORY, llmctl_pp, llmctl_tg, prompt_tokens, ratio_rows, run_shuffled

BIN = Path(sys.executable).parent
CACHE_HOME = Path(tempfile.gettempdir()) / "llmctl-bench-mlx"
MODEL = "smollm2:135m-mlx-q4"


def default_model() -> Path:
    """SmolLM2 as MLX 4-bit, converted once with the installed llmctl."""
    env = {**os.environ, "LLMCTL_HOME": str(CACHE_HOME)}
    show = subprocess.run([str(BIN / "llmctl"), "show", MODEL, "--json"], env=env,
                          capture_output=True, text=True)
    if show.returncode != 0:
        print(f"converting SmolLM2 to MLX 4-bit into {CACHE_HOME} (once)", file=sys.stderr)
        subprocess.run([str(BIN / "llmctl"), "convert", "smollm2", "--to", "mlx", "-q"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        show = subprocess.run([str(BIN / "llmctl"), "show", MODEL, "--json"], env=env,
                              capture_output=True, text=True, check=True)
    return Path(json.loads(show.stdout)["path"])


def mlx_lm_run(model, tokenizer, tokens: list[int], count: int) -> tuple[float, float]:
    """mlx-lm's stream_generate, greedy, end-of-turn ignored (as llama-bench's tg does);
    timed the way llmctl's Stats are: pp up to the first token, tg from the first token to
    the last over count - 1 steps."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    eos = tokenizer.eos_token_ids
    tokenizer.eos_token_ids = set()
    try:
        started = time.perf_counter()
        stamps = [time.perf_counter() for _ in stream_generate(
            model, tokenizer, tokens, max_tokens=count, sampler=make_sampler(temp=0.0))]
    finally:
        tokenizer.eos_token_ids = eos
    pp = len(tokens) / (stamps[0] - started)
    tg = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return pp, tg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an MLX model folder [default: SmolLM2 "
                        "4-bit, converted once]")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pp", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tg", type=int, default=64, help="generated tokens")
    parser.add_argument("--plain", action="store_true",
                        help="add mlx-lm on the model as mlx_lm.load leaves it")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from llmctl.engines.mlx import load
    from llmctl.engines.text import LoadOptions, Message

    folder = args.model or default_model()
    engine = load(folder, LoadOptions())
    prompt = prompt_tokens(engine, args.pp)
    story = engine.prompt_tokens([Message("user", STORY)])
    tools = {
        "llmctl (engine.generate)": lambda: {"pp": llmctl_pp(engine, prompt),
                                             "tg": llmctl_tg(engine, story, args.tg)},
        "mlx-lm stream_generate": lambda: dict(zip(("pp", "tg"), (
            mlx_lm_run(engine.model, engine.tokenizer, prompt, 1)[0],
            mlx_lm_run(engine.model, engine.tokenizer, story, args.tg)[1]), strict=True)),
    }
    samples = run_shuffled(tools, args.reps)

    plain = None
    if args.plain:
        from mlx_lm import load as mlx_lm_load

        model, tokenizer = mlx_lm_load(str(folder))
        short = prompt[:16]
        pp, _ = mlx_lm_run(model, tokenizer, short, 1)
        _, tg = mlx_lm_run(model, tokenizer, story, 4)
        plain = {"tool": "mlx-lm, model as mlx_lm.load leaves it", "pp": round(pp, 2),
                 "tg": round(tg, 2), "pp_tokens": len(short), "tg_tokens": 4}

    baseline = "mlx-lm stream_generate"
    rows = ratio_rows(samples, baseline, 2)
    import mlx.core as mx

    device = str(mx.default_device())
    if args.json:
        print(json.dumps({"model": str(folder), "device": device, "reps": args.reps,
                          "pp_tokens": len(prompt), "tg_tokens": args.tg, "rows": rows,
                          "plain": plain}, indent=2))
        return
    print(f"model {folder}, {device}, {args.reps} repetitions, pp{len(prompt)} tg{args.tg}\n")
    print("| tool | pp t/s best (median) | × mlx-lm best (median) "
          "| tg t/s best (median) | × mlx-lm best (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['pp']} ({r['pp_median']}) | {r['pp_ratio']:.3f} "
              f"({r['pp_median_ratio']:.3f}) | {r['tg']} ({r['tg_median']}) "
              f"| {r['tg_ratio']:.3f} ({r['tg_median_ratio']:.3f}) |")
    if plain:
        print(f"| {plain['tool']} (pp{plain['pp_tokens']}, tg{plain['tg_tokens']}) "
              f"| {plain['pp']} | | {plain['tg']} | |")


if __name__ == "__main__":
    main()
