"""`llmctl pull hf://...` end to end, against a real Hub-compatible server (olah) on
loopback serving git repositories that hold the real SmolLM2 GGUF.

Downloads of the 98 MB file are few: most tests share one Hugging Face cache (HF_HOME), and
what a test proves about downloading it proves by the server's access log (GET requests
for the file), not by timing. Each test still has its own LLMCTL_HOME (conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line
from hubserver import HubServer, hub_server  # noqa: F401  (a fixture)

from llmctl.formats import FORMATS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANSWER = "The capital of France is Paris.\n"
TOKEN = "hf_llmctlTestSecret0123456789abcdef"


@dataclass(frozen=True)
class Repos:
    """The repositories on the test hub, and the commits that matter."""

    hub: HubServer
    smol_first: str  # test/smol's first commit: the GGUF alone
    smol_head: str  # its second commit (a README added), the tip of main; tag v1 = first
    tiny_head: str


@pytest.fixture(scope="session")
def repos(hub_server: HubServer, smollm2_gguf: Path) -> Repos:  # noqa: F811
    hub = hub_server
    first = hub.commit("test/smol", {GGUF: smollm2_gguf}, "SmolLM2 Q4_1")
    head = hub.commit("test/smol", {"README.md": "# SmolLM2\n"}, "README")
    hub.tag("test/smol", "v1", first)
    # Two GGUF files, so that a quantization has to be chosen. The same bytes under two
    # names are one git blob: the repository costs no more than one file.
    hub.commit("test/quants", {GGUF: smollm2_gguf,
                               "SmolLM2-135M-Instruct.Q8_0.gguf": smollm2_gguf}, "quants")
    # A safetensors checkpoint, with files a pull must leave out: the pickled duplicate
    # of the weights and the README.
    tiny = hub.commit("test/tiny", {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 16}),
        "model.safetensors": _safetensors(16 * 16),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
        "chat_template.jinja": "{{ messages }}",
        "pytorch_model.bin": bytes(2048),
        "README.md": "tiny\n",
    }, "tiny")
    # A diffusers pipeline: component folders, with duplicates (.bin, a fp16 variant, a
    # single-file .ckpt) a pull must leave out.
    hub.commit("test/pipeline", {
        "model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline",
                                        "unet": ["diffusers", "UNet2DConditionModel"],
                                        "scheduler": ["diffusers", "DDIMScheduler"]}),
        "unet/config.json": json.dumps({"sample_size": 8}),
        "unet/diffusion_pytorch_model.safetensors": _safetensors(64),
        "unet/diffusion_pytorch_model.fp16.safetensors": _safetensors(32),
        "unet/diffusion_pytorch_model.bin": bytes(512),
        "scheduler/scheduler_config.json": json.dumps({"num_train_timesteps": 10}),
        "pipeline.ckpt": bytes(512),
    }, "pipeline")
    return Repos(hub, first, head, tiny)


def _safetensors(floats: int) -> bytes:
    """A valid safetensors file holding one float32 tensor of zeros."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [floats],
                               "data_offsets": [0, 4 * floats]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes(4 * floats)


@pytest.fixture(scope="session")
def shared_hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Hugging Face cache for the tests that do not depend on what it holds."""
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(autouse=True)
def _no_outside_hub_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests set what they need; a developer's own token or offline switch must not
    # change what they see.
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
                     "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)


def hub_env(repos: Repos, hf_home: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": repos.hub.url, "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def pull_json(llmctl: Runner, env: dict[str, str], *args: str) -> dict:
    result = llmctl("pull", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def hf_blob(hf_home: Path, repo: str) -> Path:
    blobs = list((hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "blobs").iterdir())
    assert len(blobs) == 1, blobs
    return blobs[0]


def store_blobs(llmctl_home: Path) -> list[Path]:
    return sorted((llmctl_home / "blobs").iterdir())


def test_pull_by_quantization_answers_paris(llmctl: Runner, repos: Repos,
                                            shared_hf_home: Path) -> None:
    env = hub_env(repos, shared_hf_home)
    result = llmctl("pull", "hf://test/quants:Q4_1", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "test/quants:q4_1\n"

    result = llmctl("run", "test/quants:q4_1", "--temperature", "0", PARIS, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER


def test_pull_without_selector_and_at_revisions(llmctl: Runner, repos: Repos,
                                                shared_hf_home: Path) -> None:
    env = hub_env(repos, shared_hf_home)
    latest = pull_json(llmctl, env, "hf://test/smol")
    assert (latest["name"], latest["tag"], latest["format"]) == ("test/smol", "latest", "gguf")
    assert [f["name"] for f in latest["files"]] == [GGUF]
    assert latest["source"] == {"type": "hf", "repo": "test/smol",
                                "revision": repos.smol_head, "file": GGUF}

    # A commit: stored under a tag of its own, beside the tip of main.
    pinned = pull_json(llmctl, env, f"hf://test/smol@{repos.smol_first}")
    assert pinned["tag"] == f"latest-{repos.smol_first[:12]}"
    assert pinned["source"]["revision"] == repos.smol_first
    # A tag resolves to its commit, which the manifest records.
    tagged = pull_json(llmctl, env, "hf://test/smol:Q4_1@v1")
    assert tagged["tag"] == "q4_1-v1"
    assert tagged["source"]["revision"] == repos.smol_first
    # An exact file name is a selector too.
    by_file = pull_json(llmctl, env, f"hf://test/smol:{GGUF}")
    assert by_file["tag"] == "smollm2-135m-instruct.q4_1"
    # The same file every time: one blob in the store.
    assert {m["files"][0]["digest"] for m in (latest, pinned, tagged, by_file)} == {
        latest["files"][0]["digest"]}

    result = llmctl("run", "test/smol", "--temperature", "0", PARIS, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER


def test_second_pull_downloads_nothing(llmctl: Runner, repos: Repos, tmp_path: Path,
                                       llmctl_home: Path) -> None:
    hub = repos.hub
    hf_home = tmp_path / "hf-home"  # empty: the first pull must download
    env = hub_env(repos, hf_home)
    before = hub.downloads("test/smol", GGUF)

    first = llmctl("pull", "hf://test/smol", env=env)
    assert first.returncode == 0, first.stderr
    assert hub.downloads("test/smol", GGUF) == before + 1

    # Another name for the same file, and a forced pull: the server is asked about the
    # file (HEAD) but never sends it again.
    for args in (["--name", "again:one", "hf://test/smol"], ["--force", "hf://test/smol"]):
        result = llmctl("pull", *args, env=env)
        assert result.returncode == 0, result.stderr
    assert hub.downloads("test/smol", GGUF) == before + 1

    # Offline, the cache alone is enough.
    offline = llmctl("pull", "--name", "again:offline", "hf://test/smol",
                     env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == "again:offline\n"

    # Stored once: the store's blob is the Hugging Face cache's blob (a hard link).
    blobs = store_blobs(llmctl_home)
    assert len(blobs) == 1
    assert blobs[0].stat().st_ino == hf_blob(hf_home, "test/smol").stat().st_ino
    listed = llmctl("ls", env=env)
    for name in ("test/smol:latest", "again:one", "again:offline"):
        assert name in listed.stdout


def test_offline_without_cache_is_one_line(llmctl: Runner, repos: Repos,
                                           tmp_path: Path) -> None:
    env = hub_env(repos, tmp_path / "empty-hf-home", HF_HUB_OFFLINE="1")
    result = llmctl("pull", "hf://test/smol", env=env)
    assert result.returncode == 3
    line = error_line(result)
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert result.stdout == ""


def test_selector_errors_list_the_choices(llmctl: Runner, repos: Repos,
                                          shared_hf_home: Path) -> None:
    hub = repos.hub
    env = hub_env(repos, shared_hf_home)
    before = hub.downloads("test/quants")

    several = llmctl("pull", "hf://test/quants", env=env)
    assert several.returncode == 2
    assert error_line(several) == (
        "error: hf://test/quants has several GGUF files; choices: Q4_1, Q8_0; "
        "pick one, e.g. llmctl pull hf://test/quants:Q4_1")

    missing = llmctl("pull", "hf://test/quants:Q5_K_M", env=env)
    assert missing.returncode == 2
    assert error_line(missing).startswith(
        "error: hf://test/quants has no Q5_K_M file; choices: Q4_1, Q8_0")

    ambiguous = llmctl("pull", "hf://test/quants:Instruct", env=env)
    assert ambiguous.returncode == 2
    line = error_line(ambiguous)
    assert "Instruct matches several files in hf://test/quants" in line
    assert GGUF in line and "SmolLM2-135M-Instruct.Q8_0.gguf" in line

    no_file = llmctl("pull", "hf://test/tiny:weights.bin", env=env)
    assert no_file.returncode == 2
    assert "has no file or folder 'weights.bin'; choices: " in error_line(no_file)

    assert hub.downloads("test/quants") == before  # choosing downloads nothing
    assert llmctl("ls", env=env).stdout.count("test/") == 0


def test_unknown_repo_or_unreachable_hub_is_one_line(llmctl: Runner, repos: Repos,
                                                     shared_hf_home: Path) -> None:
    env = hub_env(repos, shared_hf_home)
    result = llmctl("pull", "hf://test/nope", env=env)
    assert result.returncode == 3
    assert error_line(result) == (
        f"error: cannot pull hf://test/nope: repository not found on {repos.hub.url}; "
        "check the name (or set HF_TOKEN if it is private)")

    revision = llmctl("pull", "hf://test/smol@no-such-branch", env=env)
    assert revision.returncode == 3
    assert "no-such-branch" in error_line(revision)

    # Nothing listens on port 9 (discard) of loopback here.
    down = llmctl("pull", "hf://test/nope", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert down.returncode == 3
    line = error_line(down)
    assert "http://127.0.0.1:9 cannot be reached" in line and "not in the Hugging Face" in line


def test_token_is_never_printed(llmctl: Runner, repos: Repos, shared_hf_home: Path) -> None:
    env = hub_env(repos, shared_hf_home, HF_TOKEN=TOKEN)
    runs = [
        llmctl("pull", "hf://test/nope", env=env),
        llmctl("pull", "hf://test/quants:Q5_K_M", env=env),
        llmctl("pull", "hf://test/nope", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}),
        llmctl("pull", "--json", "hf://test/tiny", env=env),
        llmctl("pull", "hf://test/smol@no-such-branch", env={**env, "LLMCTL_DEBUG": "1"}),
    ]
    assert [r.returncode for r in runs] == [3, 2, 3, 0, 3]
    for result in runs:
        assert TOKEN not in result.stdout + result.stderr
        assert TOKEN[3:12] not in result.stdout + result.stderr


def test_snapshot_pull_registers_every_file(llmctl: Runner, repos: Repos,
                                            shared_hf_home: Path, llmctl_home: Path) -> None:
    env = hub_env(repos, shared_hf_home)
    manifest = pull_json(llmctl, env, "hf://test/tiny")
    # A Hugging Face checkpoint runs on transformers, on MLX on Apple Silicon.
    assert (manifest["name"], manifest["format"], manifest["engine"]) == (
        "test/tiny", "safetensors", FORMATS["safetensors"].default_engine)
    names = ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(f["name"] for f in manifest["files"]) == names
    assert manifest["source"] == {"type": "hf", "repo": "test/tiny",
                                  "revision": repos.tiny_head, "files": names}
    assert len(store_blobs(llmctl_home)) == len(names)

    pipeline = pull_json(llmctl, env, "hf://test/pipeline")
    assert pipeline["format"] == "diffusers"
    # Names are paths inside the repository, so that the folder model keeps its layout.
    assert sorted(f["name"] for f in pipeline["files"]) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]

    # Offline, from the cache: the same files.
    offline = pull_json(llmctl, {**env, "HF_HUB_OFFLINE": "1"}, "--name", "tiny:offline",
                        "hf://test/tiny")
    assert sorted(f["name"] for f in offline["files"]) == names


def test_progress_and_output_modes(llmctl: Runner, repos: Repos,
                                   shared_hf_home: Path) -> None:
    env = hub_env(repos, shared_hf_home)
    plain = llmctl("pull", "hf://test/smol", env=env)  # stderr is a pipe here
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "test/smol:latest\n"
    assert f"test/smol:latest: pulling {GGUF}\n" in plain.stderr
    assert "\x1b[" not in plain.stderr and "it/s" not in plain.stderr

    as_json = llmctl("pull", "--json", "--force", "hf://test/smol", env=env)
    assert as_json.returncode == 0, as_json.stderr
    [line] = as_json.stdout.splitlines()
    assert json.loads(line)["source"]["repo"] == "test/smol"

    quiet = llmctl("pull", "--quiet", "--force", "hf://test/smol", env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("test/smol:latest\n", "")


def test_hub_progress_reaches_llmctl(repos: Repos, tmp_path: Path) -> None:
    """huggingface_hub's byte counts arrive in the on_progress callback, for a single
    file and for a snapshot, and huggingface_hub draws no bar of its own."""
    script = textwrap.dedent("""
        import json
        from llmctl.store.names import HubRef
        from llmctl.store.sources import hf

        for selector in ("model.safetensors", None):
            events = []
            files = hf.fetch(HubRef("test/tiny", selector, None),
                             on_progress=lambda *event: events.append(event))
            print(json.dumps({"events": events, "names": files.names}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, **hub_env(repos, tmp_path / "hf-home")})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no tqdm bar
    one, snapshot = (json.loads(line) for line in result.stdout.splitlines())

    size = len(_safetensors(16 * 16))
    assert one["names"] == ["model.safetensors"]
    # huggingface_hub's bar, then the file as used (reported even when cached).
    assert len(one["events"]) >= 2
    assert one["events"][-1] == ["model.safetensors", size, size]

    label = f"test/tiny ({len(snapshot['names'])} files)"
    assert len(snapshot["events"]) >= 2
    done = [event[1] for event in snapshot["events"]]
    assert {event[0] for event in snapshot["events"]} == {label}
    assert done == sorted(done) and done[-1] == snapshot["events"][-1][2]


def test_catalog_entry_with_hf_sources(llmctl: Runner, repos: Repos, shared_hf_home: Path,
                                       llmctl_home: Path, smollm2_gguf: Path) -> None:
    """A catalog source of type "hf" that cannot provide the model gives way to the next."""
    sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    (llmctl_home / "catalog").mkdir(parents=True)
    (llmctl_home / "catalog" / "mine.toml").write_text(textwrap.dedent(f"""
        [[model]]
        name = "mysmol"
        tag = "135m"
        kind = "text"
        engine = "llama"
        format = "gguf"
        quantization = "Q4_1"

          [[model.sources]]
          type = "hf"
          repo = "test/absent"
          files = {{ Q4_1 = "{GGUF}" }}

          [[model.sources]]
          type = "hf"
          repo = "test/smol"
          revision = "{repos.smol_first}"
          files = {{ Q4_1 = "{GGUF}" }}
          sha256 = {{ Q4_1 = "{sha256}" }}
    """))
    manifest = pull_json(llmctl, hub_env(repos, shared_hf_home), "mysmol:135m")
    assert manifest["files"][0]["digest"] == f"sha256:{sha256}"
    assert manifest["source"] == {"type": "hf", "repo": "test/smol",
                                  "revision": repos.smol_first, "file": GGUF,
                                  "quantization": "Q4_1"}


@pytest.mark.parametrize(("files", "selector", "chosen"), [
    # Q4_K names one file exactly, beside Q4_K_M; "UD-Q4_K_XL" is found between delimiters.
    (["m.Q4_K.gguf", "m.Q4_K_M.gguf"], "Q4_K", ["m.Q4_K.gguf"]),
    (["m.Q4_K_M.gguf", "m.UD-Q4_K_XL.gguf"], "q4_k_xl", ["m.UD-Q4_K_XL.gguf"]),
    # A checkpoint: one copy of the weights (not the .bin, not Mistral's consolidated
    # duplicate), its index, the tokenizer and chat template; not the README.
    (["config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "model.safetensors.index.json",
      "pytorch_model.bin", "tokenizer.model", "chat_template.jinja", "README.md"], None,
     ["chat_template.jinja", "config.json", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "model.safetensors.index.json",
      "tokenizer.model"]),
    # Core ML: the variant asked for, by folder.
    (["split_einsum/compiled/Unet.mlmodelc/model.mil", "split_einsum/compiled/vocab.json",
      "original/compiled/Unet.mlmodelc/model.mil"], "split_einsum/compiled",
     ["split_einsum/compiled/Unet.mlmodelc/model.mil", "split_einsum/compiled/vocab.json"]),
])
def test_which_files_make_the_model(files: list[str], selector: str | None,
                                    chosen: list[str]) -> None:
    from llmctl.store.names import HubRef
    from llmctl.store.sources import hf

    assert hf._choose(HubRef("org/repo", selector, None), hf._Listing(None, files)) == chosen


def test_several_core_ml_variants_need_a_choice() -> None:
    from llmctl.errors import UsageError
    from llmctl.store.names import HubRef
    from llmctl.store.sources import hf

    files = ["original/packages/Unet.mlpackage/Manifest.json",
             "split_einsum/compiled/Unet.mlmodelc/model.mil"]
    with pytest.raises(UsageError, match="choices: original/packages, split_einsum/compiled"):
        hf._choose(HubRef("org/repo", None, None), hf._Listing(None, files))


@pytest.mark.timeout(900)
def test_convert_from_the_hub_to_mlx(llmctl: Runner, repos: Repos,
                                     shared_hf_home: Path) -> None:
    """`convert hf://...` pulls through the Hub source first, then converts."""
    pytest.importorskip("mlx_lm")
    env = hub_env(repos, shared_hf_home)
    result = llmctl("convert", "hf://test/quants:Q4_1", "--to", "mlx", "-q", env=env)
    assert result.returncode == 0, result.stderr
    stored = llmctl("ls", "--json").stdout
    models = {m["name"] + ":" + m["tag"]: m for m in json.loads(stored)}
    assert "test/quants:q4_1" in models  # the GGUF, pulled on the way
    [converted] = [m for ref, m in models.items() if "mlx" in ref]
    assert converted["format"] == "mlx" and converted["engine"] == "mlx"
    assert result.stdout.strip() == f"{converted['name']}:{converted['tag']}"
