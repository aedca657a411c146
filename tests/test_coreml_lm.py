"""`llmctl convert --to coreml` for a language model, and the Core ML text engine, on the
real SmolLM2 and the real torch, transformers and coremltools.

The SmolLM2 Hugging Face folder (`smollm2_hf`) is converted once per module by the
installed `llmctl convert`, fp16 and int4 with a 128-token KV cache, into one store; each
test that needs the store gets a copy of it made of hard links. What is tested on Linux:
the conversion (its check, the package's interface and ops, the folder, refusals, an
interrupted run) and the engine's stream with a stand-in for Core ML's MLModel that
computes the same interface in PyTorch (`TorchStandIn`). Core ML's own predictions need
macOS and are not run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PARIS, Runner, children_running, error_line, llmctl_executable
from test_mlx import stored_folder

from llmctl.engines import coreml_text
from llmctl.engines.text import GenerationOptions, LoadOptions, Message
from llmctl.formats import coreml as coreml_format
from llmctl.store import manifest as manifests
from llmctl.store.blobs import BlobStore
from llmctl.store.layout import StoreLayout

CONTEXT = 128
QUANTIZE = ("fp16", "int4")
CHILD = "llmctl.convert.coreml_lm"
NAME = "smollm2-135m-instruct"
# SmolLM2-135M: 30 layers, 3 key/value heads of 64.
CACHE_SHAPE = [30, 1, 3, CONTEXT, 64]
FOLDER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "config.json", "generation_config.json", "conversion.json"}


@dataclass(frozen=True)
class CoremlStore:
    home: Path  # holds the SmolLM2 folder's fp16 and int4 conversions
    references: dict[str, str]  # quantize -> name:tag, as convert printed it
    results: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def coreml_store(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> CoremlStore:
    home = tmp_path_factory.mktemp("coreml-lm-module") / "home"
    references, results = {}, {}
    for quantize in QUANTIZE:
        result = subprocess.run(
            [llmctl_executable(), "convert", str(smollm2_hf), "--to", "coreml", "-q",
             quantize, "--ctx", str(CONTEXT)], capture_output=True, text=True, timeout=1800,
            stdin=subprocess.DEVNULL, env={**os.environ, "LLMCTL_HOME": str(home)})
        assert result.returncode == 0, result.stderr
        references[quantize] = result.stdout.strip()
        results[quantize] = result
    return CoremlStore(home, references, results)


@pytest.fixture
def stored(coreml_store: CoremlStore, llmctl_home: Path) -> dict[str, str]:
    """The test's own store: the module's, as hard links; quantize -> reference."""
    shutil.copytree(coreml_store.home, llmctl_home, symlinks=True, copy_function=os.link,
                    ignore=shutil.ignore_patterns("*.lock", "locks"))
    return coreml_store.references


def folder_of(store: CoremlStore, quantize: str) -> Path:
    return stored_folder(store.home, store.references[quantize])


def spec_of(folder: Path) -> Any:
    import coremltools as ct

    return ct.utils.load_spec(str(folder / coreml_text.PACKAGE))


def op_counts(spec: Any) -> dict[str, int]:
    from llmctl.convert.coreml_lm import op_counts as count

    return count(spec)


def children_for(home: Path) -> list[int]:
    """Conversion children writing under `home` (their output folder is in its tmp/)."""
    return children_running(CHILD, home)


# -- convert ---------------------------------------------------------------------------------

def test_convert_stores_fp16_and_int4_language_models(coreml_store: CoremlStore) -> None:
    layout = StoreLayout(coreml_store.home)
    sizes = {}
    for quantize, reference in coreml_store.references.items():
        result = coreml_store.results[quantize]
        assert reference == f"{NAME}:coreml-{quantize}-ctx{CONTEXT}"
        assert result.stdout == f"{reference}\n"  # stdout: only the new model's name
        for words in ("loading the checkpoint in float32", "tracing the model with its KV "
                      "cache as state", "checking the traced model against transformers' "
                      "(16 greedy tokens)", "converting to Core ML: PyTorch ops to MIL",
                      "checking the model in float16", "storing", "success",
                      "checked before export: 16 greedy tokens the same as transformers'"):
            assert words in result.stderr, result.stderr
        assert ("quantizing the weights to int4 (blocks of 32)" in result.stderr) == (
            quantize == "int4")
        # What torch and coremltools print stays out of llmctl's output.
        assert "Running MIL" not in result.stderr and "Traceback" not in result.stderr
        name, tag = reference.split(":")
        found = manifests.load(layout, name, tag)
        assert found is not None
        assert (found.kind, found.engine, found.format) == ("text", "coreml", "coreml")
        assert found.source["to"] == "coreml"
        assert found.source["options"] == {"quantize": quantize, "context_length": CONTEXT,
                                           "min_deployment_target": "macOS15"}
        assert found.source["architecture"] == "LlamaForCausalLM"
        assert found.source["versions"]["coremltools"].startswith("9.")
        sizes[quantize] = found.size
    # fp16: 135 M parameters at 2 bytes (the tied embedding once); int4: 4.5 bits a weight
    # (a float16 scale per 32), far below.
    assert 250_000_000 < sizes["fp16"] < 300_000_000
    assert sizes["int4"] < 100_000_000
    assert not list((coreml_store.home / "tmp").glob("convert-*"))
    used = {f.digest for m in manifests.iter_manifests(layout) for f in m.files}
    assert BlobStore(layout).all_digests() == used


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_the_package_is_a_stateful_ml_program(coreml_store: CoremlStore, quantize: str
                                              ) -> None:
    from coremltools.proto import FeatureTypes_pb2

    spec = spec_of(folder_of(coreml_store, quantize))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: states need it
    fp16 = FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    int32 = FeatureTypes_pb2.ArrayFeatureType.INT32
    inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
    assert list(inputs) == ["inputIds", "causalMask"]
    assert inputs["inputIds"].dataType == int32
    assert inputs["causalMask"].dataType == fp16

    def ranges(array: Any) -> list[tuple[int, int]]:
        return [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]

    # Flexible: 1..context tokens per prediction, after 0..context - N cached positions.
    assert ranges(inputs["inputIds"]) == [(1, 1), (1, CONTEXT)]
    assert ranges(inputs["causalMask"]) == [(1, 1), (1, 1), (1, CONTEXT), (1, CONTEXT)]
    assert [(f.name, f.type.multiArrayType.dataType) for f in spec.description.output] == [
        ("logits", fp16)]
    states = {f.name: f.type.stateType.arrayType for f in spec.description.state}
    assert list(states) == ["keyCache", "valueCache"]
    for array in states.values():
        assert list(array.shape) == CACHE_SHAPE and array.dataType == fp16
    ops = op_counts(spec)
    # Every layer writes its keys and values into the state and reads the cache back.
    assert ops["write_state"] == 2 * 30 and ops["slice_update"] == 2 * 30
    blockwise = ops.get("constexpr_blockwise_shift_scale", 0)
    if quantize == "int4":
        assert blockwise >= ops["linear"]  # every projection, and the embedding
    else:
        assert blockwise == 0


def test_the_folder_holds_the_tokenizer_and_the_check(coreml_store: CoremlStore,
                                                      smollm2_hf: Path) -> None:
    for quantize in QUANTIZE:
        folder = folder_of(coreml_store, quantize)
        names = {p.name for p in folder.iterdir()}
        assert names == FOLDER_FILES | {"Model.mlpackage"}
        for name in FOLDER_FILES - {"conversion.json"}:
            assert (folder / name).read_bytes() == (smollm2_hf / name).read_bytes()
        report = json.loads((folder / "conversion.json").read_text())
        assert report["options"] == {"quantize": quantize, "context_length": CONTEXT,
                                     "min_deployment_target": "macOS15"}
        check = report["check"]
        assert check["steps"] == 16 and check["same"] is True
        assert check["tokens"] == check["reference_tokens"] and len(check["tokens"]) == 16
        assert check["predictions"] == [2, 3]  # the prompt in two, then a token at a time
        assert check["max_logit_difference"] < 1e-2  # float32 against float32
        assert report["float16_check"]["finite"] is True
        # What float16 gave on this prompt when this test was written; rounding may move
        # a near tie, not many.
        assert report["float16_check"]["same"] >= 12
        assert report["coreml_check"] is None and report["compiled"] is False
        assert {"load", "trace", "check", "convert", "save", "total"} <= set(
            report["seconds"])
        assert ("quantize" in report["seconds"]) == (quantize == "int4")
        assert {s["name"]: s["shape"] for s in report["states"]} == {
            "keyCache": CACHE_SHAPE, "valueCache": CACHE_SHAPE}
        assert [i["name"] for i in report["inputs"]] == ["inputIds", "causalMask"]
        assert report["model"]["vocabulary"] == 49152
        assert {"torch", "transformers", "coremltools", "llmctl"} <= set(report["versions"])
        assert (report["quantized_ops"] > 0) == (quantize == "int4")
        assert coreml_format.context_of(report) == CONTEXT


def test_an_interrupted_conversion_leaves_nothing(llmctl: Runner, llmctl_home: Path,
                                                  smollm2_hf: Path) -> None:
    process = subprocess.Popen(
        [llmctl_executable(), "convert", str(smollm2_hf), "--to", "coreml", "--ctx", "64"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert process.stderr is not None
    for line in process.stderr:  # progress: one line per step when stderr is a pipe
        seen.append(line)
        if "tracing the model" in line:  # the child has loaded the model: it is at work
            break
    assert children_for(llmctl_home), "".join(seen)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert out == ""
    assert llmctl("ls", "-q").stdout == ""
    assert not [p for p in (llmctl_home / "tmp").iterdir() if p.name != "locks"]
    assert not children_for(llmctl_home)  # stopped and waited for, not left running


def _made_up_checkpoint(folder: Path, architecture: str) -> Path:
    """A folder the store takes for a Hugging Face checkpoint (config.json, a valid
    one-tensor safetensors file, tokenizer.json) of `architecture`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": "made_up",
        "max_position_embeddings": 2048}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    (folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header.encode() + b"\0" * 4)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_an_unsupported_architecture_exits_2_naming_it(llmctl: Runner, tmp_path: Path
                                                       ) -> None:
    folder = _made_up_checkpoint(tmp_path / "made-up", "MadeUpForCausalLM")
    result = llmctl("convert", str(folder), "--to", "coreml")
    assert result.returncode == 2
    line = error_line(result)
    assert "MadeUpForCausalLM" in line and "does not convert to Core ML" in line
    assert "LlamaForCausalLM" in line  # what it takes
    assert llmctl("ls", "-q").stdout == ""


@pytest.mark.parametrize(("args", "words"), [
    (("--min-deployment-target", "macOS14"), "needs iOS 18 or macOS 15"),
    (("--min-deployment-target", "iOS17"), "needs iOS 18 or macOS 15"),
    (("--ctx", "8193"), "--ctx 8193 is more than the 8192 tokens"),
    (("--ctx", "8"), "--ctx 8 is below 16 tokens"),
    (("-q", "int8"), "-q int8 is not a Core ML weight format for language models"),
    (("--quantize-nbits", "6"), "--quantize-nbits is for Stable Diffusion pipelines"),
])
def test_bad_options_exit_2_before_any_work(llmctl: Runner, llmctl_home: Path,
                                            smollm2_hf: Path, args: tuple[str, ...],
                                            words: str) -> None:
    result = llmctl("convert", str(smollm2_hf), "--to", "coreml", *args)
    assert result.returncode == 2
    assert words in error_line(result)
    assert llmctl("ls", "-q").stdout == ""
    assert not (llmctl_home / "tmp").exists() or not list((llmctl_home / "tmp").glob(
        "convert-*"))


def test_a_gguf_model_is_checked_by_its_header(llmctl: Runner, gguf_copy: Path) -> None:
    # The GGUF's own llama.context_length (8192), before anything is dequantized.
    result = llmctl("convert", str(gguf_copy), "--to", "coreml", "--ctx", "9000")
    assert result.returncode == 2
    assert "--ctx 9000 is more than the 8192 tokens" in error_line(result)


def test_sources_that_are_not_text_checkpoints_exit_2(llmctl: Runner, tmp_path: Path,
                                                      stored: dict[str, str]) -> None:
    pipeline = tmp_path / "tiny-sd"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipeline / "unet" / "config.json").write_text("{}")
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    image = llmctl("convert", str(pipeline), "--to", "coreml", "-q", "int4")
    assert image.returncode == 2
    assert "-q is for language models" in error_line(image)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    folder = llmctl("convert", str(notes), "--to", "coreml")
    assert folder.returncode == 2
    again = llmctl("convert", stored["fp16"], "--to", "coreml", "-q", "int4")
    assert again.returncode == 2
    assert "it is a Core ML model already" in error_line(again)
    assert set(llmctl("ls", "-q").stdout.split()) == set(stored.values())


def test_a_second_conversion_is_refused_unless_forced(llmctl: Runner, stored: dict[str, str],
                                                      smollm2_hf: Path) -> None:
    result = llmctl("convert", str(smollm2_hf), "--to", "coreml", "-q", "int4", "--ctx",
                    str(CONTEXT))
    assert result.returncode == 2
    line = error_line(result)
    assert "already stored" in line and "run it on macOS with: llmctl run" in line


def test_run_says_core_ml_needs_macos(llmctl: Runner, stored: dict[str, str]) -> None:
    result = llmctl("run", stored["int4"], "Hi")
    assert result.returncode == 1  # the engine cannot run here, as for Core ML images
    assert "macOS" in error_line(result)
    assert result.stdout == ""
    chosen = llmctl("run", stored["int4"], "--compute-unit", "CPU_ONLY", "Hi")
    assert chosen.returncode == 1 and "macOS" in error_line(chosen)


def test_an_unknown_compute_unit_exits_2_naming_the_choices(llmctl: Runner,
                                                           stored: dict[str, str]) -> None:
    result = llmctl("run", stored["int4"], "--compute-unit", "tpu", "Hi")
    assert result.returncode == 2
    line = error_line(result)
    assert "unknown --compute-unit 'tpu'" in line and "cpu_and_gpu" in line


def test_compute_units_default_to_cpu_and_gpu_and_are_noted_elsewhere(
        llmctl: Runner, gguf_copy: Path) -> None:
    assert coreml_text.compute_unit(LoadOptions()) == "cpu_and_gpu"
    assert coreml_text.compute_unit(LoadOptions(compute_unit="cpu_only")) == "cpu_only"
    result = llmctl("run", str(gguf_copy), "--compute-unit", "cpu_only", "--max-tokens", "2",
                    "Hi")
    assert result.returncode == 0, result.stderr
    assert "--compute-unit applies to Core ML models, not to llama" in result.stderr


def test_ls_and_show_tell_a_language_model_from_an_image_one(
        llmctl: Runner, stored: dict[str, str]) -> None:
    listing = {m["name"] + ":" + m["tag"]: m for m in json.loads(llmctl("ls", "--json").stdout)}
    for reference in stored.values():
        entry = listing[reference]
        assert (entry["kind"], entry["format"], entry["engine"]) == ("text", "coreml",
                                                                      "coreml")
        summary = json.loads(llmctl("show", reference, "--json").stdout)["summary"]
        assert summary["context_length"] == CONTEXT  # the cache's, not config.json's 8192
    table = llmctl("ls").stdout
    assert all(line.split()[1:2] != ["image"] for line in table.splitlines()
               if line.startswith(NAME))


def test_imagine_refuses_a_core_ml_language_model(llmctl: Runner,
                                                  stored: dict[str, str]) -> None:
    result = llmctl("imagine", stored["fp16"], "a castle")
    assert result.returncode == 2
    assert "text model" in error_line(result) and result.stdout == ""


# -- the engine's helpers ------------------------------------------------------------------

def test_the_causal_mask_lets_each_token_see_what_came_before_it() -> None:
    mask = coreml_text.causal_mask(3, 2)
    assert mask.shape == (1, 1, 2, 5) and mask.dtype == np.float16
    allowed = mask[0, 0] == 0
    assert allowed.tolist() == [[True, True, True, True, False],
                                [True, True, True, True, True]]
    assert float(mask.min()) == coreml_text.MASKED
    prompt = coreml_text.causal_mask(0, 4)[0, 0] == 0
    assert (prompt == np.tril(np.ones((4, 4), dtype=bool))).all()
    inputs = coreml_text.prediction_inputs([7, 8], 3)
    assert inputs["inputIds"].dtype == np.int32 and inputs["inputIds"].tolist() == [[7, 8]]
    assert inputs["causalMask"].shape == (1, 1, 2, 5)


def test_prompts_go_in_chunks_and_the_last_row_is_sampled() -> None:
    assert coreml_text.chunks(list(range(600)), 256) == [
        list(range(256)), list(range(256, 512)), list(range(512, 600))]
    assert coreml_text.chunks([1]) == [[1]]
    logits = np.arange(12, dtype=np.float16).reshape(1, 3, 4)
    row = coreml_text.last_row(logits)
    assert row.dtype == np.float32 and row.tolist() == [8, 9, 10, 11]


def test_the_folder_tells_the_model_its_context_and_its_end_tokens(
        coreml_store: CoremlStore, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    folder = folder_of(coreml_store, "int4")
    assert coreml_text.model_file(folder) == folder / "Model.mlpackage"
    assert coreml_text.state_context(spec_of(folder)) == CONTEXT
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # SmolLM2: <|im_end|> (2) ends a turn; config.json and tokenizer_config.json say so.
    assert coreml_text.end_tokens(folder, tokenizer) == {2}
    assert coreml_format.context_of({}) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert coreml_text.model_file(empty) is None
    with pytest.raises(coreml_text.UsageError, match="holds no Core ML model"):
        coreml_text.CoremlTextEngine(empty, LoadOptions(), model=TorchStandIn.unused())


def test_prompt_tokens_are_transformers_chat_template_tokens(coreml_store: CoremlStore
                                                             ) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from llmctl.formats import hf

    folder = folder_of(coreml_store, "fp16")
    messages = [Message("system", "You are brief."), Message("user", PARIS),
                Message("assistant", "Paris."), Message("user", "And Germany? Ünïcode ✓")]
    ours = coreml_text.encode_prompt(Tokenizer.from_file(str(folder / "tokenizer.json")),
                                     hf.chat_template(folder), messages)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)


# -- the engine's stream, on a stand-in for MLModel ----------------------------------------

class TorchStandIn:
    """MLModel's make_state and predict for the converted model's interface, computed by
    the wrapper the conversion traced (llmctl.convert.coreml_lm.stateful_model) in
    PyTorch, float32. It checks each prediction's inputs against the package's spec (names,
    element types, flexible ranges) as Core ML would, and holds one state at a time."""

    def __init__(self, wrapper: Any, spec: Any):
        self.wrapper = wrapper
        self.inputs = {f.name: f.type.multiArrayType for f in spec.description.input}
        self.calls: list[tuple[int, int]] = []  # (tokens, cached positions) per prediction

    @classmethod
    def unused(cls) -> Any:
        return object()

    def make_state(self) -> object:
        return object()

    def predict(self, data: dict[str, Any], state: Any = None) -> dict[str, Any]:
        import torch
        from coremltools.proto import FeatureTypes_pb2

        types = {np.dtype(np.int32): FeatureTypes_pb2.ArrayFeatureType.INT32,
                 np.dtype(np.float16): FeatureTypes_pb2.ArrayFeatureType.FLOAT16}
        assert state is not None and set(data) == set(self.inputs)
        for name, array in data.items():
            wanted = self.inputs[name]
            assert types[array.dtype] == wanted.dataType, name
            bounds = [(r.lowerBound, r.upperBound) for r in wanted.shapeRange.sizeRanges]
            assert len(array.shape) == len(bounds), name
            assert all(low <= d <= high for d, (low, high) in zip(array.shape, bounds,
                                                                  strict=True)), name
        ids, mask = data["inputIds"], data["causalMask"]
        self.calls.append((ids.shape[1], mask.shape[-1] - ids.shape[1]))
        with torch.no_grad():
            logits = self.wrapper(torch.from_numpy(ids), torch.from_numpy(mask).float())
        return {"logits": logits.numpy().astype(np.float16)}


@pytest.fixture(scope="module")
def engine(coreml_store: CoremlStore, smollm2_hf: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.convert.coreml_lm import stateful_model

    folder = folder_of(coreml_store, "fp16")
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    stand_in = TorchStandIn(stateful_model(model, CONTEXT), spec_of(folder))
    llm = coreml_text.CoremlTextEngine(folder, LoadOptions(), model=stand_in)
    yield llm
    llm.close()


def _reply(engine: Any, messages: list[Message], options: GenerationOptions,
           keep_cache: bool = False, exact: bool = True) -> tuple[str, Any]:
    from llmctl.engines.text import Done

    tokens = engine.prompt_tokens(messages)
    events = list(engine.generate_from_tokens(tokens, options, keep_cache=keep_cache,
                                              exact=exact))
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events[:-1]), events[-1].stats


def test_the_engine_answers_paris_through_the_interface(engine: Any) -> None:
    assert engine.context_length == CONTEXT
    engine.model.calls.clear()
    text, stats = _reply(engine, [Message("user", PARIS)],
                         GenerationOptions(temperature=0.0, max_tokens=24))
    assert "Paris" in text
    assert stats.stop_reason == "stop"
    calls = engine.model.calls
    # The prompt in one prediction, then one per token, each after the ones before.
    assert calls[0] == (stats.prompt_tokens, 0)
    assert calls[1:] == [(1, stats.prompt_tokens + i) for i in range(len(calls) - 1)]


def test_a_kept_cache_reuses_the_state_and_replies_the_same(engine: Any) -> None:
    greedy = GenerationOptions(temperature=0.0, max_tokens=12)
    first = [Message("user", PARIS)]
    reply, _ = _reply(engine, first, greedy)
    second = [*first, Message("assistant", reply), Message("user", "And of Germany?")]
    fresh, _ = _reply(engine, second, greedy)
    _reply(engine, first, greedy)
    engine.model.calls.clear()
    # exact=False keeps the common prefix: the state's positions before it are read as
    # they are, the rest written over.
    kept, stats = _reply(engine, second, greedy, keep_cache=True, exact=False)
    assert stats.cached_tokens > 20
    assert engine.model.calls[0] == (stats.prompt_tokens - stats.cached_tokens,
                                     stats.cached_tokens)
    assert kept == fresh and "Berlin" in kept
    # exact (chat's default): not measured on Core ML, so nothing is kept.
    _, exact = _reply(engine, second, greedy, keep_cache=True)
    assert exact.cached_tokens == 0


def test_sampling_follows_the_seed(engine: Any) -> None:
    story = [Message("user", "Tell me a story.")]

    def sampled(seed: int) -> str:
        return _reply(engine, story, GenerationOptions(temperature=1.0, top_k=0, top_p=1.0,
                                                       seed=seed, max_tokens=8))[0]

    first = sampled(42)
    assert sampled(42) == first
    assert sampled(7) != sampled(8)


def test_a_prompt_beyond_the_context_is_refused(engine: Any) -> None:
    tokens = engine.text_tokens("word " * 200)
    assert len(tokens) > CONTEXT
    with pytest.raises(coreml_text.UsageError, match="context holds 128"):
        list(engine.generate_from_tokens(tokens, GenerationOptions(temperature=0.0)))
    with pytest.raises(coreml_text.UsageError, match="--ctx 256 is more than the 128"):
        coreml_text.CoremlTextEngine(engine.folder, LoadOptions(context_length=256),
                                     model=engine.model)
