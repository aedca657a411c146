"""The Core ML engine's orchestration, on Linux: stand-ins with Core ML's `predict(dict) ->
dict` interface and declared inputs/outputs run the torch modules of a tiny diffusers
pipeline (tests/tiny_sd.py), so the engine's images can be compared with the diffusers
pipeline's own for the same seed. What only macOS can run (coremltools predictions,
compute units, .mlmodelc loading) is left out here; see README."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import Runner, error_line  # noqa: E402

from llmctl.engines.coreml import CoreMLEngine, Feature, find_resources  # noqa: E402
from llmctl.engines.image import ImageLoadOptions, ImageRequest, Rendered, Step  # noqa: E402
from llmctl.errors import EngineFailure, UsageError  # noqa: E402

TOKENS = 77


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import StableDiffusionPipeline
    from tiny_sd import build_tiny_sd

    folder = build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", unet_channels=(8, 16))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder = folder
    return pipe


class StandIn:
    """A Core ML model stand-in: declared features, and predict() over numpy arrays that
    checks it is given exactly its inputs, in their declared shapes and types."""

    def __init__(self, inputs: dict[str, Feature], outputs: dict[str, Feature], run: Any):
        self.inputs, self.outputs, self.run = inputs, outputs, run
        self.calls = 0

    def predict(self, data: dict[str, Any]) -> dict[str, Any]:
        assert set(data) == set(self.inputs), (sorted(data), sorted(self.inputs))
        for name, feature in self.inputs.items():
            assert data[name].shape == feature.shape, (name, data[name].shape)
            assert data[name].dtype == np.dtype(feature.dtype), (name, data[name].dtype)
        self.calls += 1
        with torch.no_grad():
            result = self.run({k: torch.from_numpy(np.asarray(v)) for k, v in data.items()})
        return {k: v.numpy() for k, v in result.items()}


def _hidden(data: dict[str, Any]) -> Any:
    """Apple's (batch, hidden, 1, tokens) back to diffusers' (batch, tokens, hidden)."""
    return data["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)


def unet_chunks(unet: Any) -> tuple[Any, Any]:
    """The UNet's forward pass cut after its down blocks: the first part returns the time
    embedding, the down path's hidden state and its skip connections; the second takes
    those plus the step's encoder_hidden_states and returns noise_pred."""

    def first(data: dict[str, Any]) -> dict[str, Any]:
        emb = unet.time_embedding(unet.time_proj(data["timestep"]).float())
        hidden = unet.conv_in(data["sample"])
        skips = [hidden]
        for block in unet.down_blocks:
            extra = ({"encoder_hidden_states": _hidden(data)}
                     if getattr(block, "has_cross_attention", False) else {})
            hidden, res = block(hidden_states=hidden, temb=emb, **extra)
            skips += list(res)
        return {"emb": emb, "hidden": hidden, **{f"skip_{i}": s for i, s in enumerate(skips)}}

    def second(data: dict[str, Any]) -> dict[str, Any]:
        emb, hidden, context = data["emb"], data["hidden"], _hidden(data)
        skips = [data[f"skip_{i}"] for i in range(len([k for k in data if k.startswith("skip")]))]
        hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
        for block in unet.up_blocks:
            res, skips = tuple(skips[-len(block.resnets):]), skips[:-len(block.resnets)]
            extra = ({"encoder_hidden_states": context}
                     if getattr(block, "has_cross_attention", False) else {})
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, **extra)
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        return {"noise_pred": hidden}

    return first, second


def stand_ins(pipe: Any, batch: int = 2, chunked: bool = False, height: int = 64,
              width: int = 64) -> dict[str, StandIn]:
    """Stand-ins named as the resource folder names its models, with Apple's layouts."""
    hidden = pipe.text_encoder.config.hidden_size
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    sample = {"sample": Feature((batch, 4, h, w)), "timestep": Feature((batch,)),
              "encoder_hidden_states": Feature((batch, hidden, 1, TOKENS))}
    noise = {"noise_pred": Feature((batch, 4, h, w))}
    text = StandIn({"input_ids": Feature((1, TOKENS))},
                   {"last_hidden_state": Feature((1, TOKENS, hidden))},
                   lambda d: {"last_hidden_state": pipe.text_encoder(
                       d["input_ids"].long())[0]})
    vae = StandIn({"z": Feature((1, 4, h, w))}, {"image": Feature((1, 3, height, width))},
                  lambda d: {"image": pipe.vae.decode(d["z"]).sample})
    models = {"TextEncoder": text, "VAEDecoder": vae}
    if not chunked:
        models["Unet"] = StandIn(sample, noise, lambda d: {"noise_pred": pipe.unet(
            d["sample"], d["timestep"], encoder_hidden_states=_hidden(d)).sample})
        return models
    first, second = unet_chunks(pipe.unet)
    probe = first({"sample": torch.zeros(batch, 4, h, w), "timestep": torch.zeros(batch),
                   "encoder_hidden_states": torch.zeros(batch, hidden, 1, TOKENS)})
    between = {k: Feature(tuple(v.shape)) for k, v in probe.items()}
    models["UnetChunk1"] = StandIn(sample, between, first)
    models["UnetChunk2"] = StandIn(
        {**between, "encoder_hidden_states": sample["encoder_hidden_states"]}, noise, second)
    return models


def resource_folder(root: Path, pipe: Any, names: list[str], suffix: str = ".mlpackage"
                    ) -> Path:
    """A resource folder with placeholders for the models and the real tokenizer files
    and scheduler configuration of the pipeline."""
    root.mkdir(parents=True)
    for name in names:
        (root / f"{name}{suffix}").mkdir()
        (root / f"{name}{suffix}" / "Manifest.json").write_text("{}")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(pipe.folder / "tokenizer" / name, root / name)
    shutil.copyfile(pipe.folder / "scheduler" / "scheduler_config.json",
                    root / "scheduler_config.json")
    return root


def engine_for(root: Path, models: dict[str, StandIn], **options: Any) -> CoreMLEngine:
    opened: list[str] = []

    def open_component(path: Path, units: str) -> StandIn:
        assert units == options.get("compute_units", "all")
        opened.append(path.name)
        return models[path.name.split(".")[0]]

    engine = CoreMLEngine(root, ImageLoadOptions(**options), open_component=open_component)
    engine.opened = opened
    return engine


def run(engine: CoreMLEngine, request: ImageRequest) -> tuple[list[Step], Any]:
    steps, image = [], None
    for event in engine.generate(request):
        if isinstance(event, Step):
            steps.append(event)
        else:
            assert isinstance(event, Rendered)
            image = event.image
    return steps, image


def diffusers_image(pipe: Any, request: ImageRequest) -> Any:
    return pipe(request.prompt, negative_prompt=request.negative_prompt or None,
                num_inference_steps=request.steps, guidance_scale=request.guidance,
                generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]


def assert_close(a: Any, b: Any) -> None:
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    assert diff.max() <= 1, diff.max()  # rounding of float32 sums done in another order


REQUEST = ImageRequest("a lighthouse at dusk", seed=3, steps=3, guidance=7.5,
                       negative_prompt="blurry")


@pytest.mark.parametrize("chunked", [False, True], ids=["unet", "chunked-unet"])
def test_same_seed_gives_the_diffusers_pipelines_image(pipeline: Any, tmp_path: Path,
                                                       chunked: bool) -> None:
    names = ["TextEncoder", "VAEDecoder"] + (["UnetChunk1", "UnetChunk2"] if chunked
                                             else ["Unet"])
    models = stand_ins(pipeline, chunked=chunked)
    engine = engine_for(resource_folder(tmp_path / "Resources", pipeline, names), models,
                        compute_units="cpu_and_ne")
    steps, image = run(engine, REQUEST)
    assert [(s.index, s.total) for s in steps] == [(1, 3), (2, 3), (3, 3)]
    assert image.size == (64, 64) and engine.image_size == (64, 64)
    assert_close(image, diffusers_image(pipeline, REQUEST))
    other = np.asarray(diffusers_image(pipeline, replace(REQUEST, seed=4)), np.int16)
    assert np.abs(np.asarray(image, np.int16) - other).max() > 50  # the check can fail
    assert models["TextEncoder"].calls == 2  # the negative prompt and the prompt
    unets = [m for n, m in models.items() if n.startswith("Unet")]
    assert [m.calls for m in unets] == [3] * len(unets)  # each chunk once per step
    assert models["VAEDecoder"].calls == 1


def test_chunks_are_preferred_and_found_below_the_folder(pipeline: Any,
                                                         tmp_path: Path) -> None:
    names = ["TextEncoder", "Unet", "UnetChunk1", "UnetChunk2", "VAEDecoder"]
    root = resource_folder(tmp_path / "split_einsum" / "compiled", pipeline, names,
                           suffix=".mlmodelc")
    found = find_resources(tmp_path)
    assert found.folder == root
    assert [p.name for p in found.unet] == ["UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc"]
    engine = engine_for(tmp_path, stand_ins(pipeline, chunked=True))
    assert "Unet.mlmodelc" not in engine.opened


def test_batch_one_unet_runs_once_per_half(pipeline: Any, tmp_path: Path) -> None:
    models = stand_ins(pipeline, batch=1)
    engine = engine_for(resource_folder(tmp_path / "R", pipeline,
                                        ["TextEncoder", "Unet", "VAEDecoder"]), models)
    _, image = run(engine, REQUEST)
    assert models["Unet"].calls == 6
    assert_close(image, diffusers_image(pipeline, REQUEST))


def test_without_guidance_and_with_previews_and_another_scheduler(pipeline: Any,
                                                                  tmp_path: Path) -> None:
    models = stand_ins(pipeline)
    engine = engine_for(resource_folder(tmp_path / "R", pipeline,
                                        ["TextEncoder", "Unet", "VAEDecoder"]), models)
    request = ImageRequest("a boat", seed=1, steps=4, guidance=0.0, scheduler="euler",
                           preview_every=2)
    events = list(engine.generate(request))
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.index for s in steps if s.preview is not None] == [2]  # 4 is the image
    assert events[-1].scheduler == "euler" and events[-1].device == "coreml:all"
    assert models["TextEncoder"].calls == 1  # no negative prompt without guidance
    from diffusers import EulerDiscreteScheduler

    pipeline.scheduler, own = EulerDiscreteScheduler.from_config(
        pipeline.scheduler.config), pipeline.scheduler
    try:
        assert_close(events[-1].image, diffusers_image(pipeline, request))
    finally:
        pipeline.scheduler = own


def test_closing_the_stream_stops_between_steps(pipeline: Any, tmp_path: Path) -> None:
    models = stand_ins(pipeline)
    engine = engine_for(resource_folder(tmp_path / "R", pipeline,
                                        ["TextEncoder", "Unet", "VAEDecoder"]), models)
    events = engine.generate(ImageRequest("a tree", seed=1, steps=10, guidance=7.5))
    assert next(events).index == 1
    events.close()
    assert models["Unet"].calls == 1 and models["VAEDecoder"].calls == 0


def test_wrong_size_missing_parts_and_sdxl_are_refused(pipeline: Any, tmp_path: Path) -> None:
    root = resource_folder(tmp_path / "R", pipeline, ["TextEncoder", "Unet", "VAEDecoder"])
    engine = engine_for(root, stand_ins(pipeline))
    with pytest.raises(UsageError, match="makes 64x64 images only"):
        next(engine.generate(ImageRequest("x", seed=1, steps=1, guidance=7.5, width=128)))
    with pytest.raises(EngineFailure, match="UnetChunk1 and UnetChunk2"):
        find_resources(resource_folder(tmp_path / "S", pipeline, ["TextEncoder", "Unet"]))
    models = stand_ins(pipeline)
    models["Unet"].inputs = {**models["Unet"].inputs, "text_embeds": Feature((2, 1280))}
    with pytest.raises(EngineFailure, match="Stable Diffusion XL"):
        engine_for(root, models)
    models = stand_ins(pipeline, chunked=True)
    models["UnetChunk2"].inputs = {**models["UnetChunk2"].inputs, "skip_99": Feature((1,))}
    chunked = resource_folder(tmp_path / "C", pipeline,
                              ["TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder"])
    with pytest.raises(EngineFailure, match="skip_99"):
        engine_for(chunked, models)


def test_imagine_on_linux_says_core_ml_runs_only_on_macos(llmctl: Runner, tmp_path: Path,
                                                          llmctl_home: Path) -> None:
    import sys

    from llmctl.store.layout import StoreLayout
    from llmctl.store.register import register
    from llmctl.store.sources import LocalFiles

    if sys.platform == "darwin":
        pytest.skip("Core ML runs here")
    names = ["TextEncoder.mlmodelc/model.mil", "Unet.mlmodelc/model.mil",
             "VAEDecoder.mlmodelc/model.mil", "vocab.json", "merges.txt"]
    paths = []
    for name in names:
        path = tmp_path / "Resources" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(name))
        paths.append(path)
    register(StoreLayout(llmctl_home), LocalFiles(paths, names=names), name="sd-coreml",
             tag="latest", expected_sha256=None, on_event=lambda event: None)
    result = llmctl("imagine", "sd-coreml", "a castle")
    assert result.returncode == 1
    line = error_line(result)
    assert "coreml" in line and "macOS only" in line
    assert result.stderr.count("\n") == 1 and result.stdout == ""
