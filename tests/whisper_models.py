"""Tiny Whisper models with random weights, built here (no download): what the mlx-whisper
and whisper.cpp engine tests run on.

    make_mlx_whisper(folder)   # config.json + weights.safetensors (float16), about 7 MB
    make_ggml_whisper(path)    # one ggml .bin in whisper.cpp's layout (ftype 1), about 8 MB

Both hold the same weights, with Whisper's real audio and text shapes (80 mel bins, 1,500
audio positions, 448 text positions, the multilingual vocabulary of 51,865 tokens) and one
64-wide layer each side, so every engine code path runs: language detection, timestamps,
word timing.

Plain random weights make Whisper's decoding crawl: a flat distribution over 51,865 tokens
puts most of its mass on the 1,501 timestamps, every window decodes 224 timestamps that make
empty segments, and a log probability that low sends each window through all six fallback
temperatures (a 3-second clip took 47 s on mlx-whisper). So the weights are random but
confident: the blocks are near zero, the decoder's position embedding dominates what it
predicts, and positions 3..6 point at random words while position 7 on points at the end of
text. Every window then decodes [timestamp, four words, end] on its first try: one segment
per window, in about a second. The text is still random: tests judge only its structure.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,  # 30 s of audio: 3,000 mel frames halved by the second convolution
    "n_audio_state": 64,
    "n_audio_head": 2,
    "n_audio_layer": 1,
    "n_vocab": 51865,  # >= 51865 makes a model multilingual (it can detect the language)
    "n_text_ctx": 448,
    "n_text_state": 64,
    "n_text_head": 2,
    "n_text_layer": 1,
}
ENGLISH_ONLY = {**DIMS, "n_vocab": 51864}  # the .en models: one token fewer, no languages
# The decoder's input starts <|startoftranscript|> <|language|> <|task|>: position 2 predicts
# the first timestamp, 3..6 four words, and from 7 on the end of text.
WORDS_END = 7


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True
            ) -> list[tuple[str, tuple[int, ...]]]:
    tensors = [(f"{prefix}.weight", (n_out, n_in))]  # PyTorch's Linear: (out, in)
    return [*tensors, (f"{prefix}.bias", (n_out,))] if bias else tensors


def _block(prefix: str, n: int, cross: bool) -> list[tuple[str, tuple[int, ...]]]:
    def attention(name: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.{name}_ln.weight", (n,)), (f"{prefix}.{name}_ln.bias", (n,)),
                *_linear(f"{prefix}.{name}.query", n, n),
                *_linear(f"{prefix}.{name}.key", n, n, bias=False),
                *_linear(f"{prefix}.{name}.value", n, n), *_linear(f"{prefix}.{name}.out", n, n)]

    return [*attention("attn"), *(attention("cross_attn") if cross else []),
            (f"{prefix}.mlp_ln.weight", (n,)), (f"{prefix}.mlp_ln.bias", (n,)),
            *_linear(f"{prefix}.mlp.0", n, 4 * n), *_linear(f"{prefix}.mlp.2", 4 * n, n)]


def tensor_shapes(dims: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Whisper model under openai-whisper's names (which whisper.cpp's
    loader looks up) with its PyTorch shape."""
    n_audio, n_text, n_mels = dims["n_audio_state"], dims["n_text_state"], dims["n_mels"]
    tensors = [
        ("encoder.positional_embedding", (dims["n_audio_ctx"], n_audio)),
        ("encoder.conv1.weight", (n_audio, n_mels, 3)),  # Conv1d: (out, in, kernel)
        ("encoder.conv1.bias", (n_audio,)),
        ("encoder.conv2.weight", (n_audio, n_audio, 3)),
        ("encoder.conv2.bias", (n_audio,)),
    ]
    for i in range(dims["n_audio_layer"]):
        tensors += _block(f"encoder.blocks.{i}", n_audio, cross=False)
    tensors += [("encoder.ln_post.weight", (n_audio,)), ("encoder.ln_post.bias", (n_audio,)),
                ("decoder.positional_embedding", (dims["n_text_ctx"], n_text)),
                ("decoder.token_embedding.weight", (dims["n_vocab"], n_text))]
    for i in range(dims["n_text_layer"]):
        tensors += _block(f"decoder.blocks.{i}", n_text, cross=True)
    return [*tensors, ("decoder.ln.weight", (n_text,)), ("decoder.ln.bias", (n_text,))]


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's fixed encoder position embedding: sines then cosines over log-spaced
    timescales up to 10,000."""
    rates = np.exp(-math.log(10_000) / (channels // 2 - 1) * np.arange(channels // 2))
    angles = np.arange(length)[:, None] * rates[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def end_of_text(dims: dict[str, int]) -> int:
    """<|endoftext|>: right after GPT-2's 50,256 text tokens, one further in multilingual
    vocabularies."""
    return 50257 if dims["n_vocab"] >= 51865 else 50256


def confident_weights(dims: dict[str, int] = DIMS, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights whose decoding is quick and stable (see the module's docstring), as
    float32 arrays in PyTorch's layout."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in tensor_shapes(dims):
        if name.endswith("ln.weight") or name.endswith("_ln.weight"):
            weights[name] = np.ones(shape)  # layer norms start as the identity
        elif name.endswith(".bias"):
            weights[name] = np.zeros(shape)
        else:
            weights[name] = rng.normal(0.0, 0.02, shape)  # blocks close to the identity
    weights["encoder.positional_embedding"] = sinusoids(dims["n_audio_ctx"], dims["n_audio_state"])
    embedding = rng.normal(0.0, 2.0, (dims["n_vocab"], dims["n_text_state"]))
    positions = rng.normal(0.0, 4.0, (dims["n_text_ctx"], dims["n_text_state"]))
    end = embedding[end_of_text(dims)]
    positions[WORDS_END:] = 100.0 * end / np.linalg.norm(end)
    weights["decoder.token_embedding.weight"] = embedding
    weights["decoder.positional_embedding"] = positions
    return {name: array.astype(np.float32) for name, array in weights.items()}


# -- mlx-whisper ---------------------------------------------------------------------------

def _mlx_name_and_layout(name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
    """The same tensor as mlx_whisper's `Whisper` module holds it; None for one it computes
    instead of storing (the encoder's sinusoids)."""
    if name == "encoder.positional_embedding":
        return None
    if name.endswith("conv1.weight") or name.endswith("conv2.weight"):
        array = array.transpose(0, 2, 1)  # MLX's Conv1d: (out, kernel, in)
    return name.replace(".mlp.0.", ".mlp1.").replace(".mlp.2.", ".mlp2."), array


def make_mlx_whisper(folder: Path, seed: int = 0, dims: dict[str, int] = DIMS) -> Path:
    """An mlx-whisper folder as mlx-community's conversions are: config.json (the model's
    dimensions) and weights.safetensors holding every parameter of mlx_whisper's own
    `Whisper` module under its own names, in float16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**dims))
    mapped = [_mlx_name_and_layout(n, a) for n, a in confident_weights(dims, seed).items()]
    # strict: a name or a shape mlx_whisper does not know fails here, not in a test
    model.update(tree_unflatten([(n, mx.array(a)) for n, a in filter(None, mapped)]))
    model.set_dtype(mx.float16)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "weights.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=2))
    return folder


# -- whisper.cpp ---------------------------------------------------------------------------
# The layout whisper.cpp's `whisper_model_load` reads (and models/convert-pt-to-ggml.py
# writes), all little-endian:
#   uint32 magic 0x67676d6c; int32 n_vocab, n_audio_ctx, n_audio_state, n_audio_head,
#   n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels, ftype
#   int32 n_mel, n_fft; float32 filters[n_mel][n_fft]
#   int32 count; count x (uint32 length, bytes): the text tokens; the loader adds the
#   special ones (end of text, languages, tasks, timestamps) up to n_vocab itself
#   per tensor: int32 n_dims, name length, type (0 float32, 1 float16); int32 ne[n_dims]
#   (ggml's order: the numpy shape reversed); the name; the data, row-major
# Tensors are looked up by name, so their order is free, but every one must be there; a
# file that ends before the first tensor loads as an "empty model for testing".

GGML_MAGIC = 0x67676D6C
GGML_HEADER = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
               "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels")


def mel_filters(n_mels: int, n_fft: int = 400, rate: int = 16_000) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale, (n_mels, n_fft // 2 + 1): the
    shape of Whisper's (librosa's Slaney filters; these are HTK's, close enough for random
    weights)."""
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    top = 2595 * np.log10(1 + (rate / 2) / 700)
    edges = 700 * (10 ** (np.linspace(0, top, n_mels + 2) / 2595) - 1)
    rising = (freqs - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - freqs) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0, np.minimum(rising, falling)).astype(np.float32)


def text_tokens(count: int) -> list[bytes]:
    """A stand-in for GPT-2's vocabulary: the 256 single bytes (so any text tokenizes, as
    whisper.cpp does an initial prompt), then words made up here."""
    return [bytes([i]) for i in range(256)] + [f" w{i}".encode() for i in range(256, count)]


def make_ggml_whisper(path: Path, seed: int = 0, dims: dict[str, int] = DIMS) -> Path:
    """A whisper.cpp model file of `confident_weights`: float16 matrices, convolutions and
    token embedding, float32 for the rest (biases, norms, position embeddings), as the
    converter writes ftype 1 files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<I", GGML_MAGIC))
        f.write(struct.pack("<11i", *(dims[k] for k in GGML_HEADER), 1))
        filters = mel_filters(dims["n_mels"])
        f.write(struct.pack("<2i", *filters.shape))
        f.write(filters.astype("<f4").tobytes())
        tokens = text_tokens(end_of_text(dims))  # the text tokens stop where specials begin
        f.write(struct.pack("<i", len(tokens)))
        for token in tokens:
            f.write(struct.pack("<I", len(token)) + token)
        for name, data in confident_weights(dims, seed).items():
            if name.endswith("conv1.bias") or name.endswith("conv2.bias"):
                data = data.reshape(-1, 1)  # whisper.cpp adds them as (n, 1) columns
            half = data.ndim >= 2 and not name.endswith("positional_embedding") \
                and not name.endswith(".bias")
            encoded = name.encode()
            f.write(struct.pack(f"<3i{data.ndim}i", data.ndim, len(encoded), int(half),
                                *reversed(data.shape)))
            f.write(encoded)
            f.write(data.astype("<f2" if half else "<f4").tobytes())
    return path
