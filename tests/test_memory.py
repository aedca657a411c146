"""The memory guard: the estimate's formula on real headers, and run/chat refusing a model
that does not fit unless --force."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PARIS, Runner, error_line

from llmctl import host
from llmctl.engines import memory
from llmctl.engines.text import default_context
from llmctl.errors import InsufficientResources
from llmctl.formats.gguf import read_header

MIB = 1024**2


def smollm2(path: Path) -> SimpleNamespace:
    """What `runnable()` gives for the real SmolLM2 file."""
    return SimpleNamespace(path=path, format="gguf", header=read_header(path))


def test_estimate_of_smollm2_from_its_gguf_header(smollm2_gguf: Path) -> None:
    target = smollm2(smollm2_gguf)
    metadata = target.header.metadata
    # The figures the formula uses, as the header gives them.
    assert (metadata["llama.block_count"], metadata["llama.attention.head_count"],
            metadata["llama.attention.head_count_kv"], metadata["llama.embedding_length"],
            metadata["llama.context_length"]) == (30, 9, 3, 576, 8192)
    estimate = memory.estimate_text_memory(target, None)
    assert estimate.context_length == 4096  # the model's 8192, capped like the engine:
    assert estimate.context_length == default_context(None, 8192)  # the engines' rule
    # 30 layers × 4096 tokens × 3 KV heads × (64 + 64) head dims × 2 bytes: llama.cpp
    # reports exactly this ("KV buffer size = 90.00 MiB").
    assert estimate.kv_cache == 30 * 4096 * 3 * (64 + 64) * 2 == 90 * MIB
    assert estimate.weights == smollm2_gguf.stat().st_size == 98_362_432
    assert estimate.logits == 512 * 49152 * 4  # llama.cpp: "compute buffer = 98.25 MiB"
    assert estimate.overhead == 64 * MIB
    assert estimate.total == 98_362_432 + 90 * MIB + 96 * MIB + 64 * MIB


def test_a_small_context_shrinks_the_estimate(smollm2_gguf: Path) -> None:
    target = smollm2(smollm2_gguf)
    small = memory.estimate_text_memory(target, 300)
    assert small.context_length == 512  # llama.cpp allocates multiples of 256 cells
    assert small.kv_cache == 30 * 512 * 3 * 128 * 2
    assert small.logits == 512 * 49152 * 4
    tiny = memory.estimate_text_memory(target, 100)
    assert tiny.context_length == 256 and tiny.logits == 256 * 49152 * 4


def test_key_and_value_lengths_and_per_layer_head_counts() -> None:
    metadata = {"general.architecture": "x", "x.block_count": 2,
                "x.attention.head_count": [8, 8], "x.attention.head_count_kv": [2, 0],
                "x.embedding_length": 512, "x.attention.key_length": 128,
                "x.attention.value_length": 96, "x.vocab_size": 1000,
                "x.context_length": 2048}
    shape = memory.gguf_shape(metadata)
    assert shape.kv_per_token == 2 * (128 + 96)  # the second layer caches nothing
    assert (shape.vocabulary, shape.trained_context) == (1000, 2048)
    assert memory.gguf_shape({}).kv_per_token == 0  # nothing known: weights only


def make_folder_model(folder: Path, config: dict, weights: int) -> SimpleNamespace:
    """An MLX / safetensors folder as the store presents it: config.json and weights."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "model.safetensors", "wb") as handle:
        handle.truncate(weights)  # sparse: the size is what counts
    (folder / "tokenizer.json").write_text("{}")
    return SimpleNamespace(path=folder, format="mlx", header=None)


def test_estimate_of_a_folder_model_from_config_json(tmp_path: Path) -> None:
    # SmolLM2-135M's config.json, as transformers writes it.
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "hidden_size": 576, "vocab_size": 49152, "max_position_embeddings": 8192}
    target = make_folder_model(tmp_path / "m", config, 80_000_000)
    estimate = memory.estimate_text_memory(target, None)
    assert estimate.weights == 80_000_000  # the safetensors only
    assert estimate.context_length == 4096
    assert estimate.kv_cache == 30 * 4096 * 3 * 64 * 2 * 2
    assert estimate.logits == 512 * 49152 * 4
    # head_dim wins over hidden_size / heads; a nested text_config is read; no KV heads
    # means one per attention head.
    nested = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4,
                              "hidden_size": 64, "head_dim": 32}}
    other = make_folder_model(tmp_path / "n", nested, 1000)
    assert memory.estimate_text_memory(other, 100).kv_cache == 2 * 100 * 4 * 32 * 2 * 2
    broken = make_folder_model(tmp_path / "b", {}, 1000)
    (broken.path / "config.json").write_text("not json")
    assert memory.estimate_text_memory(broken, None).kv_cache == 0


def test_check_fits_refuses_above_the_share_unless_forced(
        smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    estimate = memory.estimate_text_memory(smollm2(smollm2_gguf), None)
    need = estimate.total
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", str(int(need / host.MEMORY_SHARE) + 10))
    assert memory.check_fits(estimate).fits
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", str(need))  # all of it: above 90%
    with pytest.raises(InsufficientResources) as refused:
        memory.check_fits(estimate)
    assert refused.value.need == need and refused.value.have == int(need * host.MEMORY_SHARE)
    assert "--force" in refused.value.hint and "LLMCTL_MEMORY_LIMIT" in refused.value.hint
    forced = memory.check_fits(estimate, force=True)
    assert not forced.fits and forced.allowed == int(need * host.MEMORY_SHARE)
    monkeypatch.setattr(host, "usable_memory_bytes", lambda: None)
    assert memory.check_fits(estimate).fits  # nothing known: nothing refused


def test_run_refuses_a_model_too_big_with_both_figures(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", PARIS,
                    env={"LLMCTL_MEMORY_LIMIT": "10M"})
    assert result.returncode == 5
    line = error_line(result)
    assert "not enough memory: need 361 MB, have 9.0 MB" in line
    assert "--force" in line and "--ctx" in line
    assert result.stdout == ""


def test_run_with_force_loads_anyway_and_answers(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--temperature", "0", "--force", PARIS,
                    env={"LLMCTL_MEMORY_LIMIT": "10M"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is Paris.\n"
    assert "warning: smollm2:135m may not fit in memory" in result.stderr


def test_a_smaller_context_fits_where_the_default_does_not(llmctl: Runner) -> None:
    # 300 MB allows 270 MB: the 4096-token default needs 361 MB, 256 tokens need 222 MB.
    env = {"LLMCTL_MEMORY_LIMIT": "300M"}
    assert llmctl("run", "smollm2", "Hi", env=env).returncode == 5
    small = llmctl("run", "smollm2", "--ctx", "256", "--temperature", "0", PARIS, env=env)
    assert small.returncode == 0, small.stderr
    assert "Paris" in small.stdout and "warning" not in small.stderr


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)


def test_image_estimate_counts_the_weights_a_pipeline_loads(tmp_path: Path) -> None:
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    sparse(folder / "unet" / "diffusion_pytorch_model.safetensors", 4000)
    sparse(folder / "unet" / "diffusion_pytorch_model.bin", 4000)  # the same, as a pickle
    sparse(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors", 1000)  # only fp16
    sparse(folder / "text_encoder" / "model.bin", 500)  # only a pickle
    sparse(folder / "safety_checker" / "model.safetensors", 9000)  # not in the pipeline
    estimate = memory.estimate_image_memory(folder, 512, 512, upcast=False)
    assert estimate.weights == 4000 + 1000 + 500
    assert memory.estimate_image_memory(folder, 512, 512, upcast=True).weights == 4000 + 2000 + 500
    assert estimate.work == 1024**3 and estimate.overhead == 256 * MIB
    assert estimate.total == 5500 + 1024**3 + 256 * MIB
    assert memory.estimate_image_memory(folder, 1024, 512, upcast=False).work == 2 * 1024**3
    assert estimate.context_length is None
    assert estimate.parts == {"weights": 5500, "work": 1024**3, "overhead": 256 * MIB}


def test_image_estimate_counts_core_ml_models_whole(tmp_path: Path) -> None:
    folder = tmp_path / "Resources"
    for name in ("TextEncoder", "Unet"):
        sparse(folder / f"{name}.mlmodelc" / "weights" / "weight.bin", 1000)
        sparse(folder / f"{name}.mlmodelc" / "model.mil", 100)
    sparse(folder / "vocab.json", 50)  # the tokenizer's files are not weights
    assert memory.estimate_image_memory(folder, 512, 512, upcast=False).weights == 2200


def test_image_refusal_names_its_own_remedies(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "Resources"
    sparse(folder / "Unet.mlmodelc" / "weights" / "weight.bin", 1000)
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "10M")
    with pytest.raises(InsufficientResources) as refused:
        memory.check_fits(memory.estimate_image_memory(folder, 512, 512, upcast=False))
    assert refused.value.hint.endswith("try a smaller --width/--height, --low-memory, or load "
                                       "anyway with --force")
    assert refused.value.have == 9_000_000 == host.allowed_memory()


def test_ls_fits_applies_the_rule_run_does(llmctl: Runner) -> None:
    # smollm2's catalog entry asks for 300 MB: within 330 MB, above 90% of it.
    env = {"LLMCTL_MEMORY_LIMIT": "330M"}
    listed = json.loads(llmctl("ls", "--available", "--fits", "--json", env=env).stdout)
    assert "smollm2:135m" not in {m["reference"] for m in listed}
    env = {"LLMCTL_MEMORY_LIMIT": "334M"}  # 90%: 300.6 MB
    listed = json.loads(llmctl("ls", "--available", "--fits", "--json", env=env).stdout)
    assert "smollm2:135m" in {m["reference"] for m in listed}


def test_peak_memory_is_this_programs_own_not_its_parents() -> None:
    # Linux keeps ru_maxrss across exec: a program started by a large one would report
    # its parent's peak. The parent here holds 600 MB, touched, when it starts the child.
    parent = textwrap.dedent("""
        import subprocess, sys
        held = bytearray(600 * 2**20)
        for i in range(0, len(held), 4096):
            held[i] = 1
        child = "from llmctl.host import peak_memory_bytes; print(peak_memory_bytes())"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True,
                             text=True, check=True).stdout)
    """)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                         check=True).stdout
    assert 5 * 2**20 < int(out) < 300 * 2**20
