"""Attention for the Apple Neural Engine: llmctl's own diffusers attention processors.

Apple's paper "Deploying Transformers on the Apple Neural Engine" (2022) describes what
makes attention fast on the ANE, and `--attention-implementation` follows it:

- Data layout (B, C, 1, S): channels second, the sequence on the last axis. The ANE keeps
  the last axis of a tensor contiguous and padded to 64 bytes, so a (B, S, C) layout with a
  small C wastes most of each row; (B, C, 1, S) is also the layout of a 2D convolution's
  input, so the projections run as 1x1 convolutions, the ANE's fastest operation.
- One head at a time: instead of one (B, heads, S, S) product, each head's query, key and
  value are channel slices, and each head's scores are an einsum over its channels. The
  intermediates stay small enough for the ANE's caches, and no reshape or transpose moves
  data between heads.
- SPLIT_EINSUM_V2 further splits the query sequence into chunks (QUERY_CHUNK_SIZE), so the
  (keys x queries) score tensor of the high-resolution blocks is never built whole.

ORIGINAL keeps diffusers' own processor (scaled dot-product attention, better on GPUs).
The processors compute the same function as the original attention; `check_attention`
measures how closely (PSNR, layer by layer) before a conversion exports them.

torch is imported by the functions that need it: this module is imported only by
conversions, never at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from llmctl.errors import UsageError

if TYPE_CHECKING:
    import torch


class AttentionImplementation(StrEnum):
    ORIGINAL = "ORIGINAL"
    SPLIT_EINSUM = "SPLIT_EINSUM"
    SPLIT_EINSUM_V2 = "SPLIT_EINSUM_V2"


# SPLIT_EINSUM_V2 splits query sequences longer than this. At SD 1.5's 64x64 latents the
# first blocks attend over 4096 positions: 8 chunks, each score tensor 8x smaller.
QUERY_CHUNK_SIZE = 512

# The rewrite is exact algebra; in float32 what differs is rounding (about 1e-7 relative,
# i.e. 120-140 dB). A mistake in the layout (a wrong head split, a softmax over the wrong
# axis, a transposed mask) gives less than 20 dB. 60 dB sits far from both: the
# conversion stops below it. (Apple's 35 dB is for the whole Core ML model in float16.)
MIN_PSNR_DB = 60.0


def psnr(reference: Any, candidate: Any) -> float:
    """Peak signal-to-noise ratio of `candidate` against `reference`, in dB: the
    reference's peak magnitude over the root mean square of the difference (numpy arrays
    or torch tensors). Identical inputs give infinity."""
    import numpy as np

    ref = np.asarray(_as_numpy(reference), dtype=np.float64)
    cand = np.asarray(_as_numpy(candidate), dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {ref.shape} and {cand.shape}")
    rmse = math.sqrt(float(np.mean((ref - cand) ** 2))) if ref.size else 0.0
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    if rmse == 0.0:
        return math.inf
    if peak == 0.0:
        return -math.inf
    return 20 * math.log10(peak / rmse)


def _as_numpy(value: Any) -> Any:
    detach = getattr(value, "detach", None)
    return detach().float().cpu().numpy() if detach else value


class SplitEinsumAttention:
    """A diffusers attention processor in the ANE layout (see the module's docstring).

    `query_chunk_size` None is SPLIT_EINSUM; a size is SPLIT_EINSUM_V2, whose query
    sequence is split into chunks of that many positions (shorter sequences are not split,
    and then both are the same computation)."""

    def __init__(self, query_chunk_size: int | None = None):
        if query_chunk_size is not None and query_chunk_size < 1:
            raise ValueError("query_chunk_size must be at least 1")
        self.query_chunk_size = query_chunk_size

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            # (B, C, H, W) is already channels-second: the positions just become one axis.
            batch, channels, height, width = hidden_states.shape
            x = hidden_states.reshape(batch, channels, 1, height * width)
        else:
            batch = hidden_states.shape[0]
            x = hidden_states.transpose(1, 2).unsqueeze(2)  # (B, S, C) -> (B, C, 1, S)
        if attn.group_norm is not None:
            x = attn.group_norm(x)  # GroupNorm takes (B, C, *) as it is

        if encoder_hidden_states is None:
            context = x
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context = encoder_hidden_states.transpose(1, 2).unsqueeze(2)

        query = _pointwise_conv(attn.to_q, x)
        key = _pointwise_conv(attn.to_k, context)
        value = _pointwise_conv(attn.to_v, context)

        heads = attn.heads
        head_dim = key.shape[1] // heads
        key_length = key.shape[3]
        masks = _head_masks(attn, attention_mask, key_length, batch, heads)
        # Scaled once for all heads. The keys are turned once to (B, Sk, 1, C), so that
        # each head's scores are the einsum Core ML maps onto one batched matmul with no
        # transpose per head ("nchw,nwhu->nchu" in coremltools' terms).
        query = query * attn.scale
        keys = key.transpose(1, 3)
        outputs = []
        for h in range(heads):
            channels = slice(h * head_dim, (h + 1) * head_dim)
            q, k, v = query[:, channels], keys[..., channels], value[:, channels]
            mask = masks[h] if masks is not None else None
            pieces = [self._head(q_part, k, v, _mask_part(mask, part))
                      for part, q_part in self._query_parts(q)]
            outputs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=3))
        out = torch.cat(outputs, dim=1)  # (B, heads * head_dim, 1, Sq)

        out = _pointwise_conv(attn.to_out[0], out)
        out = attn.to_out[1](out)  # dropout: the identity when converting
        if spatial:
            out = out.reshape(batch, out.shape[1], height, width)
        else:
            out = out.squeeze(2).transpose(1, 2)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _query_parts(self, q: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        length = q.shape[3]
        size = self.query_chunk_size
        if size is None or length <= size:
            yield slice(0, length), q
            return
        for start in range(0, length, size):
            part = slice(start, min(start + size, length))
            yield part, q[..., part]

    @staticmethod
    def _head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """One head: q (B, d, 1, Sq) already scaled, k (B, Sk, 1, d), v (B, d, 1, Sk) ->
        (B, d, 1, Sq). The scores are laid out (B, Sk, 1, Sq), keys on the channel axis:
        both products are einsums over one axis, and the softmax runs over axis 1."""
        import torch

        scores = torch.einsum("bdhq,bkhd->bkhq", q, k)
        if mask is not None:
            scores = scores + mask
        return torch.einsum("bkhq,bdhk->bdhq", scores.softmax(dim=1), v)


def _pointwise_conv(linear: Any, x: torch.Tensor) -> torch.Tensor:
    """A linear layer applied to (B, C, 1, S) as the 1x1 convolution it is: the same
    weights, viewed as (out, in, 1, 1)."""
    import torch.nn.functional as F

    weight = linear.weight
    return F.conv2d(x, weight.reshape(weight.shape[0], weight.shape[1], 1, 1), linear.bias)


def _head_masks(attn: Any, attention_mask: torch.Tensor | None, key_length: int, batch: int,
                heads: int) -> list[torch.Tensor] | None:
    """diffusers' additive mask, (B, 1 or Sq, Sk) or already per head, as one (B, Sk, 1,
    1 or Sq) mask per head: the layout of this processor's scores."""
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, key_length, batch, out_dim=4)
    mask = mask.reshape(batch, heads, -1, key_length)  # (B, heads, 1 or Sq, Sk)
    return [mask[:, h].transpose(1, 2).unsqueeze(2) for h in range(heads)]


def _mask_part(mask: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return mask if mask is None or mask.shape[3] == 1 else mask[..., part]


def processor_for(implementation: AttentionImplementation | str,
                  query_chunk_size: int = QUERY_CHUNK_SIZE) -> SplitEinsumAttention | None:
    """The processor for an implementation; None for ORIGINAL (diffusers' own)."""
    implementation = AttentionImplementation(implementation)
    if implementation is AttentionImplementation.ORIGINAL:
        return None
    if implementation is AttentionImplementation.SPLIT_EINSUM:
        return SplitEinsumAttention()
    return SplitEinsumAttention(query_chunk_size)


def attention_modules(model: Any) -> list[tuple[str, Any]]:
    """The diffusers Attention modules of a model, by name."""
    from diffusers.models.attention_processor import Attention

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Attention)]


def check_supported(model: Any) -> None:
    """Refuse attention this processor does not implement (extra key/value projections,
    normalised queries and keys), before anything is exported."""
    for name, module in attention_modules(model):
        if getattr(module, "add_k_proj", None) is not None or (
                getattr(module, "norm_q", None) is not None
                or getattr(module, "norm_k", None) is not None):
            raise UsageError(f"the attention layer {name} has added key/value projections or "
                             "query/key normalisation, which the ANE processors do not handle",
                             hint="convert with --attention-implementation ORIGINAL")


def install(model: Any, implementation: AttentionImplementation | str,
            query_chunk_size: int = QUERY_CHUNK_SIZE) -> None:
    """Put the implementation's processor into every attention layer of `model`."""
    processor = processor_for(implementation, query_chunk_size)
    if processor is None:
        return
    check_supported(model)
    for _, module in attention_modules(model):
        module.set_processor(processor)


@dataclass(frozen=True)
class AttentionCheck:
    """How closely the rewritten attention matches the original, per attention layer
    (dB), and on the model's output."""

    layers: dict[str, float]
    output_psnr: float
    threshold: float = MIN_PSNR_DB

    @property
    def worst(self) -> tuple[str, float]:
        if not self.layers:
            return "output", self.output_psnr
        name = min(self.layers, key=lambda n: self.layers[n])
        return name, self.layers[name]

    @property
    def passed(self) -> bool:
        return min(self.worst[1], self.output_psnr) >= self.threshold


def check_attention(model: Any, run: Callable[[Any], Any],
                    implementation: AttentionImplementation | str,
                    query_chunk_size: int = QUERY_CHUNK_SIZE,
                    threshold: float = MIN_PSNR_DB) -> AttentionCheck:
    """Run `run(model)` with the model's own attention and then with `implementation`'s
    processors, comparing every attention layer's output and the model's output (PSNR).
    The model keeps the new processors afterwards (ready for export). In float32."""
    import torch

    modules = attention_modules(model)
    originals = {name: module.processor for name, module in modules}

    def record() -> tuple[dict[str, torch.Tensor], Any]:
        seen: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_hook(
            lambda _m, _args, output, name=name: seen.setdefault(name, output.detach()))
            for name, module in modules]
        try:
            with torch.no_grad():
                output = run(model)
        finally:
            for hook in hooks:
                hook.remove()
        return seen, output

    try:
        reference_layers, reference = record()
        install(model, implementation, query_chunk_size)
        layers, output = record()
    except Exception:
        for name, module in modules:
            module.set_processor(originals[name])
        raise
    return AttentionCheck(
        {name: psnr(reference_layers[name], layers[name]) for name in reference_layers},
        psnr(reference, output), threshold)
