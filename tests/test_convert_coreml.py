"""`llmctl convert --to coreml`: tiny random-weight Stable Diffusion pipelines
(tests/tiny_sd.py) converted with the real torch, diffusers, transformers and coremltools.

Linux cannot run Core ML models, so the tests check what can be checked without
predictions: the resource folder, the models' inputs and outputs, the chunk boundary, the
palettized (lookup-table) weights, the ANE attention in the converted program (one softmax
per head, per query chunk), and the attention rewrite's numerics in PyTorch. Conversions
are slow on 2 cores (20-60 s each), so each configuration is converted once per session
(`conversions`) and the tests read the result. Latents are 8x8.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("coremltools")
pytest.importorskip("diffusers")
import torch  # noqa: E402
from conftest import Runner, error_line, llmctl_executable  # noqa: E402

from llmctl.convert import convert  # noqa: E402
from llmctl.convert.coreml import CoremlConversion, export  # noqa: E402
from llmctl.convert.coreml.apple import apple_command  # noqa: E402
from llmctl.convert.coreml.attention import (  # noqa: E402
    MIN_PSNR_DB,
    AttentionImplementation,
    SplitEinsumAttention,
    check_attention,
    psnr,
)
from llmctl.convert.coreml.options import CoremlOptions  # noqa: E402
from llmctl.convert.coreml.pipeline import Pipeline, pipeline_files  # noqa: E402
from llmctl.errors import UsageError  # noqa: E402
from llmctl.store import manifest as manifests  # noqa: E402
from llmctl.store.catalog import Catalog  # noqa: E402
from llmctl.store.layout import StoreLayout  # noqa: E402
from llmctl.store.model_files import model_folder  # noqa: E402

LATENT = 8
A = AttentionImplementation


# -- tiny pipelines ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("coreml-src") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_with_safety_checker(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path
                                ) -> Path:
    """The tiny pipeline plus a tiny StableDiffusionSafetyChecker (CLIP vision, 32x32
    images) and its feature extractor, listed in model_index.json as the real ones are."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("coreml-src") / "tiny-sd-safe"
    shutil.copytree(tiny_sd, folder)
    small = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
             "num_hidden_layers": 1}
    config = CLIPConfig(text_config={**small, "vocab_size": 100, "bos_token_id": 0,
                                     "eos_token_id": 1, "pad_token_id": 1},
                        vision_config={**small, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    torch.manual_seed(0)
    StableDiffusionSafetyChecker(config).save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "requires_safety_checker": True}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# -- conversions, once per session ------------------------------------------------------------


@dataclass
class Converted:
    home: Path
    options: CoremlOptions
    result: CoremlConversion
    events: list[str]
    interrupted: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return model_folder(StoreLayout(self.home), self.result.manifest)

    def package(self, name: str) -> export.PackageInfo:
        return export.inspect_package(self.folder / f"{name}.mlpackage")


def _convert(home: Path, source: Path, options: CoremlOptions, events: list[str]
             ) -> CoremlConversion:
    layout = StoreLayout(home)
    return convert(str(source), "coreml", layout, Catalog.default(home), options=options,
                   on_event=lambda e: events.append(e.status))


CONFIGURATIONS = {
    # ORIGINAL attention, UNet chunked, text encoder and chunks palettized to 4 bits. The
    # tiny models' weights are small: palettize every weight of 16 values or more.
    "original": dict(attention=A.ORIGINAL, chunk_unet=True, quantize_nbits=4,
                     palettize_min_elements=16),
    # SPLIT_EINSUM for iOS 17: chunked by default, 6-bit palettes, every optional
    # component, each component in a process of its own.
    "split_einsum": dict(attention=A.SPLIT_EINSUM, min_deployment_target="iOS17",
                         quantize_nbits=6, palettize_min_elements=16, vae_encoder=True,
                         safety_checker=True, one_process_per_component=True),
    # SPLIT_EINSUM_V2 with query chunks of 4 positions (the tiny UNet attends over 16), so
    # the chunked attention is what gets exported; interrupted once, then resumed.
    "split_einsum_v2": dict(attention=A.SPLIT_EINSUM_V2, query_chunk_size=4),
}


@pytest.fixture(scope="session")
def conversions(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path,
                tiny_sd_with_safety_checker: Path) -> Any:
    done: dict[str, Converted] = {}

    def get(key: str) -> Converted:
        if key in done:
            return done[key]
        home = tmp_path_factory.mktemp(f"coreml-{key}") / "home"
        options = CoremlOptions(latent_h=LATENT, latent_w=LATENT, **CONFIGURATIONS[key])
        source = tiny_sd_with_safety_checker if options.safety_checker else tiny_sd
        events: list[str] = []
        interrupted: dict[str, Any] = {}
        if key == "split_einsum_v2":
            result, interrupted = _interrupt_then_resume(home, source, options, events)
        else:
            result = _convert(home, source, options, events)
        done[key] = Converted(home, options, result, events, interrupted)
        return done[key]

    return get


def _interrupt_then_resume(home: Path, source: Path, options: CoremlOptions,
                           events: list[str]) -> tuple[CoremlConversion, dict[str, Any]]:
    """Ctrl-C while the VAE decoder converts (after the text encoder and the UNet are
    done), then the same conversion again: what the store and the work folder held in
    between, and which components the second run converted."""
    real = export.convert_component
    facts: dict[str, Any] = {"first_events": [], "converted_on_rerun": []}

    def interrupted(component: str, *args: Any, **kwargs: Any) -> Any:
        if component == "vae_decoder":
            raise KeyboardInterrupt
        return real(component, *args, **kwargs)

    def spy(component: str, *args: Any, **kwargs: Any) -> Any:
        facts["converted_on_rerun"].append(component)
        return real(component, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "convert_component", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _convert(home, source, options, facts["first_events"])
        layout = StoreLayout(home)
        facts["manifests"] = list(manifests.iter_manifests(layout))
        facts["kept"] = sorted(p.name for work in layout.tmp.glob("coreml-*")
                               for p in (work / "Resources").iterdir())
        patch.setattr(export, "convert_component", spy)
        return _convert(home, source, options, events), facts


# -- the attention rewrite, in PyTorch -----------------------------------------------------------


def _attention(**kwargs: Any) -> Any:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    module = Attention(**kwargs).eval()
    module.set_processor(AttnProcessor2_0())
    return module


ATTENTION_CASES = {
    "self": (dict(query_dim=32, heads=4, dim_head=8), (2, 40, 32), None),
    "cross": (dict(query_dim=32, heads=2, dim_head=16, cross_attention_dim=12), (2, 40, 32),
              (2, 7, 12)),
    # The VAE's kind: a (B, C, H, W) input, group norm, a residual and a rescaled output.
    "spatial": (dict(query_dim=32, heads=1, dim_head=32, norm_num_groups=4,
                     residual_connection=True, rescale_output_factor=2.0), (2, 32, 5, 8),
                None),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("chunk", [None, 7, 40, 512], ids=lambda c: f"query-chunk-{c}")
def test_split_einsum_matches_the_original_attention(case: str, chunk: int | None) -> None:
    kwargs, shape, context_shape = ATTENTION_CASES[case]
    module = _attention(**kwargs)
    x = torch.randn(*shape)
    context = torch.randn(*context_shape) if context_shape else None
    with torch.no_grad():
        reference = module(x, context)
        module.set_processor(SplitEinsumAttention(chunk))
        value = psnr(reference, module(x, context))
    assert value >= MIN_PSNR_DB, value
    assert value > 120  # float32 rounding only


def test_split_einsum_applies_masks_per_head_and_query_chunk() -> None:
    module = _attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=12)
    x, context = torch.randn(2, 40, 32), torch.randn(2, 7, 12)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    keep[1, 2:] = False
    bias = ((~keep).float() * -10000.0).unsqueeze(1)  # diffusers' additive (B, 1, Sk)
    with torch.no_grad():
        reference = module(x, context, attention_mask=bias)
        unmasked = module(x, context)
        module.set_processor(SplitEinsumAttention(7))
        value = psnr(reference, module(x, context, attention_mask=bias))
    assert value > 120, value
    assert psnr(reference, unmasked) < 40  # the mask matters: the check can fail


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd: Path) -> Any:
    from diffusers import UNet2DConditionModel

    return lambda: UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()


def _unet_inputs() -> tuple[Any, ...]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([981.0, 981.0]),
            torch.randn(2, 77, 8, generator=generator))


@pytest.mark.parametrize("implementation", [A.SPLIT_EINSUM, A.SPLIT_EINSUM_V2])
def test_the_unets_attention_layers_match_the_original(tiny_unet: Any,
                                                       implementation: A) -> None:
    unet = tiny_unet()
    inputs = _unet_inputs()
    check = check_attention(unet, lambda m: m(*inputs, return_dict=False)[0], implementation,
                            query_chunk_size=16)
    assert check.passed
    # Self- and cross-attention in the down block, the middle and both up-block layers.
    assert len(check.layers) == 8
    assert min(check.layers.values()) > 120 and check.output_psnr > 120
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    assert processors == {"SplitEinsumAttention"}  # left in place for the export


def test_the_attention_check_catches_a_wrong_layout(tiny_unet: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def softmax_over_queries(q: Any, k: Any, v: Any, mask: Any) -> Any:
        weights = torch.einsum("bdhq,bkhd->bkhq", q, k).softmax(dim=3)
        return torch.einsum("bkhq,bdhk->bdhq", weights, v)

    monkeypatch.setattr(SplitEinsumAttention, "_head", staticmethod(softmax_over_queries))
    inputs = _unet_inputs()
    check = check_attention(tiny_unet(), lambda m: m(*inputs, return_dict=False)[0],
                            A.SPLIT_EINSUM)
    assert not check.passed
    assert check.worst[1] < 40


def test_psnr() -> None:
    a = torch.tensor([1.0, -2.0, 0.5])
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.02) == pytest.approx(20 * math.log10(2.0 / 0.02))
    with pytest.raises(ValueError):
        psnr(a, a[:2])


# -- the converted resources ----------------------------------------------------------------


EXPECTED = {
    "original": {"TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder"},
    "split_einsum": {"TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder", "VAEEncoder",
                     "SafetyChecker"},
    "split_einsum_v2": {"TextEncoder", "Unet", "VAEDecoder"},
}
OTHER_FILES = {"vocab.json", "merges.txt", "scheduler_config.json", "vae_config.json",
               "conversion.json"}


@pytest.mark.parametrize("key", CONFIGURATIONS)
def test_the_resource_folder_has_every_model_and_file(conversions: Any, key: str,
                                                      tiny_sd: Path) -> None:
    converted = conversions(key)
    folder = converted.folder
    entries = {p.name for p in folder.iterdir()}
    assert entries == {f"{n}.mlpackage" for n in EXPECTED[key]} | OTHER_FILES
    for name in EXPECTED[key]:
        package = folder / f"{name}.mlpackage"
        assert (package / "Manifest.json").is_file()
        assert (package / "Data" / "com.apple.CoreML" / "model.mlmodel").is_file()
    # The tokenizer files are the pipeline's own, not downloaded ones.
    for name in ("vocab.json", "merges.txt"):
        assert (folder / name).read_bytes() == (tiny_sd / "tokenizer" / name).read_bytes()
    assert json.loads((folder / "vae_config.json").read_text())["_class_name"] == "AutoencoderKL"
    # Every file of the folder is a file of the stored model, named relative to it.
    manifest = converted.result.manifest
    assert (manifest.kind, manifest.engine, manifest.format) == ("image", "coreml", "coreml")
    stored = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {f.name for f in manifest.files} == stored
    assert converted.result.notes == [
        "Core ML models are compiled (.mlmodelc) only on macOS; stored as .mlpackage, which "
        "Core ML compiles when it loads them"]
    assert converted.result.warnings == []  # no chunk over 1 GB


def test_tags_name_the_conversion(conversions: Any) -> None:
    assert conversions("original").result.manifest.reference == (
        "tiny-sd:coreml-original-4bit-chunked")
    assert conversions("split_einsum").result.manifest.reference == (
        "tiny-sd-safe:coreml-split_einsum-6bit-chunked")
    assert conversions("split_einsum_v2").result.manifest.reference == (
        "tiny-sd:coreml-split_einsum_v2")


def _feature(name: str, shape: tuple[int, ...], dtype: str) -> tuple[str, tuple, str]:
    return name, shape, dtype


def test_models_have_apples_interfaces(conversions: Any) -> None:
    converted = conversions("split_einsum")  # every component
    text = converted.package("TextEncoder")
    assert text.inputs == [_feature("input_ids", (1, 77), "float32")]
    assert text.outputs == [_feature("last_hidden_state", (1, 77, 8), "float32"),
                            _feature("pooled_outputs", (1, 8), "float32")]
    first = converted.package("UnetChunk1")
    assert first.inputs == [_feature("sample", (2, 4, LATENT, LATENT), "float16"),
                            _feature("timestep", (2,), "float16"),
                            _feature("encoder_hidden_states", (2, 8, 1, 77), "float16")]
    assert converted.package("UnetChunk2").outputs == [
        _feature("noise_pred", (2, 4, LATENT, LATENT), "float32")]
    # The tiny VAE has two blocks: 2 pixels per latent position (SD's has 8).
    assert converted.package("VAEDecoder").inputs == [
        _feature("z", (1, 4, LATENT, LATENT), "float16")]
    assert converted.package("VAEDecoder").outputs == [
        _feature("image", (1, 3, 2 * LATENT, 2 * LATENT), "float32")]
    assert converted.package("VAEEncoder").inputs == [
        _feature("x", (1, 3, 2 * LATENT, 2 * LATENT), "float16")]
    assert converted.package("VAEEncoder").outputs == [
        _feature("latent", (1, 8, LATENT, LATENT), "float32")]
    safety = converted.package("SafetyChecker")
    assert safety.inputs == [_feature("clip_input", (1, 3, 32, 32), "float16"),
                             _feature("images", (1, 2 * LATENT, 2 * LATENT, 3), "float16"),
                             _feature("adjustment", (1,), "float16")]
    assert [f[0] for f in safety.outputs] == ["filtered_images", "has_nsfw_concepts",
                                              "concept_scores"]
    whole = conversions("split_einsum_v2").package("Unet")
    assert [f[0] for f in whole.inputs] == ["sample", "timestep", "encoder_hidden_states"]


@pytest.mark.parametrize("key", ["original", "split_einsum"])
def test_unet_chunks_fit_together(conversions: Any, key: str) -> None:
    converted = conversions(key)
    first, second = converted.package("UnetChunk1"), converted.package("UnetChunk2")
    inputs = {"sample", "timestep", "encoder_hidden_states"}
    assert {f[0] for f in first.inputs} == inputs
    # What chunk 2 takes beyond the UNet's inputs is exactly what chunk 1 gives.
    extra = {f for f in second.inputs if f[0] not in inputs}
    assert extra == set(first.outputs) and extra
    assert [f[0] for f in second.outputs] == ["noise_pred"]
    report = json.loads((converted.folder / "conversion.json").read_text())
    unet = report["components"]["Unet"]
    assert unet["chunk_boundary"] == sorted(f[0] for f in first.outputs)
    assert unet["chunked_vs_whole_psnr_db"] is None  # needs Core ML predictions (macOS)
    # Two halves of about equal weight size, and reported.
    sizes = [unet["models"][n]["weight_bytes"] for n in ("UnetChunk1", "UnetChunk2")]
    assert sizes == [first.weight_bytes, second.weight_bytes]
    assert 0.5 < sizes[0] / sizes[1] < 2
    assert any(e.startswith("Unet: chunk weights UnetChunk1 ") for e in converted.events)


def test_check_chunks_refuses_a_broken_boundary(conversions: Any) -> None:
    converted = conversions("original")
    first, second = converted.package("UnetChunk1"), converted.package("UnetChunk2")
    whole = export.PackageInfo(first.inputs, second.outputs, 0, export.Counter())
    export.check_chunks(whole, first, second)
    broken = export.PackageInfo(first.inputs, first.outputs[1:], 0, export.Counter())
    with pytest.raises(export.VerificationFailed, match="not chunk 1's outputs"):
        export.check_chunks(whole, broken, second)


@pytest.mark.parametrize("key,nbits", [("original", 4), ("split_einsum", 6)])
def test_text_encoder_and_both_chunks_are_palettized(conversions: Any, key: str,
                                                     nbits: int) -> None:
    converted = conversions(key)
    for name in ("TextEncoder", "UnetChunk1", "UnetChunk2"):
        info = converted.package(name)
        assert info.palettized_ops > 0, (name, info.op_types)
    # Only the text encoder and the UNet are palettized, as in Apple's script.
    assert converted.package("VAEDecoder").palettized_ops == 0
    whole_fp16 = conversions("split_einsum_v2").package("Unet")
    chunks = sum(converted.package(n).weight_bytes for n in ("UnetChunk1", "UnetChunk2"))
    assert chunks < whole_fp16.weight_bytes  # fewer bits per weight


def _softmax_count(converted: Converted, names: list[str]) -> int:
    return sum(converted.package(n).op_types["softmax"] for n in names)


def test_the_ane_attention_is_what_core_ml_runs(conversions: Any, tiny_unet: Any) -> None:
    """One softmax per attention layer for ORIGINAL, one per head for SPLIT_EINSUM, one per
    head and query chunk for SPLIT_EINSUM_V2: the layout reached the Core ML program."""
    from llmctl.convert.coreml.attention import attention_modules

    layers = attention_modules(tiny_unet())
    heads = sum(m.heads for _, m in layers)
    # At 8x8 latents the tiny UNet attends at 4x4: 16 queries, in chunks of 4.
    assert _softmax_count(conversions("original"), ["UnetChunk1", "UnetChunk2"]) == len(layers)
    assert _softmax_count(conversions("split_einsum"), ["UnetChunk1", "UnetChunk2"]) == heads
    assert _softmax_count(conversions("split_einsum_v2"), ["Unet"]) == heads * 16 // 4


def test_the_report_records_checks_and_library_versions(conversions: Any) -> None:
    import coremltools

    converted = conversions("split_einsum")
    report = json.loads((converted.folder / "conversion.json").read_text())
    assert report["versions"]["coremltools"] == coremltools.__version__
    assert report["versions"]["torch"] == torch.__version__
    assert {"diffusers", "transformers", "scikit-learn", "llmctl"} <= set(report["versions"])
    check = report["components"]["Unet"]["attention_check"]
    assert check["implementation"] == "SPLIT_EINSUM"
    assert check["worst_psnr_db"] > check["threshold_db"] == MIN_PSNR_DB
    assert report["options"]["chunked"] is True  # iOS targets chunk by default
    assert report["components"]["TextEncoder"]["capture"] == "torch.jit.trace"
    assert report["components"]["Unet"]["capture"] == "torch.export"
    # The store's manifest records the same versions and where the model came from.
    source = converted.result.manifest.source
    assert source["versions"] == report["versions"] and source["to"] == "coreml"
    assert any("attention matches the original" in e for e in converted.events)


def test_each_component_in_its_own_process_reports_progress(conversions: Any) -> None:
    events = conversions("split_einsum").events
    for name in ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder", "SafetyChecker"):
        assert f"{name}: starting its own process" in events
        assert any(e.startswith(f"{name}: converting to Core ML") for e in events), name
        assert any(e.startswith(f"{name}: done in") for e in events), name


def test_an_interrupted_conversion_registers_nothing_and_the_rerun_continues(
        conversions: Any) -> None:
    converted_v2 = conversions("split_einsum_v2")
    facts = converted_v2.interrupted
    assert facts["manifests"] == []
    assert facts["kept"] == ["TextEncoder.mlpackage", "Unet.mlpackage"]
    assert any("finished components are kept" in e for e in facts["first_events"])
    # The re-run converted only what was missing, and says what it kept.
    assert facts["converted_on_rerun"] == ["vae_decoder"]
    assert converted_v2.result.resumed == ["TextEncoder", "Unet"]
    assert "TextEncoder: converted by an earlier run, kept" in converted_v2.events
    # Done: the work folder is gone.
    assert not list((converted_v2.home / "tmp").glob("coreml-*"))


def test_the_core_ml_engine_reads_the_result(conversions: Any) -> None:
    engine_module = pytest.importorskip("llmctl.engines.coreml")
    from llmctl.engines.image import ImageLoadOptions

    for key in ("original", "split_einsum_v2"):  # chunked and whole UNets
        converted = conversions(key)
        engine = engine_module.CoreMLEngine(converted.folder, ImageLoadOptions())
        assert engine.latent_shape == (2, 4, LATENT, LATENT)
        assert engine.image_size == (2 * LATENT, 2 * LATENT)
        assert len(engine.unet) == (2 if key == "original" else 1)


# -- the command line -------------------------------------------------------------------------


@dataclass(frozen=True)
class CliConversion:
    home: Path
    result: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="session")
def cli_conversion(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> CliConversion:
    home = tmp_path_factory.mktemp("coreml-cli") / "home"
    started = time.perf_counter()
    result = subprocess.run(
        [llmctl_executable(), "convert", str(tiny_sd), "--to", "coreml", "--latent-h",
         str(LATENT), "--latent-w", str(LATENT)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
        env={**os.environ, "LLMCTL_HOME": str(home)})
    return CliConversion(home, result, time.perf_counter() - started)


def test_cli_converts_and_stores_the_pipeline(cli_conversion: CliConversion,
                                              llmctl: Runner) -> None:
    result = cli_conversion.result
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tiny-sd:coreml-split_einsum_v2\n"  # the payload only
    assert "Traceback" not in result.stderr and "warning: " not in result.stderr
    for name in ("TextEncoder", "Unet", "VAEDecoder"):
        assert f"tiny-sd:coreml-split_einsum_v2: {name}: done in" in result.stderr
    assert "\nnote: Core ML models are compiled (.mlmodelc) only on macOS; stored as " \
        ".mlpackage" in result.stderr
    env = {"LLMCTL_HOME": str(cli_conversion.home)}
    listed = llmctl("ls", env=env)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith("tiny-sd:"))
    assert row.split()[-2:] == ["coreml", "coreml"]
    again = llmctl("convert", str(cli_conversion.home.parent / "nothing"), "--to", "coreml",
                   env=env)
    assert again.returncode == 2


def test_cli_refuses_to_convert_again_without_force(cli_conversion: CliConversion,
                                                    llmctl: Runner, tiny_sd: Path) -> None:
    result = llmctl("convert", str(tiny_sd), "--to", "coreml", "--latent-h", str(LATENT),
                    "--latent-w", str(LATENT), env={"LLMCTL_HOME": str(cli_conversion.home)})
    assert result.returncode == 2
    assert "tiny-sd:coreml-split_einsum_v2 is already stored" in error_line(result)


def test_ctrl_c_leaves_nothing_registered(llmctl: Runner, tiny_sd: Path,
                                          llmctl_home: Path) -> None:
    process = subprocess.Popen(
        [llmctl_executable(), "convert", str(tiny_sd), "--to", "coreml", "--latent-h",
         str(LATENT), "--latent-w", str(LATENT), "--attention-implementation", "ORIGINAL"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # one line per step when stderr is a pipe
        seen.append(line)
        if "Unet: converting to Core ML" in line:
            break
    assert any("TextEncoder: done in" in line for line in seen), "".join(seen)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert out == "" and "Traceback" not in err
    assert llmctl("ls", "-q").stdout == ""
    assert "finished components are kept" in err
    kept = list((llmctl_home / "tmp").glob("coreml-*/Resources/TextEncoder.mlpackage"))
    assert len(kept) == 1


@pytest.fixture
def broken_pipelines(tiny_sd: Path, tmp_path: Path) -> Any:
    def make(name: str, change: Any) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_sd, folder)
        change(folder)
        return folder

    return make


def _drop_unet(folder: Path) -> None:
    shutil.rmtree(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))


def _make_xl(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLPipeline",
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("args,message", [
    (("--quantize-nbits", "3"), "--quantize-nbits 3 is not supported"),
    (("--quantize-nbits", "6"), "6-bit palettization needs iOS 17 or macOS 14, not macOS13"),
    (("--quantize-nbits", "6", "--min-deployment-target", "iOS16"),
     "6-bit palettization needs iOS 17 or macOS 14, not iOS16"),
    (("--min-deployment-target", "iOS15"), "--min-deployment-target iOS15 is not supported"),
    (("--latent-h", "7"), "--latent-h 7 does not fit this UNet"),
    (("--safety-checker",), "has no safety checker"),
    (("--attention-implementation", "FAST"), "FAST"),
    (("-q",), "-q is for language models, and tiny-sd is not one; a Stable Diffusion "
     "pipeline palettizes with --quantize-nbits"),
])
def test_bad_options_exit_2_with_one_line(llmctl: Runner, tiny_sd: Path, args: tuple[str, ...],
                                          message: str) -> None:
    result = llmctl("convert", str(tiny_sd), "--to", "coreml", *args)
    assert result.returncode == 2, result.stderr
    assert message in error_line(result)
    assert llmctl("ls", "-q").stdout == ""


def test_image_options_are_refused_for_a_text_model(llmctl: Runner, smollm2_gguf: Path
                                                    ) -> None:
    result = llmctl("convert", str(smollm2_gguf), "--to", "coreml", "--quantize-nbits", "6")
    assert result.returncode == 2
    line = error_line(result)
    assert "--quantize-nbits is for Stable Diffusion pipelines" in line
    assert "a language model takes -q int4|fp16" in line


def test_catalog_models_that_are_no_pipelines_are_refused_before_pulling(llmctl: Runner) -> None:
    apple = llmctl("convert", "sd1.5:coreml-split_einsum", "--to", "coreml")
    assert apple.returncode == 2
    assert ("sd1.5:coreml-split_einsum is an image model (coreml): --to coreml does not "
            "convert it; it is a Core ML model already") in error_line(apple)
    assert llmctl("ls", "-q").stdout == ""  # nothing was pulled


def test_coreml_options_are_refused_for_mlx(llmctl: Runner) -> None:
    result = llmctl("convert", "smollm2", "--to", "mlx", "--quantize-nbits", "4",
                    "--low-memory")
    assert result.returncode == 2
    assert "--quantize-nbits, --low-memory are for --to coreml" in error_line(result)


@pytest.mark.parametrize("change,message", [
    (_drop_unet, "has no UNet ('unet' is missing from the pipeline)"),
    (_make_xl, "StableDiffusionXLPipeline pipeline (two text encoders)"),
    (lambda f: (f / "tokenizer" / "vocab.json").unlink(), "tokenizer has neither"),
])
def test_incomplete_or_unsupported_pipelines_exit_2(llmctl: Runner, broken_pipelines: Any,
                                                    change: Any, message: str) -> None:
    folder = broken_pipelines("broken-sd", change)
    result = llmctl("convert", str(folder), "--to", "coreml")
    assert result.returncode == 2, result.stderr
    assert message in error_line(result)


def test_via_apple_says_how_to_install_it(llmctl: Runner, tiny_sd: Path) -> None:
    result = llmctl("convert", str(tiny_sd), "--to", "coreml", "--via", "apple")
    assert result.returncode == 1
    line = error_line(result)
    assert "python_coreml_stable_diffusion" in line and "not on PyPI" in line
    assert "pip install git+https://github.com/apple/ml-stable-diffusion" in line
    assert "set LLMCTL_APPLE_PYTHON to that venv's python" in line
    # A Python of its own (Apple's pins exclude llmctl's dependencies) is asked instead.
    other = llmctl("convert", str(tiny_sd), "--to", "coreml", "--via", "apple",
                   env={"LLMCTL_APPLE_PYTHON": "/nonexistent/python"})
    assert other.returncode == 1
    assert "LLMCTL_APPLE_PYTHON=/nonexistent/python cannot import" in error_line(other)


def test_the_apple_command_carries_the_same_options(tmp_path: Path) -> None:
    options = CoremlOptions(attention=A.SPLIT_EINSUM, min_deployment_target="iOS17",
                            quantize_nbits=6, latent_h=96, latent_w=64, vae_encoder=True,
                            compute_unit="CPU_AND_NE", via_apple=True)
    command = apple_command(tmp_path / "sd", tmp_path / "out", options)
    assert command[0] == sys.executable
    assert command[1:3] == ["-m", "python_coreml_stable_diffusion.torch2coreml"]
    text = " ".join(command)
    for part in ("--convert-text-encoder", "--convert-unet", "--convert-vae-decoder",
                 "--convert-vae-encoder", "--attention-implementation SPLIT_EINSUM",
                 "--min-deployment-target iOS17", "--latent-h 96", "--latent-w 64",
                 "--compute-unit CPU_AND_NE", f"--model-version {tmp_path / 'sd'}"):
        assert part in text
    # Chunking and palettization are llmctl's, so that the chunks are palettized too.
    assert "--chunk-unet" not in text and "--quantize-nbits" not in text
    assert "--convert-safety-checker" not in text


def test_a_tokenizer_json_gives_vocab_and_merges(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1,
                                                                        "ab</w>": 2},
                                               "merges": [["a", "b</w>"], "a b"]}}))
    resources = tmp_path / "Resources"
    resources.mkdir()
    pipeline_files(Pipeline(tmp_path, "x", None, tokenizer), resources)
    assert json.loads((resources / "vocab.json").read_text()) == {"a": 0, "b": 1, "ab</w>": 2}
    assert (resources / "merges.txt").read_text() == "#version: 0.2\na b</w>\na b\n"
    tokenizer.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(UsageError, match="not a BPE tokenizer"):
        pipeline_files(Pipeline(tmp_path, "x", None, tokenizer), resources)


def test_options_choose_chunking_and_tags() -> None:
    assert CoremlOptions().chunked is False and CoremlOptions().suffix == (
        "coreml-split_einsum_v2")
    ios = CoremlOptions(min_deployment_target="iOS16")
    assert ios.chunked is True and ios.suffix == "coreml-split_einsum_v2-chunked"
    assert CoremlOptions(min_deployment_target="iOS16", chunk_unet=False).chunked is False
    six = CoremlOptions(quantize_nbits=6, min_deployment_target="macOS14")
    six.check()
    assert six.suffix == "coreml-split_einsum_v2-6bit"
    with pytest.raises(UsageError):
        CoremlOptions(quantize_nbits=6).check()


def test_memory_is_estimated_and_warned_about(tiny_sd: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.convert.coreml.pipeline import MEMORY_BASE, conversion_memory, memory_warning
    from llmctl.formats.safetensors import tensors as safetensors_tensors

    pipeline = Pipeline(tiny_sd, "tiny-sd", None, tiny_sd / "tokenizer" / "vocab.json")
    unet = sum(n for _, n in safetensors_tensors(
        tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").values())
    text = sum(n for _, n in safetensors_tensors(
        tiny_sd / "text_encoder" / "model.safetensors").values())
    # The largest component's float32 weights, twice, on top of the libraries.
    assert conversion_memory(pipeline) == MEMORY_BASE + 8 * max(unet, text)
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "100G")
    assert memory_warning(pipeline) is None
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "500M")
    warning = memory_warning(pipeline)
    assert warning and "needs about 700 MB of memory at its peak" in warning
    assert "the same command continues" in warning


def test_components_published_only_as_fp16_variants_load(tiny_sd: Path,
                                                          tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from llmctl.formats.hf import folder_variant

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.save_pretrained(tmp_path / "unet", variant="fp16")
    assert folder_variant(tmp_path / "unet") == "fp16"
    assert folder_variant(tiny_sd / "unet") is None
    loaded = UNet2DConditionModel.from_pretrained(
        tmp_path / "unet", variant=folder_variant(tmp_path / "unet"))
    assert loaded.config.block_out_channels == unet.config.block_out_channels
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "model.fp16-00001-of-00002.safetensors").write_bytes(b"")
    assert folder_variant(tmp_path / "shards") == "fp16"
