"""ONNX Runtime GenAI folders in the store: `llmctl pull` of a local build and of Hugging
Face repositories holding one build or several side by side (Microsoft's layout), and the
catalog's ONNX entries; end to end, on a real build of SmolLM2 made once per module with
onnxruntime-genai's own model builder, served by the loopback Hub (olah) of test_pull_hf.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line
from hubserver import HubServer, hub_server  # noqa: F401  (a fixture)
from test_pull_hf import _no_outside_hub_settings, _safetensors, pull_json  # noqa: F401

from llmctl.errors import UsageError
from llmctl.store.catalog import Catalog
from llmctl.store.names import HubRef
from llmctl.store.sources import hf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CPU = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
CUDA = "cuda/cuda-int4-rtn-block-32"


@pytest.fixture(scope="module")
def onnx_build(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as an ONNX Runtime GenAI folder (int4, CPU), made by the real builder:
    model.onnx, model.onnx.data, genai_config.json, the tokenizer files."""
    root = tmp_path_factory.mktemp("onnx")
    out = root / "smollm2-onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(smollm2_hf),
         "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(root / "cache")],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"genai_config.json", "model.onnx", "model.onnx.data"} <= {
        p.name for p in out.iterdir()}
    return out


def build_files(build: Path) -> list[str]:
    return sorted(p.name for p in build.iterdir() if p.is_file())


@dataclass(frozen=True)
class OnnxRepos:
    hub: HubServer
    hf_home: Path  # one Hugging Face cache for this module's pulls

    def env(self, **extra: str) -> dict[str, str]:
        return {"HF_ENDPOINT": self.hub.url, "HF_HOME": str(self.hf_home),
                "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@pytest.fixture(scope="module")
def onnx_repos(hub_server: HubServer, onnx_build: Path,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> OnnxRepos:
    hub = hub_server
    build = {name: onnx_build / name for name in build_files(onnx_build)}
    furniture = {"README.md": "# SmolLM2 ONNX\n", "LICENSE": "Apache-2.0\n"}
    # One build at the top, beside the repository's furniture.
    hub.commit("test/onnx-top", {**build, **furniture}, "one build")
    # Two builds side by side, as Microsoft publishes them (the same bytes under two
    # folders are one git blob: the repository costs no more than one build).
    hub.commit("test/onnx-builds", {
        **{f"{CPU}/{name}": path for name, path in build.items()},
        **{f"{CUDA}/{name}": path for name, path in build.items()}, **furniture},
        "two builds")
    # genai_config.json without an .onnx graph: no ONNX model, alone or beside a checkpoint.
    config = (onnx_build / "genai_config.json").read_text()
    hub.commit("test/genai-config-only", {"genai_config.json": config,
                                          "tokenizer.json": "{}", **furniture}, "no graph")
    hub.commit("test/genai-config-checkpoint", {
        "genai_config.json": config,
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 16}),
        "model.safetensors": _safetensors(16 * 16), "tokenizer.json": "{}"}, "checkpoint")
    return OnnxRepos(hub, tmp_path_factory.mktemp("onnx-hf-home"))


def stored(llmctl: Runner, reference: str) -> dict:
    """The model as `ls --json` lists it."""
    result = llmctl("ls", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"] + ":" + m["tag"]: m for m in json.loads(result.stdout)}
    assert reference in models, list(models)
    return models[reference]


def test_pull_a_local_build(llmctl: Runner, onnx_build: Path) -> None:
    result = llmctl("pull", "--json", str(onnx_build))
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert (manifest["name"], manifest["tag"]) == ("smollm2-onnx", "latest")
    assert (manifest["kind"], manifest["engine"], manifest["format"]) == ("text", "onnx", "onnx")
    assert sorted(f["name"] for f in manifest["files"]) == build_files(onnx_build)

    listed = stored(llmctl, "smollm2-onnx:latest")
    assert (listed["kind"], listed["engine"], listed["format"]) == ("text", "onnx", "onnx")


def test_show_a_pulled_build(llmctl: Runner, onnx_build: Path) -> None:
    assert llmctl("pull", "-q", str(onnx_build)).returncode == 0
    shown = llmctl("show", "--json", "smollm2-onnx")
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert (details["kind"], details["engine"], details["format"]) == ("text", "onnx", "onnx")


def test_a_local_folder_of_builds_names_them(llmctl: Runner, onnx_build: Path,
                                             tmp_path: Path) -> None:
    """A folder downloaded in Microsoft's layout is not one model: the builds are named."""
    for folder in (CPU, CUDA):
        shutil.copytree(onnx_build, tmp_path / "repo" / folder, copy_function=_link)
    result = llmctl("pull", str(tmp_path / "repo"))
    assert result.returncode == 2
    line = error_line(result)
    assert f"ONNX Runtime GenAI builds in subfolders: {CPU}, {CUDA}" in line
    assert f"llmctl pull {tmp_path / 'repo' / CPU}" in line

    # A build folder itself is pulled as it is.
    build = llmctl("pull", "--json", str(tmp_path / "repo" / CPU))
    assert build.returncode == 0, build.stderr
    assert json.loads(build.stdout)["format"] == "onnx"


def test_a_local_genai_config_without_a_graph_is_no_model(llmctl: Runner, onnx_build: Path,
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "half"
    folder.mkdir()
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(onnx_build / name, folder / name)
    result = llmctl("pull", str(folder))
    assert result.returncode == 2
    assert "holds no .gguf file" in error_line(result)
    assert llmctl("ls", "-q").stdout == ""


def test_pull_a_build_at_the_top_of_a_repository(llmctl: Runner, onnx_repos: OnnxRepos,
                                                 onnx_build: Path) -> None:
    manifest = pull_json(llmctl, onnx_repos.env(), "hf://test/onnx-top")
    assert (manifest["name"], manifest["tag"]) == ("test/onnx-top", "latest")
    assert (manifest["kind"], manifest["engine"], manifest["format"]) == ("text", "onnx", "onnx")
    # The build's files, not the README or LICENSE beside them.
    assert sorted(f["name"] for f in manifest["files"]) == build_files(onnx_build)
    listed = stored(llmctl, "test/onnx-top:latest")
    assert (listed["engine"], listed["format"]) == ("onnx", "onnx")


def test_several_builds_need_a_choice(llmctl: Runner, onnx_repos: OnnxRepos,
                                      onnx_build: Path) -> None:
    hub, env = onnx_repos.hub, onnx_repos.env()
    before = hub.downloads("test/onnx-builds")
    several = llmctl("pull", "hf://test/onnx-builds", env=env)
    assert several.returncode == 2
    assert error_line(several) == (
        f"error: hf://test/onnx-builds holds several ONNX Runtime GenAI builds; choices: "
        f"{CPU}, {CUDA}; pick one, e.g. llmctl pull hf://test/onnx-builds:{CPU}")
    assert hub.downloads("test/onnx-builds") == before  # choosing downloads nothing
    assert llmctl("ls", "-q").stdout == ""

    manifest = pull_json(llmctl, env, f"hf://test/onnx-builds:{CPU}")
    assert (manifest["kind"], manifest["engine"], manifest["format"]) == ("text", "onnx", "onnx")
    # Only that folder's files, under their paths in the repository.
    assert sorted(f["name"] for f in manifest["files"]) == [
        f"{CPU}/{name}" for name in build_files(onnx_build)]
    listed = stored(llmctl, f"{manifest['name']}:{manifest['tag']}")
    assert listed["format"] == "onnx"


def test_a_genai_config_without_a_graph_is_not_onnx(llmctl: Runner,
                                                    onnx_repos: OnnxRepos) -> None:
    env = onnx_repos.env()
    alone = llmctl("pull", "hf://test/genai-config-only", env=env)
    assert alone.returncode == 2
    assert "cannot tell which files of hf://test/genai-config-only make a model" in (
        error_line(alone))
    checkpoint = pull_json(llmctl, env, "hf://test/genai-config-checkpoint")
    assert checkpoint["format"] == "safetensors"


def test_shipped_onnx_entries(llmctl: Runner) -> None:
    every = llmctl("ls", "--available", "--json")
    assert every.returncode == 0, every.stderr
    onnx = [m for m in json.loads(every.stdout) if m["engine"] == "onnx"]
    references = {m["reference"] for m in onnx}
    assert "phi3:mini-onnx" in references
    assert all(m["format"] == "onnx" and m["kind"] == "text" and m["shipped"] for m in onnx)

    filtered = llmctl("ls", "--available", "--engine", "onnx", "--json")
    assert filtered.returncode == 0, filtered.stderr
    assert {m["reference"] for m in json.loads(filtered.stdout)} == references
    quiet = llmctl("ls", "--available", "--engine", "onnx", "-q")
    assert sorted(quiet.stdout.split()) == sorted(references)

    # Each takes one build folder of its repository.
    for entry in Catalog.default().entries:
        if entry.format == "onnx":
            [source] = entry.sources
            assert source.type == "hf" and source.options["allow_patterns"], entry.reference


def test_run_the_pulled_builds(llmctl: Runner, onnx_repos: OnnxRepos, onnx_build: Path) -> None:
    env = onnx_repos.env()
    assert llmctl("pull", "-q", str(onnx_build)).returncode == 0
    # A build kept in a folder of the repository's layout: the engine finds it there.
    nested = pull_json(llmctl, env, f"hf://test/onnx-builds:{CPU}")
    for model in ("smollm2-onnx", f"{nested['name']}:{nested['tag']}"):
        result = llmctl("run", model, "--temperature", "0", PARIS, env=env)
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout, result.stdout


# -- which files of a repository make the model (no server) --------------------------------

def _phi3_layout() -> list[str]:
    """microsoft/Phi-3-mini-4k-instruct-onnx as the Hub lists it: six builds in three
    folders, each with its graph, weights, genai_config.json and tokenizer files."""
    builds = ["cpu_and_mobile/cpu-int4-rtn-block-32",
              "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4", "cuda/cuda-fp16",
              "cuda/cuda-int4-awq-block-128", "cuda/cuda-int4-rtn-block-32",
              "directml/directml-int4-awq-block-128"]
    names = [".gitattributes", "LICENSE", "README.md"]
    for build in builds:
        stem = "phi3-mini-4k-instruct-" + build.split("/")[1]
        names += [f"{build}/{name}" for name in (
            "added_tokens.json", "config.json", "configuration_phi3.py", "genai_config.json",
            f"{stem}.onnx", f"{stem}.onnx.data", "special_tokens_map.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json")]
    return names


def _choose(files: list[str], selector: str | None = None) -> list[str]:
    return hf._choose(HubRef("org/repo", selector, None), hf._Listing(None, files))


def test_microsofts_layout_names_its_builds() -> None:
    files = _phi3_layout()
    with pytest.raises(UsageError) as every:
        _choose(files)
    assert "several ONNX Runtime GenAI builds; choices: cpu_and_mobile/cpu-int4-rtn-block-32, " \
           "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4, cuda/cuda-fp16" in str(every.value)
    assert every.value.hint == ("pick one, e.g. llmctl pull "
                                "hf://org/repo:cpu_and_mobile/cpu-int4-rtn-block-32")
    # A folder holding two of them still needs a choice, between those two.
    with pytest.raises(UsageError, match=r"hf://org/repo:cpu_and_mobile holds several ONNX "
                                         r"Runtime GenAI builds; choices: cpu_and_mobile/cpu-"
                                         r"int4-rtn-block-32, cpu_and_mobile/cpu-int4-rtn-"
                                         r"block-32-acc-level-4$"):
        _choose(files, "cpu_and_mobile")
    chosen = _choose(files, CPU)
    assert len(chosen) == 10 and all(f.startswith(CPU + "/") for f in chosen)


@pytest.mark.parametrize(("files", "chosen"), [
    # A build at the top, without the furniture; a folder that is no build is left out.
    (["genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "README.md",
      "LICENSE", "images/demo.png", "onnx/model_q4.onnx"],
     ["genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"]),
    # One build in a folder: its files under their repository paths.
    (["README.md", f"{CPU}/genai_config.json", f"{CPU}/model.onnx", f"{CPU}/README.md"],
     [f"{CPU}/genai_config.json", f"{CPU}/model.onnx"]),
    # Beside a checkpoint, genai_config.json without a graph is just another JSON file.
    (["config.json", "model.safetensors", "genai_config.json", "tokenizer.json"],
     ["config.json", "genai_config.json", "model.safetensors", "tokenizer.json"]),
])
def test_one_build_is_chosen(files: list[str], chosen: list[str]) -> None:
    assert sorted(_choose(files)) == chosen


def _link(source: str, target: str) -> None:
    Path(target).hardlink_to(source)
