"""llmctl catalog add|rm|ls|export|import and ls --available, end to end; and the pieces
they stand on (registry ids, sizes, the memory this process may use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Runner, error_line

from llmctl.host import usable_memory_bytes
from llmctl.store.catalog import Catalog, quantization_in
from llmctl.store.user_catalog import registry_reference
from llmctl.units import parse_size

SHA = "ab" * 32
URL = "https://models.example.com/files/My-Model-Q4_K_M.gguf"


def user_entries(llmctl: Runner) -> dict[str, dict]:
    result = llmctl("catalog", "ls", "--user", "--json")
    assert result.returncode == 0, result.stderr
    return {e["name"] + ":" + e["tag"]: e for e in json.loads(result.stdout)}


def test_add_ls_and_rm_a_url_entry(llmctl: Runner, llmctl_home: Path) -> None:
    added = llmctl("catalog", "add", "mymodel:q4", "--url", URL, "--sha256", SHA.upper(),
                   "--alternative-url", "https://mirror.example.org/m.gguf",
                   "--alternative-url", "https://mirror2.example.org/m.gguf", "--auth",
                   "--size", "4.1G", "--min-ram", "5G", "--description", "Mine")
    assert added.returncode == 0, added.stderr
    assert added.stdout == "mymodel:q4\n" and "mymodel:q4: added" in added.stderr
    entry = user_entries(llmctl)["mymodel:q4"]
    assert (entry["kind"], entry["engine"], entry["format"]) == ("text", "llama", "gguf")
    assert entry["sources"] == [{
        "type": "url", "url": URL, "sha256": SHA, "auth": True,
        "alternative_urls": ["https://mirror.example.org/m.gguf",
                             "https://mirror2.example.org/m.gguf"]}]
    assert entry["size"] == 4_100_000_000 and entry["min_ram"] == 5_000_000_000
    assert entry["quantization"] == "Q4_K_M" and entry["description"] == "Mine"
    assert entry["origin"] == str(llmctl_home / "catalog" / "user.json")
    table = llmctl("catalog", "ls").stdout
    assert "smollm2:135m" in table and "shipped" in table
    assert any(line.startswith("mymodel:q4") and line.endswith("user")
               for line in table.splitlines())
    again = llmctl("catalog", "add", "mymodel:q4", "--url", URL)
    assert again.returncode == 2 and "--force" in error_line(again)
    removed = llmctl("catalog", "rm", "mymodel:q4")
    assert removed.returncode == 0 and removed.stdout == "mymodel:q4\n"
    assert user_entries(llmctl) == {}
    gone = llmctl("catalog", "rm", "mymodel:q4")
    assert gone.returncode == 2 and "no catalog entry mymodel:q4" in error_line(gone)


def test_hf_entries_and_formats_told_by_the_file_name(llmctl: Runner) -> None:
    assert llmctl("catalog", "add", "qwen:7b", "--hf", "Qwen/Qwen2.5-7B-Instruct-GGUF",
                  "--file", "qwen2.5-7b-instruct-q4_k_m.gguf", "--revision", "abc123"
                  ).returncode == 0
    assert llmctl("catalog", "add", "sd:v1", "--url", "https://h/sd-v1.mlmodelc.zip",
                  "--unzip").returncode == 0
    assert llmctl("catalog", "add", "tiny:mlx", "--hf", "mlx-community/Tiny-4bit",
                  "--format", "mlx").returncode == 0
    entries = user_entries(llmctl)
    assert entries["qwen:7b"]["sources"] == [{
        "type": "hf", "repo": "Qwen/Qwen2.5-7B-Instruct-GGUF", "revision": "abc123",
        "files": {"Q4_K_M": "qwen2.5-7b-instruct-q4_k_m.gguf"}}]
    assert entries["qwen:7b"]["quantization"] == "Q4_K_M"
    assert (entries["sd:v1"]["kind"], entries["sd:v1"]["format"]) == ("image", "coreml")
    assert entries["sd:v1"]["sources"][0]["unpack"] is True
    assert (entries["tiny:mlx"]["kind"], entries["tiny:mlx"]["engine"]) == ("text", "mlx")


def test_shipped_entries_are_shadowed_only_with_force(llmctl: Runner) -> None:
    refused = llmctl("catalog", "add", "smollm2:135m", "--url", URL)
    assert refused.returncode == 2 and "shipped" in error_line(refused)
    forced = llmctl("catalog", "add", "smollm2:135m", "--url", URL, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "in place of" in forced.stderr
    assert user_entries(llmctl)["smollm2:135m"]["default"] is True  # `smollm2` still works
    back = llmctl("catalog", "rm", "smollm2:135m")
    assert back.returncode == 0 and "back in effect" in back.stderr
    shipped = llmctl("catalog", "rm", "smollm2")
    assert shipped.returncode == 2 and "shipped with llmctl" in error_line(shipped)


def test_hand_written_catalog_files_are_read_and_left_alone(
        llmctl: Runner, llmctl_home: Path) -> None:
    folder = llmctl_home / "catalog"
    folder.mkdir(parents=True)
    (folder / "team.toml").write_text(
        '# our models\n[[model]]\nname = "team"\ntag = "v1"\nkind = "text"\n'
        'engine = "llama"\nformat = "gguf"\n'
        f'[[model.sources]]\ntype = "url"\nurl = "{URL}"\n')
    assert "team:v1" in user_entries(llmctl)
    refused = llmctl("catalog", "rm", "team:v1")
    assert refused.returncode == 2 and "team.toml" in error_line(refused)
    shadow = llmctl("catalog", "add", "team:v1", "--url", URL)
    assert shadow.returncode == 2 and "team.toml" in error_line(shadow)


@pytest.mark.parametrize("args, words", [
    (["Bad Name!", "--url", URL], "is not a model name"),
    (["x"], "exactly one source"),
    (["x", "--url", URL, "--hf", "org/repo"], "exactly one source"),
    (["x", "--url", URL, "--sha256", "abc"], "64 hexadecimal digits"),
    (["x", "--url", "ftp://h/m.gguf"], "not an http(s) URL"),
    (["x", "--url", "https://user:secret@h/m.gguf"], "carries credentials"),
    (["x", "--url", "https://h/model.bin"], "pass --format"),
    (["x", "--url", URL, "--format", "tflite"], "unknown format"),
    (["x", "--url", URL, "--kind", "audio"], "unknown kind"),
    (["x", "--hf", "org/repo"], "--hf needs --file"),
    (["x", "--hf", "just-a-name", "--file", "m.gguf"], "not a Hugging Face repository"),
    (["x", "--url", URL, "--size", "big"], "not a size"),
    (["x", "--url", URL, "--file", "m.gguf"], "go with --hf"),
])
def test_bad_input_is_a_usage_error_in_one_line(llmctl: Runner, llmctl_home: Path,
                                                args: list[str], words: str) -> None:
    result = llmctl("catalog", "add", *args)
    assert result.returncode == 2
    line = error_line(result)
    assert words in line and "secret" not in result.stderr
    assert not (llmctl_home / "catalog" / "user.json").exists()


def test_export_then_import_gives_the_same_entries(llmctl: Runner, llmctl_home: Path,
                                                   tmp_path: Path) -> None:
    llmctl("catalog", "add", "mymodel:q4", "--url", URL, "--sha256", SHA, "--auth",
           "--alternative-url", "https://mirror.example.org/m.gguf", "--size", "4G")
    llmctl("catalog", "add", "sd:v1", "--url", "https://h/sd.zip", "--unzip",
           "--format", "coreml", "--description", "A Core ML pipeline")
    llmctl("catalog", "add", "qwen:7b", "--hf", "Qwen/Qwen2.5-7B-Instruct-GGUF",
           "--file", "qwen2.5-7b-instruct-q4_k_m.gguf")
    before = user_entries(llmctl)
    exported = llmctl("catalog", "export")
    assert exported.returncode == 0, exported.stderr
    data = json.loads(exported.stdout)
    first = data["custom"][0]
    assert {k: first[k] for k in ("id", "url", "sha256", "requiresUnzip", "requiresAuth",
                                  "alternativeURLs")} == {
        "id": "mymodel:q4", "url": URL, "sha256": SHA, "requiresUnzip": False,
        "requiresAuth": True, "alternativeURLs": ["https://mirror.example.org/m.gguf"]}
    assert data["custom"][1]["name"] == "A Core ML pipeline"
    assert data["custom"][1]["requiresUnzip"] is True
    # An entry without a plain URL still gives other readers one: the Hub's download URL.
    assert data["custom"][2]["url"] == ("https://huggingface.co/Qwen/Qwen2.5-7B-Instruct-GGUF"
                                        "/resolve/main/qwen2.5-7b-instruct-q4_k_m.gguf")
    target = tmp_path / "mine.json"
    written = llmctl("catalog", "export", str(target))
    assert written.stdout == f"{target}\n" and json.loads(target.read_text()) == data
    assert llmctl("catalog", "rm", "mymodel:q4", "sd:v1", "qwen:7b").returncode == 0
    imported = llmctl("catalog", "import", str(target))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines() == ["mymodel:q4", "sd:v1", "qwen:7b"]
    assert user_entries(llmctl) == before
    again = llmctl("catalog", "import", "-", input=target.read_text())
    assert again.returncode == 0 and again.stderr.count("unchanged") == 3


def test_import_of_registry_json(llmctl: Runner, llmctl_home: Path) -> None:
    registry = {"custom": [
        {"id": "My Model", "name": "My Model 7B", "url": URL, "sha256": SHA.upper(),
         "requiresUnzip": False, "requiresAuth": True,
         "alternativeURLs": ["https://mirror.example.org/My-Model-Q4_K_M.gguf"],
         "token": "hunter2"},
        {"id": "org/Vision:v2", "name": "Vision", "url": "https://h/vision.zip",
         "requiresUnzip": True, "requiresAuth": False, "alternativeURLs": []},
    ]}
    result = llmctl("catalog", "import", "-", input=json.dumps(registry))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "my-model:latest\norg/vision:v2\n"
    entries = user_entries(llmctl)
    model = entries["my-model:latest"]
    assert model["description"] == "My Model 7B" and model["format"] == "gguf"
    assert model["sources"] == [{
        "type": "url", "url": URL, "sha256": SHA, "auth": True,
        "alternative_urls": ["https://mirror.example.org/My-Model-Q4_K_M.gguf"]}]
    vision = entries["org/vision:v2"]
    assert vision["sources"][0]["unpack"] is True
    # An archive whose name says nothing: the files decide once downloaded.
    assert (vision["kind"], vision["engine"], vision["format"]) == ("", "", "")
    assert "hunter2" not in (llmctl_home / "catalog" / "user.json").read_text()
    # The bare name resolves to the "latest" tag.
    assert "my-model:latest" in llmctl("ls", "--available", "-q").stdout


@pytest.mark.parametrize("text, words", [
    ("{not json", "is not valid JSON"),
    ('{"models": []}', 'no "custom" list'),
    ('{"custom": [{"id": "ok", "url": "https://h/a.gguf"}, {"id": "broken"}]}',
     "entry 2 ('broken'): missing 'url'"),
    ('{"custom": [{"url": "https://h/a.gguf"}]}', "entry 1: missing 'id'"),
    ('{"custom": [{"id": "x", "url": "https://h/a.gguf", "sha256": "zz"}]}',
     "entry 1 ('x'): sha256 'zz'"),
    ('{"custom": [{"id": "x", "url": "https://h/a.gguf", "requiresUnzip": "yes"}]}',
     "'requiresUnzip' must be true or false"),
    ('{"custom": [{"id": "x", "url": "https://h/a.gguf", "alternativeURLs": ["nope"]}]}',
     "alternative URL 'nope'"),
    ('{"custom": [{"id": "x", "url": "https://h/a.gguf"}, {"id": "x", "url": "https://h/b.gguf"}]}',
     "x:latest is given twice"),
])
def test_bad_registry_json_is_one_error_line_and_imports_nothing(
        llmctl: Runner, llmctl_home: Path, text: str, words: str) -> None:
    result = llmctl("catalog", "import", "-", input=text)
    assert result.returncode == 2
    assert words in error_line(result)
    assert not (llmctl_home / "catalog" / "user.json").exists()


def test_missing_import_file(llmctl: Runner, tmp_path: Path) -> None:
    result = llmctl("catalog", "import", str(tmp_path / "none.json"))
    assert result.returncode == 2 and "cannot read" in error_line(result)


def test_ls_available_filters_and_json(llmctl: Runner) -> None:
    llmctl("catalog", "add", "sd:v1", "--url", "https://h/sd.zip", "--format", "coreml",
           "--size", "2G", "--min-ram", "4G")
    table = llmctl("ls", "--available")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[:8] == ["NAME", "SIZE", "ENGINE", "KIND", "FORMAT", "FITS",
                                        "STORED", "QUANTIZATIONS"]
    assert "Q4_K_M,Q5_K_M,Q6_K,Q8_0" in table.stdout
    images = llmctl("ls", "--available", "--kind", "image", "-q").stdout.split()
    shipped = [e.reference for e in Catalog.default().entries if e.kind == "image"]
    assert shipped and sorted(images) == sorted([*shipped, "sd:v1"])
    llama = json.loads(llmctl("ls", "--available", "--engine", "llama", "--json").stdout)
    assert llama and all(m["engine"] == "llama" for m in llama)
    assert "sd:v1" not in {m["reference"] for m in llama}
    assert llmctl("pull", "-q", "smollm2").returncode == 0
    smollm2 = next(m for m in json.loads(llmctl("ls", "--available", "--json").stdout)
                   if m["reference"] == "smollm2:135m")
    assert smollm2["stored"] == ["smollm2:135m"] and smollm2["quantizations"] == ["Q4_1"]
    stored_line = next(line for line in llmctl("ls", "--available").stdout.splitlines()
                       if line.startswith("smollm2:135m"))
    assert stored_line.split()[6] == "yes"


def test_ls_available_fits_under_a_memory_limit(llmctl: Runner) -> None:
    env = {"LLMCTL_MEMORY_LIMIT": "1G"}
    result = llmctl("ls", "--available", "--fits", "--json", env=env)
    assert result.returncode == 0, result.stderr
    listed = {m["reference"] for m in json.loads(result.stdout)}
    expected = {e.reference for e in Catalog.default().entries
                if 0 < (e.min_ram or e.size) <= 1_000_000_000}
    assert listed == expected and "smollm2:135m" in listed and "mistral:7b" not in listed
    assert all(m["fits"] for m in json.loads(result.stdout))
    every = json.loads(llmctl("ls", "--available", "--json", env=env).stdout)
    assert {m["reference"] for m in every if m["fits"] is False} >= {"mistral:7b"}
    bad = llmctl("ls", "--available", env={"LLMCTL_MEMORY_LIMIT": "plenty"})
    assert bad.returncode == 2 and "LLMCTL_MEMORY_LIMIT" in error_line(bad)
    alone = llmctl("ls", "--fits")
    assert alone.returncode == 2 and "--available" in error_line(alone)


@pytest.mark.parametrize("text, size", [
    ("1073741824", 1073741824), ("1G", 10**9), ("1gb", 10**9), ("1GiB", 2**30),
    ("512M", 512 * 10**6), ("1.5Gi", 3 * 2**29), ("100B", 100), ("2k", 2000),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "1Q", "GB", "1 GBB", "-1G"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_usable_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMCTL_MEMORY_LIMIT", raising=False)
    detected = usable_memory_bytes()
    assert detected is None or detected > 0
    monkeypatch.setenv("LLMCTL_MEMORY_LIMIT", "3G")
    assert usable_memory_bytes() == 3 * 10**9


@pytest.mark.parametrize("identifier, reference", [
    ("my-model", "my-model:latest"), ("My Model (v2)", "my-model-v2:latest"),
    ("Org/Repo:Q4_K_M", "org/repo:q4_k_m"), ("a/b/c", "a/b-c:latest"),
])
def test_registry_ids_become_model_names(identifier: str, reference: str) -> None:
    assert registry_reference(identifier) == reference


@pytest.mark.parametrize("name, quant", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"), ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
    ("gemma-3-270m-it-F16.gguf", "F16"), ("m-BF16.gguf", "BF16"), ("x-IQ4_XS.gguf", "IQ4_XS"),
    ("model.gguf", None), ("Qwen2.5-7B.gguf", None),
])
def test_quantization_in_file_names(name: str, quant: str | None) -> None:
    assert quantization_in(name) == quant
