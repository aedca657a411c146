"""The transformers engine end to end: the real SmolLM2 as a Hugging Face folder (built from
the GGUF once per session: conftest's smollm2_hf), run through the installed `llmctl`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line, llmctl_executable

from llmctl.formats import FORMATS


def events_of(result: subprocess.CompletedProcess) -> tuple[str, list[dict], dict]:
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    return "".join(e["text"] for e in tokens), tokens, events[-1]


def test_answers_paris_at_temperature_0_with_its_chat_template(llmctl: Runner,
                                                               smollm2_hf: Path) -> None:
    result = llmctl("run", str(smollm2_hf), "--engine", "transformers", "--temperature", "0",
                    PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and result.stdout.endswith("\n")
    assert result.stderr == ""  # no library warnings or progress bars in a pipe


def test_a_safetensors_folder_runs_on_transformers_by_default_off_apple_silicon(
        llmctl: Runner, smollm2_hf: Path) -> None:
    text, tokens, done = events_of(llmctl("run", str(smollm2_hf), "--temperature", "0",
                                          "--json", PARIS))
    assert done["engine"] == FORMATS["safetensors"].default_engine
    if done["engine"] == "transformers":
        assert "Paris" in text and done["backend"] == "CPU"


def test_json_counts_add_up(llmctl: Runner, smollm2_hf: Path) -> None:
    text, tokens, done = events_of(llmctl(
        "run", str(smollm2_hf), "--engine", "transformers", "--temperature", "0",
        "--max-tokens", "12", "--json", "Count from one to twenty in words."))
    assert done["type"] == "done" and done["engine"] == "transformers"
    # One token event per generated token (text may wait for a character's next byte).
    assert len(tokens) == done["generated_tokens"] == 12
    assert done["stop_reason"] == "length"
    assert done["processed_tokens"] == done["prompt_tokens"] > 10  # no cache on one prompt
    assert done["cached_tokens"] == 0
    assert done["prompt_tokens_per_second"] > 0 and done["generate_tokens_per_second"] > 0
    assert done["peak_memory_bytes"] > 200_000_000  # torch and the float32 weights
    assert done["load_seconds"] > 0
    assert text.strip()


def test_the_same_seed_gives_the_same_reply(llmctl: Runner, smollm2_hf: Path) -> None:
    def sample(seed: str) -> str:
        result = llmctl("run", str(smollm2_hf), "--engine", "transformers", "--seed", seed,
                        "--temperature", "0.9", "--max-tokens", "24", "Tell me a story.")
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = sample("7")
    assert sample("7") == first
    # Sampled, not greedy: some seed of a few gives another story.
    greedy = llmctl("run", str(smollm2_hf), "--engine", "transformers", "--temperature", "0",
                    "--max-tokens", "24", "Tell me a story.").stdout
    assert any(sample(seed) != greedy for seed in ("1", "2", "3"))


def test_a_stored_checkpoint_shows_its_engine_and_runs_by_name(
        llmctl: Runner, smollm2_hf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(smollm2_hf, folder)
    pulled = llmctl("pull", str(folder), "--name", "smol:hf")
    assert pulled.returncode == 0, pulled.stderr
    [model] = json.loads(llmctl("ls", "--json").stdout)
    engine = FORMATS["safetensors"].default_engine
    assert (model["format"], model["engine"]) == ("safetensors", engine)
    line = llmctl("ls").stdout.splitlines()[1].split()
    assert line[0] == "smol:hf" and engine in line and "safetensors" in line
    assert json.loads(llmctl("show", "smol:hf", "--json").stdout)["engine"] == engine
    assert llmctl("ls", "--engine", engine, "-q").stdout == "smol:hf\n"
    ran = llmctl("run", "smol:hf", "--engine", "transformers", "--temperature", "0", PARIS)
    assert ran.returncode == 0 and "Paris" in ran.stdout, ran.stderr


def test_chat_through_a_pipe_answers_each_line(llmctl: Runner, smollm2_hf: Path) -> None:
    result = llmctl("chat", str(smollm2_hf), "--engine", "transformers", "--temperature", "0",
                    "--json", input=f"{PARIS}\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr
    done = [json.loads(line) for line in result.stdout.splitlines()
            if json.loads(line)["type"] == "done"]
    assert len(done) == 2 and "Paris" in done[0]["text"] and "Berlin" in done[1]["text"]
    # transformers' kernels are not split-invariant: an exact reply processes it all again.
    assert done[1]["cached_tokens"] == 0
    assert done[1]["prompt_tokens"] > done[0]["prompt_tokens"] + 5


def test_constrained_json_output(llmctl: Runner, smollm2_hf: Path) -> None:
    result = llmctl("run", str(smollm2_hf), "--engine", "transformers", "--temperature", "0",
                    "--format", "json", "--max-tokens", "60", "--json",
                    "List three colours as a JSON array of strings.")
    _, _, done = events_of(result)
    assert isinstance(done["value"], list | dict)


def test_bench_measures_the_transformers_engine(llmctl: Runner, smollm2_hf: Path) -> None:
    result = llmctl("bench", str(smollm2_hf), "--engine", "transformers", "-p", "16", "-n",
                    "4", "-r", "1", "--no-load", "-o", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["test"] for r in rows} == {"pp16", "ttft16", "tg4"}
    assert all(r["engine"] == "transformers" and r["samples"] for r in rows)


def test_ctrl_c_exits_130(smollm2_hf: Path) -> None:
    process = subprocess.Popen(
        [llmctl_executable(), "run", str(smollm2_hf), "--engine", "transformers",
         "--temperature", "0", "--max-tokens", "2000", "Write a very long story about a "
         "dragon."], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    first = process.stdout.read(20)  # text streams: the model is generating
    assert first
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert (first + out).endswith("\n")


@pytest.fixture(scope="module")
def pickled_folder(tmp_path_factory: pytest.TempPathFactory, smollm2_hf: Path) -> Path:
    """A tiny random-weight Llama saved the old way, as pytorch_model.bin (a pickle), with
    SmolLM2's tokenizer: built in a process of its own (torch stays out of this one)."""
    folder = tmp_path_factory.mktemp("pickled") / "tiny-pickled"
    script = (
        "import sys, torch, transformers\n"
        "config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64,"
        " intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,"
        " num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,"
        " eos_token_id=2)\n"
        "torch.manual_seed(0)\n"
        "model = transformers.LlamaForCausalLM(config)\n"
        "torch.save(model.state_dict(), sys.argv[1] + '/pytorch_model.bin')\n"
        "config.save_pretrained(sys.argv[1])\n")
    folder.mkdir()
    built = subprocess.run([str(Path(llmctl_executable()).with_name("python")), "-c", script,
                            str(folder)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(smollm2_hf / name, folder / name)
    return folder


def test_pickled_weights_are_refused_unless_trusted(llmctl: Runner,
                                                    pickled_folder: Path) -> None:
    refused = llmctl("run", str(pickled_folder), "--max-tokens", "3", "Hi")
    assert refused.returncode == 2
    line = error_line(refused)
    assert "pickle" in line and "--trust-pickle" in refused.stderr
    trusted = llmctl("run", str(pickled_folder), "--trust-pickle", "--temperature", "0",
                     "--max-tokens", "3", "--json", "Hi")
    _, tokens, done = events_of(trusted)
    assert (done["engine"], done["generated_tokens"], len(tokens)) == ("transformers", 3, 3)


@pytest.mark.parametrize(("args", "words"), [
    (("--device", "tpu"), "unknown --device 'tpu'"),
    (("--device", "cuda"), "no CUDA device"),
    (("--device", "mps"), "MPS"),
    (("--dtype", "int3"), "unknown --dtype 'int3'"),
    (("--ctx", "100000"), "--ctx 100000 is more than"),
])
def test_bad_options_are_usage_errors(llmctl: Runner, smollm2_hf: Path,
                                      args: tuple[str, ...], words: str) -> None:
    result = llmctl("run", str(smollm2_hf), "--engine", "transformers", *args, "Hi")
    assert result.returncode == 2, result.stderr
    assert words in error_line(result)


def test_bfloat16_on_the_cpu_still_answers(llmctl: Runner, smollm2_hf: Path) -> None:
    result = llmctl("run", str(smollm2_hf), "--engine", "transformers", "--dtype", "bf16",
                    "--temperature", "0", "--max-tokens", "4", "--json", PARIS)
    _, tokens, done = events_of(result)
    assert done["generated_tokens"] == 4


def test_torch_options_on_another_engine_are_noted(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--device", "cpu", "--temperature", "0", PARIS)
    assert result.returncode == 0, result.stderr
    assert "--device applies to the transformers engine, not to llama" in result.stderr


def test_the_memory_guard_counts_float32_weights(llmctl: Runner, smollm2_hf: Path) -> None:
    # 270 MB of float16 weights are 540 MB once upcast for the CPU: with the 4096-token
    # KV cache and working memory, about 800 MB; kept in float16, about 530 MB.
    refused = llmctl("run", str(smollm2_hf), "--engine", "transformers", "Hi",
                     env={"LLMCTL_MEMORY_LIMIT": "700M"})
    assert refused.returncode == 5, refused.stderr
    assert "memory" in error_line(refused)
    fits_half = llmctl("run", str(smollm2_hf), "--engine", "transformers", "--dtype", "fp16",
                       "--max-tokens", "1", "Hi", env={"LLMCTL_MEMORY_LIMIT": "700M"})
    assert fits_half.returncode != 5, fits_half.stderr


def test_without_torch_the_error_names_the_extra(llmctl: Runner, smollm2_hf: Path,
                                                 tmp_path: Path) -> None:
    # A torch that fails to import, ahead of the real one on the path: as on a machine
    # where llmctl was installed without the torch extra (or with a broken torch).
    blocked = tmp_path / "blocked" / "torch"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    result = llmctl("run", str(smollm2_hf), "--engine", "transformers", "Hi",
                    env={"PYTHONPATH": str(blocked.parent)})
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    assert "the transformers engine cannot run here" in line
    assert "pip install 'llmctl[torch]'" in line
