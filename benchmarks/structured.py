"""What constrained output costs per generated token: llmctl's engines with a JSON schema
enforced (llguidance masks the logits before every token) against the same engine with no
constraint, and against llama.cpp's own grammar sampler (the schema converted to GBNF by
llama-cpp-python's json_schema_to_gbnf, run through its `Llama` API).

  constrained     `generate` with GenerationOptions(output=the schema): tokens/s over
                  the reply after its first token (the shared loop's figure)
  unconstrained   the same prompt, the same number of tokens (ignore_eos, max_tokens =
                  the constrained reply's length): tokens/s the same way
  llama.cpp GBNF  `create_completion(grammar=...)`, streamed at temperature 0, timed from
                  the first chunk to the last; and the same without the grammar (the
                  ratio is its own constraint cost)

Everything runs in this process, engine loaded once, in shuffled order per repetition,
at temperature 0; the table gives the median of the repetitions and the ratios.

    .venv/bin/python benchmarks/structured.py [--reps 7] [--threads 2] [--mlx]

--mlx adds the MLX engine (SmolLM2 converted to MLX 4-bit once, as mlx_generation.py
does; CPU figures on Linux).
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

from llmctl.engines.constraint import OutputFormat
from llmctl.engines.text import Done, GenerationOptions, LoadOptions, Message

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {"type": "array", "minItems": 3, "maxItems": 5, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 30},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                           "city": {"type": "string", "maxLength": 30}},
            "required": ["name", "age", "city"], "additionalProperties": False}},
    },
    "required": ["people"], "additionalProperties": False,
}
PROMPT = "Invent three to five people, each with a name, an age and a city."


def gguf() -> Path:
    sys.path.insert(0, str(HERE))
    from generation import default_model

    return default_model()


def mlx_folder() -> Path:
    home = Path(tempfile.gettempdir()) / "llmctl-bench-mlx"
    env = {**os.environ, "LLMCTL_HOME": str(home)}
    listed = subprocess.run([str(BIN / "llmctl"), "ls", "-q"], env=env, capture_output=True,
                            text=True).stdout.split()
    if "smollm2:135m-mlx-q4" not in listed:
        subprocess.run([str(BIN / "llmctl"), "convert", "smollm2", "--to", "mlx", "-q"],
                       env=env, check=True)
    shown = subprocess.run([str(BIN / "llmctl"), "show", "smollm2:135m-mlx-q4", "--json"],
                           env=env, capture_output=True, text=True, check=True).stdout
    return Path(json.loads(shown)["path"])


def reply(engine, options: GenerationOptions) -> tuple[float, int]:
    for event in engine.generate([Message("user", PROMPT)], options):
        if isinstance(event, Done):
            return event.stats.generate_tokens_per_second, event.stats.generated_tokens
    raise AssertionError("no Done event")


def llmctl_tools(engine) -> dict:
    output = OutputFormat(SCHEMA).check()
    constrained = GenerationOptions(temperature=0.0, seed=0, output=output)
    _, length = reply(engine, constrained)  # also warms llguidance's tokenizer up
    free = GenerationOptions(temperature=0.0, seed=0, ignore_eos=True, max_tokens=length)
    return {"constrained": lambda: reply(engine, constrained)[0],
            "unconstrained": lambda: reply(engine, free)[0]}


def gbnf_tools(model: Path, threads: int) -> dict:
    from llama_cpp import Llama, LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    grammar = LlamaGrammar.from_string(json_schema_to_gbnf(json.dumps(SCHEMA)),
                                       verbose=False)
    prompt = llm.tokenizer().decode(
        llm.tokenize(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
                     .encode(), special=True))

    def stream(with_grammar: bool, max_tokens: int) -> float:
        stamps = []
        for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True,
                                       grammar=grammar if with_grammar else None):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return {"llama.cpp GBNF": lambda: stream(True, 200),
            "llama.cpp, no grammar": lambda: stream(False, 120)}


def measure(tools: dict, reps: int) -> dict[str, float]:
    from repetitions import shuffled

    return {name: statistics.median(values)
            for name, values in shuffled(tools, reps).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mlx", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from llmctl.engines import llama

    rows = []
    engine = llama.load(gguf(), LoadOptions(2048, args.threads))
    tools = {**llmctl_tools(engine), **gbnf_tools(gguf(), args.threads)}
    medians = measure(tools, args.reps)
    rows.append(("llama.cpp (llmctl)", medians["constrained"], medians["unconstrained"],
                 medians["llama.cpp GBNF"], medians["llama.cpp, no grammar"]))
    engine.close()
    if args.mlx:
        from llmctl.engines import mlx

        engine = mlx.load(mlx_folder(), LoadOptions(2048))
        medians = measure(llmctl_tools(engine), max(3, args.reps // 2))
        rows.append(("MLX (llmctl)", medians["constrained"], medians["unconstrained"],
                     None, None))
    if args.json:
        print(json.dumps([dict(zip(("engine", "constrained", "unconstrained", "gbnf",
                                    "gbnf_free"), row, strict=True)) for row in rows],
                         indent=2))
        return
    print(f"SmolLM2-135M, temperature 0, {args.threads} threads, median of {args.reps}; "
          "generation tokens/s\n")
    print("| engine | --json-schema | no constraint | × | llama.cpp GBNF | its no-grammar "
          "| × | llmctl × GBNF |")
    print("|---|---|---|---|---|---|---|---|")
    for name, con, free, gbnf, gfree in rows:
        extra = (f"{gbnf:.1f} | {gfree:.1f} | {gbnf / gfree:.2f} | {con / gbnf:.2f}"
                 if gbnf else "| | |")
        print(f"| {name} | {con:.1f} | {free:.1f} | {con / free:.2f} | {extra} |")


if __name__ == "__main__":
    main()
