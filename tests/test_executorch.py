"""The ExecuTorch engine and `llmctl convert --to executorch`, on the real SmolLM2 and the
real ExecuTorch (transformers' export, XNNPACK lowering, the Python runtime), on the CPU.

The SmolLM2 Hugging Face folder (`smollm2_hf`) is converted once per module by the
installed `llmctl convert` (fp32 with a 256-token cache: about two minutes here); each test
gets a copy of that store made of hard links. The interrupted conversion runs in a store
of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import PARIS, Runner, children_running, error_line, llmctl_executable
from test_mlx import DONE_KEYS, stored_folder

from llmctl.engines.sampling import Sampler, candidates
from llmctl.engines.text import GenerationOptions, LoadOptions, Message
from llmctl.store import manifest as manifests
from llmctl.store.layout import StoreLayout

EXPORT = "llmctl.convert.executorch_export"
CONTEXT = 256  # the static cache the test program is exported with
REFERENCE = f"smollm2-135m-instruct:executorch-fp32-ctx{CONTEXT}"


@dataclass(frozen=True)
class PteStore:
    home: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def pte_store(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> PteStore:
    home = tmp_path_factory.mktemp("executorch-module") / "home"
    result = subprocess.run(
        [llmctl_executable(), "convert", str(smollm2_hf), "--to", "executorch", "--ctx",
         str(CONTEXT)], capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL,
        env={**os.environ, "LLMCTL_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return PteStore(home, result)


@pytest.fixture
def stored(pte_store: PteStore, llmctl_home: Path) -> str:
    shutil.copytree(pte_store.home, llmctl_home, symlinks=True, copy_function=os.link,
                    ignore=shutil.ignore_patterns("*.lock", "locks"))
    return REFERENCE


def exports_for(home: Path) -> list[int]:
    """Export processes writing under `home`."""
    return children_running(EXPORT, home)


# -- convert ---------------------------------------------------------------------------------

def test_convert_stores_a_program_with_its_tokenizer(pte_store: PteStore) -> None:
    result = pte_store.result
    assert result.stdout == f"{REFERENCE}\n"
    for step in ("converting to ExecuTorch, fp32 on xnnpack, a 256-token KV cache",
                 "loading the checkpoint", "exporting with a static KV cache",
                 "lowering to xnnpack", "writing the program", "storing", "success"):
        assert step in result.stderr, result.stderr
    # torch.export's warnings and logs stay in the child.
    assert "Warning" not in result.stderr and "W1203" not in result.stderr
    name, tag = REFERENCE.split(":")
    found = manifests.load(StoreLayout(pte_store.home), name, tag)
    assert found is not None
    assert (found.kind, found.engine, found.format) == ("text", "executorch", "pte")
    assert {"model.pte", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "config.json", "executorch.json"} <= {f.name for f in found.files}
    assert (found.source["to"], found.source["quantize"], found.source["backend"],
            found.source["context_length"]) == ("executorch", "fp32", "xnnpack", 256)
    record = json.loads((stored_folder(pte_store.home, REFERENCE) / "executorch.json")
                        .read_text())
    assert record["methods"]["get_max_seq_len"] == 256
    assert record["methods"]["get_eos_ids"] == [2]
    assert set(record["versions"]) >= {"executorch", "torch", "transformers"}
    # 135 M parameters at 4 bytes; the program is most of the model.
    assert 500_000_000 < found.size < 800_000_000
    assert not list((pte_store.home / "tmp").glob("convert-*"))


def test_ls_and_show_say_what_it_is(llmctl: Runner, stored: str) -> None:
    listing = json.loads(llmctl("ls", "--json").stdout)
    entry = next(m for m in listing if m["name"] + ":" + m["tag"] == stored)
    assert (entry["format"], entry["engine"]) == ("pte", "executorch")
    show = llmctl("show", stored)
    assert show.returncode == 0, show.stderr
    assert "executorch" in show.stdout
    # The program's static cache, not the 8192 tokens config.json says SmolLM2 learnt.
    summary = json.loads(llmctl("show", stored, "--json").stdout)["summary"]
    assert summary["context_length"] == CONTEXT


# -- run -------------------------------------------------------------------------------------

def test_run_answers_paris_at_temperature_0(llmctl: Runner, stored: str) -> None:
    result = llmctl("run", stored, "--temperature", "0", "--max-tokens", "24", PARIS)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    again = llmctl("run", stored, "--temperature", "0", "--max-tokens", "24", PARIS)
    assert again.stdout == result.stdout  # greedy: the same reply


def test_run_json_events_and_verbose_stats(llmctl: Runner, stored: str) -> None:
    result = llmctl("run", stored, "--json", "--temperature", "0", "--max-tokens", "8",
                    "--verbose", PARIS)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    done = events[-1]
    assert done["type"] == "done" and set(done) >= DONE_KEYS
    assert done["engine"] == "executorch"
    assert 0 < done["generated_tokens"] <= 8
    assert "".join(e["text"] for e in events[:-1] if e["type"] == "token")
    assert "tokens/s" in result.stderr


def test_a_seeded_sampled_reply_repeats(llmctl: Runner, stored: str) -> None:
    args = ("run", stored, "--seed", "7", "--temperature", "0.9", "--max-tokens", "16",
            "Tell me a story.")
    first, second = llmctl(*args), llmctl(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_a_kept_prefix_gives_the_reply_a_fresh_cache_gives(stored: str, llmctl_home: Path
                                                          ) -> None:
    from llmctl.engines.executorch import load

    folder = stored_folder(llmctl_home, stored)
    engine = load(folder, LoadOptions())
    options = GenerationOptions(temperature=0.0, max_tokens=12)
    question = [Message("user", PARIS)]
    fresh = "".join(e.text for e in engine.generate(question, options) if hasattr(e, "text"))
    other = [Message("user", "Name a colour.")]
    list(engine.generate(other, options, keep_cache=True))
    kept = "".join(e.text for e in engine.generate(question, options, keep_cache=True)
                   if hasattr(e, "text"))
    assert kept == fresh and "Paris" in fresh
    engine.close()


def test_ctx_above_the_programs_cache_is_refused(llmctl: Runner, stored: str) -> None:
    result = llmctl("run", stored, "--ctx", "512", PARIS)
    assert result.returncode == 2
    assert ("--ctx 512 is more than the 256 tokens this program's KV cache holds"
            in error_line(result))


# -- interrupted, bad input ------------------------------------------------------------------

def test_an_interrupted_conversion_leaves_nothing(llmctl: Runner, llmctl_home: Path,
                                                  smollm2_hf: Path) -> None:
    process = subprocess.Popen(
        [llmctl_executable(), "convert", str(smollm2_hf), "--to", "executorch", "--ctx",
         "128"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    seen = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if "loading the checkpoint" in line:  # the export child is at work
            break
    assert exports_for(llmctl_home), "".join(seen)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and out == ""
    assert llmctl("ls", "-q").stdout == ""
    assert not [p for p in (llmctl_home / "tmp").iterdir() if p.name != "locks"]
    assert not exports_for(llmctl_home)


@pytest.mark.parametrize(("args", "words"), [
    (("-q", "int3"), "-q int3 is not an ExecuTorch recipe"),
    (("--backend", "vulkan"), "--backend vulkan is not supported"),
    (("--ctx", "16"), "--ctx 16 is below 64 tokens"),
    (("-q", "8da4w", "--backend", "portable"), "-q 8da4w needs --backend xnnpack"),
    (("--execution-provider", "cuda"), "--execution-provider is for --to onnx"),
])
def test_bad_options_exit_2_before_pulling(llmctl: Runner, args: tuple[str, ...],
                                           words: str) -> None:
    result = llmctl("convert", "smollm2", "--to", "executorch", *args)
    assert result.returncode == 2
    assert words in error_line(result)
    assert llmctl("ls", "-q").stdout == ""


def test_sources_it_does_not_convert_exit_2(llmctl: Runner, tmp_path: Path, smollm2_hf: Path,
                                            tiny_folder: Path) -> None:
    image = llmctl("convert", str(tiny_folder), "--to", "executorch")
    assert image.returncode == 2
    assert "is an image model (diffusers)" in error_line(image)
    odd = tmp_path / "odd"
    shutil.copytree(smollm2_hf, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FalconMambaForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    result = llmctl("convert", str(odd), "--to", "executorch")
    assert result.returncode == 2
    assert "is a FalconMambaForCausalLM, which llmctl does not export" in error_line(result)
    long = llmctl("convert", str(smollm2_hf), "--to", "executorch", "--ctx", "9000")
    assert long.returncode == 2
    assert "--ctx 9000 is more than the 8192 tokens" in error_line(long)
    assert llmctl("ls", "-q").stdout == ""


# -- the sampler (llmctl.engines.sampling) ---------------------------------------------------

def test_the_sampler_is_greedy_at_0_and_seeded_otherwise() -> None:
    logits = np.random.default_rng(0).normal(size=1000)
    assert Sampler(GenerationOptions(temperature=0.0))(logits) == int(np.argmax(logits))
    options = GenerationOptions(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0, seed=3)
    draws = [Sampler(options)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same token
    many = Sampler(options)
    picked = {many(logits) for _ in range(200)}
    assert len(picked) > 5 and picked <= set(np.argsort(-logits)[:50].tolist())


def test_top_p_min_p_and_masks_narrow_the_candidates() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, probs = candidates(logits, GenerationOptions(temperature=1.0, top_k=0, top_p=0.75,
                                                      min_p=0.0))
    assert ids.tolist() == [0, 1]
    assert probs.sum() == pytest.approx(1.0)
    ids, _ = candidates(logits, GenerationOptions(temperature=1.0, top_k=0, top_p=1.0,
                                                  min_p=0.2))
    assert ids.tolist() == [0, 1, 2]  # 0.05 < 0.2 x 0.5
    masked = logits.copy()
    masked[0] = -np.inf  # what a grammar leaves out is never drawn
    ids, _ = candidates(masked, GenerationOptions(temperature=1.0, top_k=0, top_p=1.0,
                                                  min_p=0.0))
    assert 0 not in ids.tolist()
