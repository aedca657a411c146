"""Model references and the shipped catalog."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmctl.errors import UsageError
from llmctl.formats import KINDS
from llmctl.store.catalog import SHIPPED, Catalog
from llmctl.store.names import HubRef, NameRef, PathRef, UrlRef, parse_reference, sanitize_name


@pytest.mark.parametrize("text, expected", [
    ("smollm2", NameRef("smollm2", None)),
    ("SmolLM2:135M", NameRef("smollm2", "135m")),
    ("llama3.2:1b-q8_0", NameRef("llama3.2", "1b-q8_0")),
    ("org/model:tag", NameRef("org/model", "tag")),
    ("./x.gguf", PathRef(Path("x.gguf"))),
    ("/abs/y.gguf", PathRef(Path("/abs/y.gguf"))),
    ("hf://org/repo", HubRef("org/repo", None, None)),
    ("hf://org/repo:Q4_K_M@main", HubRef("org/repo", "Q4_K_M", "main")),
    ("https://h/m.gguf#sha256=ABC", UrlRef("https://h/m.gguf", "abc")),
])
def test_parse_reference(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


def test_an_existing_gguf_file_is_a_path_even_without_dot_slash(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"x")
    assert parse_reference("model.gguf") == PathRef(Path("model.gguf"))


@pytest.mark.parametrize("text", ["", "Bad Name!", "a:b:c", "-x", "x:-y", "hf://onlyorg"])
def test_bad_references_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


def test_sanitize_name() -> None:
    assert sanitize_name("SmolLM2-135M-Instruct.Q4_1") == "smollm2-135m-instruct.q4_1"
    assert sanitize_name("My Model (v2)") == "my-model-v2"
    assert sanitize_name("???") == "model"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.default()


def test_shipped_catalog_entries_are_complete(catalog: Catalog) -> None:
    assert catalog.entries, f"no entries in {SHIPPED}"
    for entry in catalog.entries:
        assert entry.kind in KINDS and entry.engine and entry.format
        assert entry.sources, entry.reference
        assert entry.size > 0 and entry.min_ram >= entry.size, entry.reference
        assert entry.license and entry.homepage.startswith("https://"), entry.reference
        assert parse_reference(entry.reference) == NameRef(entry.name, entry.tag)
        for source in entry.sources:
            assert source.type in ("package", "hf", "url"), entry.reference
            if source.type == "hf":
                assert re.fullmatch(r"[\w.-]+/[\w.-]+", source.options["repo"])
            if source.type == "hf" and entry.format == "gguf":
                assert entry.quantization in source.files, (entry.reference, source.files)
                assert all(f.endswith(".gguf") for f in source.files.values())
            elif source.type == "hf":  # a folder model (ONNX, diffusers, Core ML): patterns
                assert source.options["allow_patterns"], entry.reference
                if entry.kind == "image":
                    assert entry.parameters.get("steps"), entry.reference
            if source.type == "url":
                assert source.options["url"].startswith("https://"), entry.reference
            for digest in source.options.get("sha256", {}).values():
                assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_one_default_tag_per_name(catalog: Catalog) -> None:
    for name in catalog.names():
        defaults = [e.tag for e in catalog.entries if e.name == name and e.default]
        assert len(defaults) <= 1, (name, defaults)
        assert catalog.default_tag(name) is not None, name


def test_find_default_and_variants(catalog: Catalog) -> None:
    match = catalog.find("smollm2", None)
    assert match is not None and match.reference == "smollm2:135m"
    assert match.quantization == "Q4_1"
    assert catalog.find("smollm2", "135m-q4_1").tag == "135m"  # the default, spelled out
    assert catalog.find("smollm2", "135m-q9_9") is None
    assert catalog.find("nosuch", None) is None


def test_variants_of_a_multi_quantization_entry(catalog: Catalog) -> None:
    multi = [e for e in catalog.entries if len(e.quantizations) > 1]
    assert multi, "the catalog should list several quantizations for some models"
    entry = multi[0]
    other = entry.quantizations[1]
    match = catalog.find(entry.name, f"{entry.tag}-{other.lower()}")
    assert match is not None and match.quantization == other
    assert match.tag == f"{entry.tag}-{other.lower()}"
    assert match.reference in catalog.references()


def test_user_entries_override_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "mine.toml").write_text('''
[[model]]
name = "smollm2"
tag = "135m"
kind = "text"
engine = "llama"
format = "gguf"
description = "mine"
  [[model.sources]]
  type = "package"
  package = "x"
  path = "y.gguf"
''')
    catalog = Catalog.default(tmp_path)
    assert catalog.find("smollm2", "135m").entry.description == "mine"


def test_a_broken_catalog_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """One unreadable file must not take the shipped catalog down with it (issue 10)."""
    from llmctl.errors import StoreWarning

    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "bad.toml").write_text("[[model]]\nname = \n")
    with pytest.warns(StoreWarning, match="bad.toml is not valid TOML"):
        entries = Catalog.default(tmp_path).entries
    assert any(e.reference == "smollm2:135m" for e in entries)
