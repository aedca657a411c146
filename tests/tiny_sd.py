"""Tiny Stable Diffusion pipelines with random weights, built from the real diffusers and
transformers classes (no download): what the imagine and convert tests run on.

    build_tiny_sd(path)                         # ~250 KB, 2 steps at 64x64 in about a second
    build_tiny_sd(path, unet_channels=(32, 64)) # a UNet big enough to chunk or to interrupt

The shapes follow diffusers' own pipeline tests (`get_dummy_components`); the tokenizer is
a byte-level CLIP BPE written here (every byte as a token, plus a few merges), saved with
model_max_length 77 as the real one is (without it the pipeline overflows).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 1000
MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "a t", "o r", "e n", "l i",
          "h o", "s t", "d u", "s k"]


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte (spaces and control bytes are moved
    above 255 so that every token is a visible string)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a tiny CLIP tokenizer (ids below VOCAB_SIZE)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [BOS, EOS]
    for symbol in byte_symbols():
        tokens += [symbol, symbol + "</w>"]
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    assert len(tokens) <= VOCAB_SIZE
    vocab = folder / "vocab.json"
    merges = folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges.write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return vocab, merges


def build_components(unet_channels: tuple[int, ...] = (4, 8), seed: int = 0) -> dict:
    """The pipeline's parts, with weights drawn from `seed`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    groups = min(unet_channels[0], 32)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=unet_channels, layers_per_block=1, sample_size=32,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (
            len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=8, norm_num_groups=groups,
        attention_head_dim=2 if unet_channels[0] < 16 else 8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8,
        intermediate_size=16, layer_norm_eps=1e-05, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=77,
    ))
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges),
                                  model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
            "image_encoder": None}


def build_tiny_sd(path: Path, unet_channels: tuple[int, ...] = (4, 8), seed: int = 0,
                  safe_serialization: bool = True, variant: str | None = None) -> Path:
    """Save a StableDiffusionPipeline with random weights to `path` (save_pretrained's
    layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/ with vocab.json and
    merges.txt, scheduler/).
    `safe_serialization=False` writes pickle weights (.bin) instead of .safetensors;
    `variant="fp16"` writes float16 weights named as the Hub's fp16 variants
    (diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_components(unet_channels, seed),
                                   requires_safety_checker=False)
    if variant == "fp16":
        import torch

        pipe.to(torch.float16)
    pipe.save_pretrained(path, safe_serialization=safe_serialization, variant=variant)
    # The published Stable Diffusion repositories ship the tokenizer as vocab.json and
    # merges.txt (which Core ML conversions copy), not as tokenizer.json.
    tokenizer = Path(path) / "tokenizer"
    (tokenizer / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer_files(tokenizer)
    return Path(path)


if __name__ == "__main__":
    import sys

    print(build_tiny_sd(Path(sys.argv[1]),
                        tuple(int(c) for c in sys.argv[2:]) or (4, 8)))
