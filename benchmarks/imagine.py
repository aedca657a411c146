"""Speed and peak memory of `llmctl imagine` against the same diffusers pipeline called
directly, with the same steps, size, seed and guidance, in one script.

The pipeline is a random-weight Stable Diffusion built with the real diffusers classes
(tests/tiny_sd.py; UNet channels (32, 64) by default, big enough that a step at 128x128
takes well over 50 ms here). Each repetition runs both in fresh processes, in a shuffled
order, so that machine noise hits both alike:

  direct   python: AutoPipelineForText2Image.from_pretrained(folder, float32), pipe(...)
           with a CPU generator, step times taken in the step callback
  llmctl   llmctl imagine FOLDER ... --json (its reported step time and generation time)

  step     mean seconds per denoising step after the first (the first also pays for
           text encoding); image: the whole generation, text encoding to decoded image;
  peak     the process's peak resident memory (getrusage of the child)

The images must be identical (same seed, same device): that shows both did the same work.

    .venv/bin/python benchmarks/imagine.py [--reps 5] [--steps 20] [--size 128]
                                           [--channels 32 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PROMPT = "a lighthouse at dusk, oil painting"
THREADS = ""  # --threads

DIRECT = r"""
import json, sys, time
import torch
from diffusers import AutoPipelineForText2Image
folder, out, prompt = sys.argv[1], sys.argv[5], sys.argv[6]
steps, size, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
stamps = []
def on_step(pipe, i, t, kwargs):
    stamps.append(time.perf_counter())
    return {}
started = time.perf_counter()
image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, width=size,
             height=size, generator=torch.Generator("cpu").manual_seed(seed),
             callback_on_step_end=on_step).images[0]
seconds = time.perf_counter() - started
image.save(out)
print(json.dumps({"seconds": seconds,
                  "step_seconds": (stamps[-1] - stamps[0]) / (len(stamps) - 1)}))
"""


def run_child(command: list[str]) -> tuple[str, int]:
    """Run `command`: its stdout and its peak resident memory in bytes (wait4 gives the
    child's own rusage)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    if THREADS:
        env["OMP_NUM_THREADS"] = THREADS  # torch's intra-op threads, for both alike
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode:
            raise SystemExit(f"{command[0]} failed ({process.returncode}):\n"
                             f"{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss * 1024  # KiB on Linux


def direct(folder: Path, args: argparse.Namespace, image: Path) -> dict:
    stdout, peak = run_child([sys.executable, "-c", DIRECT, str(folder), str(args.steps),
                              str(args.size), str(args.seed), str(image), PROMPT])
    return {**json.loads(stdout), "peak": peak, "image": image}


def llmctl(folder: Path, args: argparse.Namespace, image: Path) -> dict:
    stdout, peak = run_child([str(BIN / "llmctl"), "imagine", str(folder), PROMPT,
                              "--steps", str(args.steps), "--width", str(args.size),
                              "--height", str(args.size), "--seed", str(args.seed),
                              "--guidance", "7.5", "--json", "-o", str(image)])
    meta = json.loads(stdout)
    return {"seconds": meta["seconds"], "step_seconds": meta["step_seconds"], "peak": peak,
            "image": image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", default="",
                        help="OMP_NUM_THREADS for both (default: torch's own choice)")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    sys.path.insert(0, str(HERE.parent / "tests"))
    from PIL import Image
    from tiny_sd import build_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="llmctl-imagine-bench-"))
    os.environ["LLMCTL_HOME"] = str(work / "home")
    folder = build_tiny_sd(work / "pipeline", unet_channels=tuple(args.channels))
    results: dict[str, list[dict]] = {"direct": [], "llmctl": []}
    for rep in range(args.reps):
        order = [("direct", direct), ("llmctl", llmctl)]
        random.shuffle(order)
        for name, run in order:
            result = run(folder, args, work / f"{name}-{rep}.png")
            results[name].append(result)
            print(f"rep {rep + 1} {name:7s} step {result['step_seconds'] * 1000:7.1f} ms  "
                  f"image {result['seconds']:6.2f} s  peak {result['peak'] / 1e6:6.0f} MB",
                  file=sys.stderr)
    images = {Image.open(r["image"]).tobytes() for rs in results.values() for r in rs}
    same = "identical" if len(images) == 1 else f"{len(images)} different images"

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    print(f"pipeline: tiny_sd UNet channels {tuple(args.channels)}, {args.size}x"
          f"{args.size}, {args.steps} steps, guidance 7.5, float32 on CPU, {threads}, "
          f"{args.reps} repetitions (medians); images: {same}")
    print("| | step (ms) | image (s) | peak memory (MB) |")
    print("|---|---|---|---|")
    for name in ("direct", "llmctl"):
        print(f"| {name} | {median(name, 'step_seconds') * 1000:.1f} | "
              f"{median(name, 'seconds'):.2f} | {median(name, 'peak') / 1e6:.0f} |")
    speed = median("direct", "step_seconds") / median("llmctl", "step_seconds")
    image_speed = median("direct", "seconds") / median("llmctl", "seconds")
    memory = median("llmctl", "peak") / median("direct", "peak")
    print(f"| llmctl / direct | speed {speed:.3f}x | speed {image_speed:.3f}x | "
          f"memory {memory:.3f}x |")


if __name__ == "__main__":
    main()
