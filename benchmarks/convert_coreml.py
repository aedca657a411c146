"""Converting a Stable-Diffusion-shaped UNet to Core ML: wall time and peak memory of
`llmctl convert --to coreml`, against the bare coremltools path for the same UNet (load
it, torch.export, ct.convert, save: nothing else) as the baseline.

    .venv/bin/python benchmarks/convert_coreml.py [--scale 0.5] [--latent 64] [--reps 1]
                                                  [--palettize]

The pipeline is built here with random weights: SD 1.5's UNet (4 levels, 2 layers per
block, cross-attention on 768-wide text embeddings, 8 heads, 64x64 latents) with its
channels scaled by --scale (0.5: 160-320-640-640, 220M parameters, 879 MB in float32,
440 MB of float16 Core ML weights); a one-layer 768-wide CLIP text encoder and a tiny
VAE, so that the UNet is what is measured. Every run is a fresh process; peak memory is
the largest resident size of it or any process it started (RUSAGE_CHILDREN, read by a
wrapper process of its own per run). Each llmctl run has a store of its own.

Runs (each --reps times, interleaved):
    bare coremltools           the baseline: the UNet alone, ORIGINAL attention
    llmctl ORIGINAL            the same UNet and attention, plus text encoder and VAE
                               decoder, resource folder, report, registration
    llmctl SPLIT_EINSUM_V2     the default: the ANE attention, checked against the
                               original in PyTorch first (two float32 UNet passes)
    llmctl --low-memory        the default, each component in a process of its own
    llmctl 6-bit chunked       with --palettize: --chunk-unet --quantize-nbits 6
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMCTL = Path(sys.executable).parent / "llmctl"
SD15_CHANNELS = (320, 640, 1280, 1280)

# Runs a command and prints {"seconds", "peak_bytes"} of it and its descendants.
MEASURE = r"""
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      text=True)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
peak *= 1 if sys.platform == "darwin" else 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "code": code.returncode,
                  "stderr": code.stderr[-2000:]}))
"""

# The baseline: what any conversion of this UNet has to do, with nothing of llmctl's.
BARE = r"""
import logging, sys
logging.getLogger("coremltools").setLevel(logging.ERROR)
import numpy as np, torch, coremltools as ct
from diffusers import UNet2DConditionModel
source, out, latent = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_grad_enabled(False)
unet = UNet2DConditionModel.from_pretrained(source + "/unet", torch_dtype=torch.float32).eval()

class Unet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self.unet(sample, timestep, context, return_dict=False)[0]

args = (torch.randn(2, 4, latent, latent), torch.full((2,), 981.0),
        torch.randn(2, unet.config.cross_attention_dim, 1, 77))
program = torch.export.export(Unet().eval(), args).run_decompositions({})
model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
                   inputs=[ct.TensorType(name=n, shape=a.shape, dtype=np.float16) for n, a in
                           zip(("sample", "timestep", "encoder_hidden_states"), args)],
                   outputs=[ct.TensorType(name="noise_pred", dtype=np.float32)],
                   skip_model_load=True)
model.save(out)
"""


def build_pipeline(path: Path, scale: float, latent: int) -> int:
    """Save the pipeline; returns the UNet's parameter count."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import build_components, write_tokenizer_files

    channels = tuple(int(c * scale) for c in SD15_CHANNELS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, block_out_channels=channels,
                                cross_attention_dim=768, attention_head_dim=8,
                                layers_per_block=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    parts = build_components()
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    parts |= {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer}
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(path)
    (path / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer_files(path / "tokenizer")
    return sum(p.numel() for p in unet.parameters())


def measure(command: list[str], env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True,
                            text=True, env={**os.environ, **(env or {})})
    data = json.loads(result.stdout)
    if data["code"] != 0:
        raise SystemExit(f"{command[:3]} failed: {data['stderr']}")
    return data


def unet_seconds(home: Path) -> float | None:
    """The UNet's own conversion time, from the stored conversion.json."""
    for manifest in (home / "manifests").rglob("*.json"):
        for entry in json.loads(manifest.read_text())["files"]:
            if entry["name"] == "conversion.json":
                blob = home / "blobs" / entry["digest"].replace(":", "-")
                return json.loads(blob.read_text())["components"]["Unet"]["seconds"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.5,
                        help="SD 1.5's UNet channels times this (default 0.5)")
    parser.add_argument("--latent", type=int, default=64, help="latent size (default 64)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--palettize", action="store_true",
                        help="also measure --chunk-unet --quantize-nbits 6 (k-means: slow)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert-coreml-bench-"))
    try:
        source = work / "sd-shaped"
        params = build_pipeline(source, args.scale, args.latent)
        print(f"UNet: {params / 1e6:.0f}M parameters ({params * 4 / 1e6:.0f} MB float32, "
              f"{params * 2 / 1e6:.0f} MB float16), latents {args.latent}x{args.latent}",
              file=sys.stderr)
        latent = ["--latent-h", str(args.latent), "--latent-w", str(args.latent)]
        runs: dict[str, list[str]] = {
            "bare coremltools (baseline)": [sys.executable, "-c", BARE, str(source),
                                            str(work / "bare.mlpackage"), str(args.latent)],
            "llmctl ORIGINAL": ["--attention-implementation", "ORIGINAL"],
            "llmctl SPLIT_EINSUM_V2 (default)": [],
            "llmctl SPLIT_EINSUM_V2 --low-memory": ["--low-memory"],
        }
        if args.palettize:
            runs["llmctl 6-bit, chunked"] = ["--chunk-unet", "--quantize-nbits", "6",
                                             "--min-deployment-target", "macOS14"]
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for rep in range(args.reps):
            for name, extra in runs.items():
                home = work / f"home-{rep}-{len(results[name])}-{abs(hash(name))}"
                if name.startswith("bare"):
                    data = measure(extra)
                    shutil.rmtree(work / "bare.mlpackage", ignore_errors=True)
                else:
                    data = measure([str(LLMCTL), "convert", str(source), "--to", "coreml",
                                    *latent, *extra], env={"LLMCTL_HOME": str(home)})
                    data["unet_seconds"] = unet_seconds(home)
                    shutil.rmtree(home, ignore_errors=True)
                results[name].append(data)
                print(f"{name}: {data['seconds']:.1f} s, {data['peak_bytes'] / 1e9:.2f} GB",
                      file=sys.stderr)
        base = results["bare coremltools (baseline)"]
        base_s = statistics.median(r["seconds"] for r in base)
        base_m = statistics.median(r["peak_bytes"] for r in base)
        print("| run | wall time | of which UNet | × baseline time | peak memory | "
              "× baseline memory |")
        print("|---|---|---|---|---|---|")
        for name, rows in results.items():
            seconds = statistics.median(r["seconds"] for r in rows)
            peak = statistics.median(r["peak_bytes"] for r in rows)
            unet = [r["unet_seconds"] for r in rows if r.get("unet_seconds")]
            unet_text = f"{statistics.median(unet):.0f} s" if unet else "-"
            print(f"| {name} | {seconds:.0f} s | {unet_text} | {seconds / base_s:.2f} | "
                  f"{peak / 1e9:.2f} GB | {peak / base_m:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
