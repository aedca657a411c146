"""Start-up time of `llmctl --help` and `llmctl ls` against baselines run in the same script.

Baselines:
  - a bare typer app with the same nine command names that imports nothing else: what any
    typer CLI pays; llmctl should add nothing of its own (target: <= 1.1x);
  - `hf --help` from huggingface_hub (target: llmctl at least 4x faster);
  - `python -c "import typer, rich"` for scale.

Runs are interleaved (one of each, round after round) so that machine noise hits every
command alike; the table gives medians.

    .venv/bin/python benchmarks/startup.py [--runs 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ["pull", "ls", "rm", "show", "run", "chat", "imagine", "convert", "bench"]

# The same command names; each takes the options `llmctl ls` takes, so that running one
# costs typer what running `llmctl ls` costs it (typer 0.29 builds pydantic adapters for
# the parameters of the command it runs).
BARE_APP = """
import typer

app = typer.Typer()
for name in {commands!r}:
    def command(json: bool = typer.Option(False, "--json"),
                quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
        \"\"\"A command.\"\"\"
    app.command(name)(command)
app()
"""


def fill_store(home: Path, count: int) -> None:
    """`count` stored models sharing one small file: `ls` reads manifests only."""
    from llmctl.store import manifest
    from llmctl.store.blobs import BlobStore, sha256_file
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout(home)
    layout.ensure()
    source = home / "weights.gguf"
    source.write_bytes(os.urandom(4096))
    digest = sha256_file(source)
    BlobStore(layout).link(source, digest)
    for i in range(count):
        manifest.save(layout, manifest.Manifest(
            f"model{i:02d}", "latest", "text", "llama", "gguf",
            [manifest.ManifestFile("weights.gguf", digest, 4096)],
            metadata={"architecture": "llama"}))


def time_once(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", type=int, default=20, help="models in the store for ls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    llmctl = shutil.which("llmctl", path=str(bin_dir)) or "llmctl"
    hf = shutil.which("hf", path=str(bin_dir)) or shutil.which("hf")
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        fill_store(home, args.models)
        bare = Path(scratch) / "bare_typer.py"
        bare.write_text(BARE_APP.format(commands=COMMANDS))
        env = {**os.environ, "LLMCTL_HOME": str(home)}
        # Measure what a user sees after the first run: Python caches compiled modules
        # (.pyc). Some CI and sandbox shells set PYTHONDONTWRITEBYTECODE, which would make
        # every run recompile llmctl's (editable, never precompiled) sources while pip's
        # precompiled typer and rich are spared.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cases = {
            "llmctl --help": [llmctl, "--help"],
            f"llmctl ls ({args.models} models)": [llmctl, "ls"],
            "bare typer app --help": [sys.executable, str(bare), "--help"],
            "bare typer app ls": [sys.executable, str(bare), "ls"],
            'python -c "import typer, rich"': [sys.executable, "-c", "import typer, rich"],
        }
        if hf:
            cases["hf --help"] = [hf, "--help"]
        for argv in cases.values():  # warm the page cache and .pyc files
            time_once(argv, env)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                samples[name].append(time_once(argv, env))

    medians = {name: statistics.median(values) for name, values in samples.items()}
    # Each llmctl command against the bare app doing the same thing.
    baseline = {"llmctl --help": "bare typer app --help",
                f"llmctl ls ({args.models} models)": "bare typer app ls",
                "bare typer app ls": "bare typer app ls"}
    rows = []
    for name, median in medians.items():
        reference = medians[baseline.get(name, "bare typer app --help")]
        rows.append({
            "command": name, "median_s": round(median, 4),
            "stdev_s": round(statistics.stdev(samples[name]), 4),
            "vs_bare_typer": round(median / reference, 2),
        })
    result = {"runs": args.runs, "rows": rows}
    if hf:
        result["hf_help_over_llmctl_help"] = round(medians["hf --help"]
                                                   / medians["llmctl --help"], 2)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| command | median (s) | stdev (s) | × bare typer app (same command) |\n"
          "|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.3f} | {row['stdev_s']:.3f} "
              f"| {row['vs_bare_typer']:.2f} |")
    if hf:
        print(f"\n`hf --help` takes {result['hf_help_over_llmctl_help']:.1f}× as long as "
              "`llmctl --help`.")
    else:
        print("\n(hf not found: pip install huggingface_hub to add its row)")


if __name__ == "__main__":
    main()
