"""The MLX engine and `llmctl convert --to mlx`, on the real SmolLM2 and real mlx / mlx-lm /
transformers (Linux: mlx[cpu]).

SmolLM2's GGUF is converted to MLX 4-bit once per session by the installed `llmctl convert`
(dequantizing through transformers takes most of its ~20-70 s); each test gets a copy of
that store made of hard links (`stored_mlx`), so it starts from exactly what the conversion
registered without converting or hashing again. Generated lengths stay small: MLX on a CPU
makes a few tokens a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLX_Q4, PARIS, Converted, Runner, error_line, llmctl_executable

from llmctl.errors import UsageError, VerificationFailed
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore, sha256_file
from llmctl.store.layout import StoreLayout
from llmctl.store.manifest import Manifest, ManifestFile
from llmctl.store.model_files import model_folder
from llmctl.store.removal import plan_removal, remove

# The `done` event of `run --json`, as the llama engine writes it (tests/test_run.py).
DONE_KEYS = {"type", "model", "engine", "prompt_tokens", "generated_tokens", "prompt_seconds",
             "generate_seconds", "stop_reason", "load_seconds", "peak_memory_bytes",
             "prompt_tokens_per_second", "generate_tokens_per_second", "cached_tokens",
             "processed_tokens", "backend", "gpu_layers"}


def stored_folder(home: Path, reference: str) -> Path:
    name, tag = reference.split(":")
    layout = StoreLayout(home)
    found = manifests.load(layout, name, tag)
    assert found is not None
    return model_folder(layout, found)


# -- convert ---------------------------------------------------------------------------------

def test_convert_stores_a_4bit_mlx_model(converted: Converted) -> None:
    result = converted.result
    assert result.stdout == f"{MLX_Q4}\n"  # stdout: only the new model's name
    for step in ("dequantizing the Q4_1 weights", "converting to MLX",
                 "quantizing to 4 bits (groups of 32)", "storing", "success"):
        assert step in result.stderr
    assert "[INFO]" not in result.stdout + result.stderr  # mlx-lm's prints stay inside
    layout = StoreLayout(converted.home)
    found = manifests.load(layout, "smollm2", "135m-mlx-q4")
    assert found is not None
    assert (found.kind, found.engine, found.format) == ("text", "mlx", "mlx")
    names = {f.name for f in found.files}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "chat_template.jinja"} <= names
    assert found.source["from"] == "smollm2:135m"
    assert found.source["quantization"] == {"bits": 4, "group_size": 32}
    assert 4.4 < found.source["bits_per_weight"] < 5.5
    config = json.loads((stored_folder(converted.home, MLX_Q4) / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    # 4-bit: well under the GGUF's 98 MB (fp16 would be 270 MB).
    assert found.size < 100_000_000
    # Nothing of the work is left: no temporary folder, every blob belongs to a model.
    assert not list((converted.home / "tmp").glob("convert-*"))
    used = {f.digest for m in manifests.iter_manifests(layout) for f in m.files}
    assert BlobStore(layout).all_digests() == used


def test_show_describes_the_mlx_model(llmctl: Runner, stored_mlx: str) -> None:
    result = llmctl("show", stored_mlx, "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    summary = details["summary"]
    assert summary["architecture"] == "llama"
    assert 130_000_000 < summary["parameters"] < 140_000_000
    assert summary["quantization"] == "4-bit, groups of 32"
    assert summary["chat_template"] is True
    template = llmctl("show", stored_mlx, "--template")
    assert "<|im_start|>" in template.stdout


def test_converting_again_is_refused_without_force(llmctl: Runner, stored_mlx: str) -> None:
    result = llmctl("convert", "smollm2", "--to", "mlx", "-q")
    assert result.returncode == 2
    assert "already stored" in error_line(result) and "--force" in error_line(result)


def test_convert_of_an_unknown_model_exits_3(llmctl: Runner) -> None:
    result = llmctl("convert", "no-such-model", "--to", "mlx")
    assert result.returncode == 3
    assert "not found" in error_line(result)


@pytest.mark.parametrize(("args", "words"), [
    (("--q-bits", "7"), "--q-bits 7 is not supported"),
    (("-q", "--q-group-size", "48"), "--q-group-size 48 is not supported"),
    (("--q-bits", "0"), "--q-bits 0 is not supported"),
])
def test_bad_quantization_options_exit_2(llmctl: Runner, args: tuple[str, ...],
                                         words: str) -> None:
    result = llmctl("convert", "smollm2", "--to", "mlx", *args)
    assert result.returncode == 2
    assert words in error_line(result)
    assert llmctl("ls", "-q").stdout == ""  # refused before pulling anything


def test_unknown_targets_exit_2(llmctl: Runner) -> None:
    unknown = llmctl("convert", "smollm2", "--to", "tflite")
    assert unknown.returncode == 2
    assert "'tflite' is not one of" in error_line(unknown)


def test_an_image_model_is_refused(llmctl: Runner, tmp_path: Path) -> None:
    pipeline = tmp_path / "tiny-sd"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipeline / "unet" / "config.json").write_text("{}")
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    result = llmctl("convert", str(pipeline), "--to", "mlx")
    assert result.returncode == 2
    assert "is an image diffusers model" in error_line(result)


def test_an_interrupted_conversion_leaves_nothing(llmctl: Runner, llmctl_home: Path) -> None:
    assert llmctl("pull", "smollm2").returncode == 0
    blobs_before = set((llmctl_home / "blobs").iterdir())
    process = subprocess.Popen(
        [llmctl_executable(), "convert", "smollm2", "--to", "mlx", "-q"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:  # progress: one line per step when stderr is a pipe
        seen.append(line)
        if "dequantizing" in line:
            break
    assert any("dequantizing" in line for line in seen), "".join(seen)
    # Inside transformers' work, with files in the work folder: tens of seconds long.
    deadline = time.monotonic() + 60
    while not list((llmctl_home / "tmp").glob("convert-*/gguf/model.gguf")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert out == ""
    assert llmctl("ls", "-q").stdout == "smollm2:135m\n"
    assert not list((llmctl_home / "tmp").glob("convert-*"))
    assert set((llmctl_home / "blobs").iterdir()) == blobs_before


def test_convert_a_hugging_face_checkpoint_folder(llmctl: Runner, converted: Converted,
                                                  tmp_path: Path) -> None:
    """The safetensors route (no GGUF): a small random-weight Llama written by transformers
    with SmolLM2's tokenizer, converted from its folder and run by path and from the
    store."""
    import torch
    import transformers

    folder = tmp_path / "tiny-llama"
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    mlx_folder = stored_folder(converted.home, MLX_Q4)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(mlx_folder / name, folder / name)

    direct = llmctl("run", str(folder), "--engine", "mlx", "--temperature", "0",
                    "--max-tokens", "3", "--json", "Hi")
    assert direct.returncode == 0, direct.stderr
    done = json.loads(direct.stdout.splitlines()[-1])
    assert (done["engine"], done["generated_tokens"]) == ("mlx", 3)
    assert llmctl("ls", "-q").stdout == ""  # run by path: not stored

    result = llmctl("convert", str(folder), "--to", "mlx")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tiny-llama:mlx\n"
    assert "dequantizing" not in result.stderr
    run = llmctl("run", "tiny-llama:mlx", "--temperature", "0", "--max-tokens", "3", "--json",
                 "Hi")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["generated_tokens"] == 3


# -- run and chat on the mlx engine ----------------------------------------------------------

def test_run_answers_paris(llmctl: Runner, stored_mlx: str) -> None:
    result = llmctl("run", stored_mlx, "--engine", "mlx", "--temperature", "0",
                    "--max-tokens", "12", PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.endswith("\n")
    assert "\x1b" not in result.stdout + result.stderr


def test_json_events_have_the_llama_engines_shape(llmctl: Runner, stored_mlx: str) -> None:
    # No --engine: the format (mlx) chooses the engine.
    result = llmctl("run", stored_mlx, "--temperature", "0", "--max-tokens", "12", "--json",
                    PARIS)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert all(set(e) == {"type", "text"} for e in tokens)
    assert set(done) == DONE_KEYS
    assert (done["model"], done["engine"]) == (MLX_Q4, "mlx")
    assert "Paris" in "".join(t["text"] for t in tokens)
    assert done["generated_tokens"] == len(tokens)
    assert done["stop_reason"] == "stop"
    assert done["prompt_tokens"] > 10
    assert done["prompt_tokens_per_second"] > 0 and done["generate_tokens_per_second"] > 0
    assert done["load_seconds"] > 0 and done["peak_memory_bytes"] > 50_000_000


def test_chat_through_a_pipe_on_mlx(llmctl: Runner, stored_mlx: str) -> None:
    result = llmctl("chat", stored_mlx, "--engine", "mlx", "--temperature", "0",
                    "--max-tokens", "12", input=PARIS + "\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_mlx_engine_on_a_gguf_model_is_a_usage_error(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--engine", "mlx", "Hi")
    assert result.returncode == 2
    line = error_line(result)
    assert "the mlx engine cannot run gguf models" in line
    assert "llmctl convert MODEL --to mlx" in line


def test_llama_engine_on_an_mlx_model_is_a_usage_error(llmctl: Runner, stored_mlx: str
                                                       ) -> None:
    result = llmctl("run", stored_mlx, "--engine", "llama", "Hi")
    assert result.returncode == 2
    assert "the llama engine cannot run mlx models" in error_line(result)


def test_a_folder_pulled_by_path_runs(llmctl: Runner, converted: Converted) -> None:
    folder = stored_folder(converted.home, MLX_Q4)  # a folder of links, as users have them
    pulled = llmctl("pull", str(folder), "--name", "mine:q4")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == "mine:q4\n"
    result = llmctl("run", "mine:q4", "--temperature", "0", "--max-tokens", "2", "--json",
                    PARIS)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout.splitlines()[-1])
    assert done["engine"] == "mlx"


# -- the engine in-process -------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(converted: Converted):
    from llmctl.engines.mlx import load
    from llmctl.engines.text import LoadOptions

    llm = load(stored_folder(converted.home, MLX_Q4), LoadOptions())
    yield llm
    llm.close()


def _run(engine, messages, options):
    from llmctl.engines.text import Done

    events = list(engine.generate(messages, options))
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events[:-1]), events[-1].stats


def test_engine_seed_drives_sampling(engine) -> None:
    from llmctl.engines.text import GenerationOptions, Message

    # A short system prompt of our own keeps SmolLM2's default one (30 tokens) out: prompt
    # processing is what costs most on a CPU.
    story = [Message("system", "Tell stories."), Message("user", "A story, please")]
    hot = {"temperature": 1.0, "max_tokens": 6, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    first, _ = _run(engine, story, GenerationOptions(seed=42, **hot))
    second, _ = _run(engine, story, GenerationOptions(seed=42, **hot))
    other, _ = _run(engine, story, GenerationOptions(seed=7, **hot))
    assert first == second
    assert first != other


def test_engine_max_tokens_and_ignore_eos(engine) -> None:
    from llmctl.engines.text import GenerationOptions, Message

    question = [Message("system", "You are a helpful assistant."),
                Message("user", "What is the capital of France?")]
    reply, stats = _run(engine, question, GenerationOptions(temperature=0, max_tokens=12))
    assert stats.stop_reason == "stop" and stats.generated_tokens < 12
    assert "Paris" in reply
    _, short = _run(engine, question, GenerationOptions(temperature=0, max_tokens=1))
    assert (short.generated_tokens, short.stop_reason) == (1, "length")
    # Past the reply's end-of-turn token when told to ignore it (what benchmarks do).
    _, longer = _run(engine, question, GenerationOptions(temperature=0, ignore_eos=True,
                                                         max_tokens=stats.generated_tokens + 2))
    assert (longer.generated_tokens, longer.stop_reason) == (stats.generated_tokens + 2,
                                                             "length")


def test_engine_counts_prompt_tokens_and_guards_the_context(converted: Converted) -> None:
    from llmctl.engines.mlx import load
    from llmctl.engines.text import GenerationOptions, LoadOptions, Message

    small = load(stored_folder(converted.home, MLX_Q4), LoadOptions(context_length=32))
    try:
        assert small.context_length == 32
        question = [Message("user", PARIS)]
        assert small.count_tokens(question) == 42  # with SmolLM2's default system prompt
        with pytest.raises(UsageError, match="42 tokens but the context holds 32"):
            list(small.generate(question, GenerationOptions(max_tokens=1)))
    finally:
        small.close()


def test_engine_upcasts_half_precision_on_a_cpu(engine) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("on a GPU the model keeps its half-precision parameters")
    dtypes = {p.dtype for _, p in tree_flatten(engine.model.parameters())}
    assert mx.float16 not in dtypes and mx.bfloat16 not in dtypes
    assert mx.uint32 in dtypes  # still 4-bit: only scales and biases got wider


# -- the store's folder models ---------------------------------------------------------------

@pytest.fixture
def layout(tmp_path: Path) -> StoreLayout:
    layout = StoreLayout(tmp_path / "store")
    layout.ensure()
    return layout


def folder_model(layout: StoreLayout, tmp_path: Path, files: dict[str, bytes],
                 name: str = "m") -> Manifest:
    entries = []
    for file_name, payload in files.items():
        source = tmp_path / "src" / name / file_name
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(payload)
        digest = sha256_file(source)
        BlobStore(layout).link(source, digest)
        entries.append(ManifestFile(file_name, digest, len(payload)))
    manifest = Manifest(name, "latest", "text", "mlx", "mlx", entries)
    manifests.save(layout, manifest)
    return manifest


FILES = {"config.json": b"{}", "model.safetensors": b"weights", "sub/tokenizer.json": b"tok"}


def test_model_folder_links_every_file_by_its_name(layout: StoreLayout, tmp_path: Path
                                                   ) -> None:
    manifest = folder_model(layout, tmp_path, FILES)
    folder = model_folder(layout, manifest)
    assert folder == layout.models / manifest.id
    for name, payload in FILES.items():
        link = folder / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.read_bytes() == payload
        digest = next(f.digest for f in manifest.files if f.name == name)
        assert link.samefile(BlobStore(layout).path(digest))
    assert not list(layout.tmp.glob("model-*"))  # built aside, then renamed


def test_model_folder_is_reused_and_rebuilt_when_stale(layout: StoreLayout, tmp_path: Path
                                                       ) -> None:
    manifest = folder_model(layout, tmp_path, FILES)
    folder = model_folder(layout, manifest)
    inode = folder.stat().st_ino
    assert model_folder(layout, manifest) == folder
    assert folder.stat().st_ino == inode  # reused, not rebuilt
    (folder / "config.json").unlink()  # damaged: rebuilt whole
    assert model_folder(layout, manifest) == folder
    assert (folder / "config.json").read_bytes() == b"{}"
    assert not list(layout.tmp.glob("stale-*"))


def test_model_folder_is_never_seen_half_built(layout: StoreLayout, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = folder_model(layout, tmp_path, FILES)
    made = []
    real_symlink = os.symlink

    def failing(src: str, dst: str) -> None:
        if made:
            raise OSError(28, "No space left on device")
        made.append(dst)
        real_symlink(src, dst)

    monkeypatch.setattr(os, "symlink", failing)
    with pytest.raises(OSError):
        model_folder(layout, manifest)
    assert not (layout.models / manifest.id).exists()
    assert not list(layout.tmp.glob("model-*"))


def test_model_folder_checks_the_blobs(layout: StoreLayout, tmp_path: Path) -> None:
    manifest = folder_model(layout, tmp_path, FILES)
    weights = next(f for f in manifest.files if f.name == "model.safetensors")
    BlobStore(layout).path(weights.digest).unlink()
    with pytest.raises(VerificationFailed, match="model.safetensors is missing"):
        model_folder(layout, manifest)
    escaping = Manifest("x", "latest", "text", "mlx", "mlx",
                        [ManifestFile("../../etc/passwd", manifest.files[0].digest, 2)])
    with pytest.raises(VerificationFailed, match="outside"):
        model_folder(layout, escaping)


def test_rm_removes_the_model_folder_with_its_last_model(layout: StoreLayout, tmp_path: Path
                                                         ) -> None:
    manifest = folder_model(layout, tmp_path, FILES)
    folder = model_folder(layout, manifest)
    remove(layout, plan_removal(layout, None, ["m:latest"]))
    assert not folder.exists()
    assert BlobStore(layout).all_digests() == set()


def test_killed_conversions_are_swept(layout: StoreLayout) -> None:
    from llmctl.convert import work_folder

    killed = layout.tmp / "convert-killed"
    (killed / "hf").mkdir(parents=True)
    running = layout.tmp / "convert-running"
    running.mkdir()
    with layout.work_lock(running.name), work_folder(layout) as work:
        assert work.is_dir()
        assert not killed.exists()  # nobody holds its lock: its llmctl is gone
        assert running.exists()  # held: another conversion is at work in it
    assert not work.exists()


@pytest.mark.parametrize("args", [("--to", "mlx", "--q-bits", "9"), ("--to", "onnx", "-q",
                                                                    "int3")])
def test_convert_help_and_store_need_no_heavy_imports(tmp_path: Path,
                                                      args: tuple[str, ...]) -> None:
    # A rejected conversion (bad options) answers before importing torch, mlx or onnx.
    result = subprocess.run(
        [llmctl_executable(), "convert", "smollm2", *args],
        capture_output=True, text=True, env={**os.environ, "LLMCTL_HOME": str(tmp_path),
                                             "PYTHONPROFILEIMPORTTIME": "1"},
        stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "mlx", "mlx_lm", "transformers", "onnxruntime_genai",
                           "onnx"}
