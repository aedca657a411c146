"""`convert --to coreml`'s options, checked before anything is read or pulled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmctl.convert.coreml.attention import QUERY_CHUNK_SIZE, AttentionImplementation
from llmctl.errors import UsageError
from llmctl.formats import coreml as coreml_format

# Resource names Apple's pipelines look for.
RESOURCE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
                  "vae_encoder": "VAEEncoder", "safety_checker": "SafetyChecker"}
NBITS = (1, 2, 4, 6, 8)  # what the Neural Engine reads as palettes (Apple's README)
# 6-bit palettes need the runtime that decompresses weights just in time (iOS 17, macOS 14).
SIX_BIT_TARGETS = ("macOS14", "iOS17")
DEPLOYMENT_TARGETS = ("macOS13", "macOS14", "iOS16", "iOS17")
# coremltools' names of the compute units (llmctl.formats.coreml has both spellings).
COMPUTE_UNITS = tuple(coreml_format.COMPUTE_UNITS.values())


@dataclass(frozen=True)
class CoremlOptions:
    """`convert --to coreml`'s options, with torch2coreml's meaning."""

    attention: AttentionImplementation = AttentionImplementation.SPLIT_EINSUM_V2
    chunk_unet: bool | None = None  # None: chunked for iOS targets
    quantize_nbits: int | None = None
    min_deployment_target: str = "macOS13"
    latent_h: int | None = None  # None: the UNet's sample_size
    latent_w: int | None = None
    compute_unit: str = "ALL"
    vae_encoder: bool = False
    safety_checker: bool = False
    one_process_per_component: bool = False
    via_apple: bool = False
    # Not on the command line: for tests and benchmarks.
    query_chunk_size: int = QUERY_CHUNK_SIZE  # SPLIT_EINSUM_V2's query chunks
    palettize_min_elements: int = 2048  # coremltools' weight_threshold: smaller stay fp16

    def check(self) -> None:
        if self.quantize_nbits is not None and self.quantize_nbits not in NBITS:
            raise UsageError(f"--quantize-nbits {self.quantize_nbits} is not supported",
                             hint=f"palettes have {', '.join(map(str, NBITS))} bits")
        if self.min_deployment_target not in DEPLOYMENT_TARGETS:
            raise UsageError(f"--min-deployment-target {self.min_deployment_target} is not "
                             "supported", hint=f"use {', '.join(DEPLOYMENT_TARGETS)}")
        if self.quantize_nbits == 6 and self.min_deployment_target not in SIX_BIT_TARGETS:
            raise UsageError(f"6-bit palettization needs iOS 17 or macOS 14, not "
                             f"{self.min_deployment_target}",
                             hint="add --min-deployment-target macOS14 (or iOS17)")
        if self.compute_unit not in COMPUTE_UNITS:
            raise UsageError(f"--compute-unit {self.compute_unit} is not supported",
                             hint=f"use {', '.join(COMPUTE_UNITS)}")
        for option, value in (("--latent-h", self.latent_h), ("--latent-w", self.latent_w)):
            if value is not None and value < 1:
                raise UsageError(f"{option} must be positive")

    @property
    def chunked(self) -> bool:
        if self.chunk_unet is not None:
            return self.chunk_unet
        return self.min_deployment_target.startswith("iOS")

    @property
    def suffix(self) -> str:
        """The tag of the result: coreml-split_einsum_v2[-6bit][-chunked]."""
        parts = ["coreml", self.attention.value.lower()]
        if self.quantize_nbits:
            parts.append(f"{self.quantize_nbits}bit")
        if self.chunked:
            parts.append("chunked")
        return "-".join(parts)

    @property
    def components(self) -> list[str]:
        chosen = ["text_encoder", "unet", "vae_decoder"]
        if self.vae_encoder:
            chosen.append("vae_encoder")
        if self.safety_checker:
            chosen.append("safety_checker")
        return chosen

    def shaping(self) -> dict[str, Any]:
        """The options that change what is written (the work folder's key)."""
        return {"attention": self.attention.value, "chunked": self.chunked,
                "quantize_nbits": self.quantize_nbits,
                "min_deployment_target": self.min_deployment_target,
                "latent_h": self.latent_h, "latent_w": self.latent_w,
                "query_chunk_size": self.query_chunk_size,
                "palettize_min_elements": self.palettize_min_elements,
                "via": "apple" if self.via_apple else "llmctl"}

    def recorded(self) -> dict[str, Any]:
        """The options as conversion.json and the manifest record them."""
        return self.shaping() | {"components": self.components,
                                 "compute_unit": self.compute_unit}


# Language models (llmctl.convert.coreml_lm): their KV cache is Core ML state, which needs
# the iOS 18 / macOS 15 runtime.
LM_QUANTIZE = ("fp16", "int4")
LM_DEPLOYMENT_TARGETS = ("macOS15", "iOS18")
LM_DEFAULT_CONTEXT = 512
LM_MIN_CONTEXT = 16


@dataclass(frozen=True)
class CoremlLmOptions:
    """`convert --to coreml`'s options for a language model."""

    quantize: str = "fp16"  # fp16 weights, or int4 block-wise (blocks of 32)
    context_length: int = LM_DEFAULT_CONTEXT  # the KV cache's length
    min_deployment_target: str = "macOS15"

    def check(self) -> None:
        if self.quantize not in LM_QUANTIZE:
            raise UsageError(f"-q {self.quantize} is not a Core ML weight format for "
                             "language models", hint="use -q fp16 (the default) or -q int4")
        if self.min_deployment_target not in LM_DEPLOYMENT_TARGETS:
            raise UsageError(f"--min-deployment-target {self.min_deployment_target} cannot "
                             "hold a language model: its KV cache is Core ML state, which "
                             "needs iOS 18 or macOS 15",
                             hint="use --min-deployment-target macOS15 or iOS18")
        if self.context_length < LM_MIN_CONTEXT:
            raise UsageError(f"--ctx {self.context_length} is below {LM_MIN_CONTEXT} tokens",
                             hint=f"use --ctx {LM_MIN_CONTEXT} or more")

    @property
    def suffix(self) -> str:
        """The tag suffix of the result: coreml-fp16, coreml-int4-ctx1024."""
        where = "" if self.min_deployment_target == "macOS15" else f"-{self.min_deployment_target}"
        ctx = "" if self.context_length == LM_DEFAULT_CONTEXT else f"-ctx{self.context_length}"
        return f"coreml-{self.quantize}{ctx}{where}"
