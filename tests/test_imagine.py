"""`llmctl imagine` end to end: the installed command on tiny random-weight Stable
Diffusion pipelines built with the real diffusers classes (tests/tiny_sd.py), pulled into
each test's own store with `llmctl pull ./folder`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Runner, error_line, llmctl_executable
from hubserver import HubServer, hub_server  # noqa: F401  (a fixture)

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402  (after the skip: Pillow comes with the diffusers extra)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def bigger_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """UNet channels (32, 64): a step at 128x128 takes long enough to be interrupted."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "bigger-sd", unet_channels=(32, 64))


@pytest.fixture(scope="session")
def pickled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "pickled-sd",
                         safe_serialization=False)


def pull(llmctl: Runner, folder: Path, name: str) -> str:
    result = llmctl("pull", str(folder), "--name", name)
    assert result.returncode == 0, result.stderr
    return name


@pytest.fixture
def tiny(llmctl: Runner, tiny_folder: Path) -> str:
    return pull(llmctl, tiny_folder, "tiny")


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_writes_a_png_of_the_asked_size_with_its_parameters(
        llmctl: Runner, tiny: str, tmp_path: Path) -> None:
    target = tmp_path / "fox.png"
    result = llmctl("imagine", tiny, "a red fox in snow", "--steps", "2", "--seed", "7",
                    "--width", "48", "--height", "64", "--negative", "blurry", "-o",
                    str(target))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{target}\n"  # the payload: the path, nothing else
    assert "step 2/2" in result.stderr and "left" in result.stderr
    assert "warning" not in result.stderr.lower() and "Traceback" not in result.stderr
    with Image.open(target) as image:
        assert image.size == (48, 64)
        embedded = json.loads(image.text["llmctl"])
        assert image.text["Description"] == "a red fox in snow"
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar == embedded
    assert {k: sidecar[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance",
                                    "width", "height", "scheduler", "model", "engine",
                                    "device")} == {
        "prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 7, "steps": 2,
        "guidance": 7.5, "width": 48, "height": 64, "scheduler": "ddim",
        "model": "tiny:latest", "engine": "diffusers", "device": "cpu"}
    assert sidecar["model_digest"].startswith("sha256:") and sidecar["seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("fox")) == [
        "fox.json", "fox.png"]  # no temporary files left


def test_same_seed_gives_the_same_pixels(llmctl: Runner, tiny: str, tmp_path: Path) -> None:
    paths = []
    for name in ("a.png", "b.png"):
        result = llmctl("imagine", tiny, "a lighthouse", "--steps", "2", "--seed", "3",
                        "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        paths.append(tmp_path / name)
    assert pixels(paths[0]) == pixels(paths[1])


def test_count_gives_consecutive_seeds_that_differ_and_reproduce(
        llmctl: Runner, tiny: str, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    result = llmctl("imagine", tiny, "a castle", "--steps", "2", "--seed", "10", "-n", "3",
                    "-o", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [10, 11, 12]
    paths = [Path(line["path"]) for line in lines]
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(p.name for p in paths)
    images = [pixels(p) for p in paths]
    assert len(set(images)) == 3  # different seeds, different pixels
    again = llmctl("imagine", tiny, "a castle", "--steps", "2", "--seed", "11", "-o",
                   str(tmp_path / "eleven.png"))
    assert again.returncode == 0, again.stderr
    assert pixels(tmp_path / "eleven.png") == images[1]


def test_preview_every_writes_previews_beside_the_image(
        llmctl: Runner, tiny: str, tmp_path: Path) -> None:
    target = tmp_path / "cat.png"
    result = llmctl("imagine", tiny, "a cat", "--steps", "3", "--seed", "1",
                    "--preview-every", "1", "-o", str(target))
    assert result.returncode == 0, result.stderr
    previews = sorted(p.name for p in tmp_path.glob("cat.step-*.png"))
    assert previews == ["cat.step-001.png", "cat.step-002.png"]  # the last step is the image
    with Image.open(tmp_path / previews[0]) as preview:
        assert preview.size == (64, 64)


def test_scheduler_option_is_used_and_recorded(llmctl: Runner, tiny: str,
                                               tmp_path: Path) -> None:
    result = llmctl("imagine", tiny, "a boat", "--steps", "2", "--seed", "1", "--scheduler",
                    "euler", "--json", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["scheduler"] == "euler"


def test_ctrl_c_stops_at_the_next_step_and_leaves_no_file(
        llmctl: Runner, bigger_folder: Path, tmp_path: Path,
        llmctl_home: Path) -> None:
    name = pull(llmctl, bigger_folder, "bigger")
    process = subprocess.Popen(
        [llmctl_executable(), "imagine", name, "a forest", "--steps", "200", "--width",
         "128", "--height", "128", "--preview-every", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ.copy(), cwd=tmp_path)
    seen = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if line.startswith("step 2/"):
            break
    gallery = llmctl_home / "gallery"
    assert list(gallery.glob("*.step-001.png")), seen  # a preview was there
    process.send_signal(signal.SIGINT)
    stdout, rest = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen) + rest
    assert stdout == ""
    assert "Traceback" not in rest
    assert list(gallery.iterdir()) == []  # no image, sidecar, preview or temporary file


def test_gallery_lists_and_deletes_images(llmctl: Runner, tiny: str) -> None:
    made = llmctl("imagine", tiny, "a small  red\nhouse", "--steps", "1", "--seed", "5",
                  "-n", "2", "--json")
    assert made.returncode == 0, made.stderr
    first, second = (json.loads(line) for line in made.stdout.splitlines())
    listing = llmctl("ls", "--images")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["ID", "SIZE", "SEED", "CREATED", "PROMPT"]
    assert len(rows) == 2 and all("64x64" in r and "a small red house" in r for r in rows)
    assert {r.split()[0] for r in rows} == {first["id"], second["id"]}
    as_json = json.loads(llmctl("ls", "--images", "--json").stdout)
    assert {i["seed"] for i in as_json} == {5, 6}
    path = Path(first["path"])
    assert path.is_file() and path.with_suffix(".json").is_file()
    removed = llmctl("rm", "--image", "-y", first["id"][:6])
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.split() == [first["id"]]
    assert not path.exists() and not path.with_suffix(".json").exists()
    assert [i["id"] for i in json.loads(llmctl("ls", "--images", "--json").stdout)] == [
        second["id"]]
    missing = llmctl("rm", "--image", "-y", "nope")
    assert missing.returncode == 2 and "no image 'nope'" in error_line(missing)


def test_pickled_weights_need_trust_pickle(llmctl: Runner, pickled_folder: Path,
                                           tmp_path: Path) -> None:
    name = pull(llmctl, pickled_folder, "pickled")
    refused = llmctl("imagine", name, "a dog", "--steps", "1", "-o", str(tmp_path))
    assert refused.returncode == 2
    line = error_line(refused)
    assert "pickle" in line and "--trust-pickle" in line and ".bin" in line
    assert not list(tmp_path.glob("*.png"))
    trusted = llmctl("imagine", name, "a dog", "--steps", "1", "--trust-pickle", "-o",
                     str(tmp_path))
    assert trusted.returncode == 0, trusted.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--width", "50"), "--width 50 is not a multiple of 8"),
    (("--height", "12"), "--height 12 is not a multiple of 8"),
    (("--steps", "0"), "--steps"),
    (("--scheduler", "fast"), "unknown scheduler 'fast'"),
    (("--device", "tpu"), "unknown --device 'tpu'"),
    (("-n", "0"), "--count"),
])
def test_bad_options_are_usage_errors(llmctl: Runner, tiny: str, args: tuple[str, ...],
                                      message: str) -> None:
    result = llmctl("imagine", tiny, "a tree", *args)
    assert result.returncode == 2
    assert message in error_line(result)


def test_text_model_to_imagine_and_image_model_to_run(
        llmctl: Runner, tiny: str, gguf_copy: Path) -> None:
    text = llmctl("imagine", str(gguf_copy), "a tree")
    assert text.returncode == 2
    assert "is a text model" in error_line(text) and "llmctl run" in error_line(text)
    image = llmctl("run", tiny, "Hi")
    assert image.returncode == 2
    assert "is an image model" in error_line(image) and "imagine" in error_line(image)


def test_memory_guard_refuses_then_force_loads(llmctl: Runner, tiny: str,
                                               tmp_path: Path) -> None:
    refused = llmctl("imagine", tiny, "a tree", "--steps", "1", env={
        "LLMCTL_MEMORY_LIMIT": "10M"})
    assert refused.returncode == 5
    assert "not enough memory" in error_line(refused) and "--force" in error_line(refused)
    forced = llmctl("imagine", tiny, "a tree", "--steps", "1", "--force", "-o",
                    str(tmp_path), env={"LLMCTL_MEMORY_LIMIT": "10M"})
    assert forced.returncode == 0, forced.stderr
    assert "may not fit in memory" in forced.stderr


def test_coreml_engine_is_refused_on_a_diffusers_model(llmctl: Runner, tiny: str) -> None:
    result = llmctl("imagine", tiny, "a tree", "--engine", "coreml")
    assert result.returncode == 2
    line = error_line(result)
    assert "cannot run diffusers models" in line and "llmctl convert" in line


def test_catalog_entry_pulls_one_copy_of_the_weights_and_gives_the_defaults(
        llmctl: Runner, tiny_folder: Path, hub_server: HubServer,  # noqa: F811
        llmctl_home: Path,
        tmp_path: Path) -> None:
    """An entry written like the shipped sd1.5 one (its allow_patterns, read from the
    shipped catalog) over a Hub repository laid out like the real one: full-precision,
    fp16 and pickled weights side by side, and a single-file checkpoint at the top."""
    from tiny_sd import build_tiny_sd

    from llmctl.store.catalog import Catalog

    fp16 = build_tiny_sd(tmp_path / "fp16", variant="fp16")
    files: dict[str, Path | bytes] = {
        p.relative_to(tiny_folder).as_posix(): p for p in tiny_folder.rglob("*") if p.is_file()}
    files.update({p.relative_to(fp16).as_posix(): p for p in fp16.rglob("*.fp16.*")})
    files.update({"unet/diffusion_pytorch_model.bin": bytes(512),
                  "v1-5-pruned-emaonly.safetensors": bytes(1024), "README.md": b"tiny\n"})
    hub_server.commit("test/tiny-sd", files, "a tiny pipeline")
    shipped = Catalog.default().find("sd1.5", None)
    assert shipped is not None
    patterns = shipped.entry.sources[0].options["allow_patterns"]
    (llmctl_home / "catalog").mkdir(parents=True)
    (llmctl_home / "catalog" / "mine.toml").write_text(f"""
[[model]]
name = "tinysd"
tag = "fp16"
kind = "image"
engine = "diffusers"
format = "diffusers"
parameters = {{ steps = 2, guidance = 5.0, width = 48, height = 56 }}
  [[model.sources]]
  type = "hf"
  repo = "test/tiny-sd"
  allow_patterns = {json.dumps(patterns)}
""")
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = llmctl("imagine", "tinysd", "a fox", "--seed", "1", "--json", "-o",
                    str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout)
    assert (meta["steps"], meta["guidance"], meta["width"], meta["height"]) == (2, 5.0, 48, 56)
    assert meta["model"] == "tinysd:fp16"
    stored = json.loads(llmctl("ls", "--json").stdout)[0]
    assert sorted(f["name"] for f in stored["files"]) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors"])


def test_output_paths(tmp_path: Path) -> None:
    from datetime import datetime

    from llmctl.errors import UsageError
    from llmctl.gallery import gallery_folder, plan_paths
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout(tmp_path / "home")
    when = datetime(2026, 1, 2, 3, 4, 5)
    assert plan_paths(tmp_path / "a.png", layout, ["x"], when) == [tmp_path / "a.png"]
    assert plan_paths(tmp_path / "a.png", layout, ["x", "y"], when) == [
        tmp_path / "a-1.png", tmp_path / "a-2.png"]
    assert plan_paths(tmp_path / "out", layout, ["x"], when) == [
        tmp_path / "out" / "20260102-030405-x.png"]
    assert plan_paths(None, layout, ["x"], when) == [
        gallery_folder(layout) / "20260102-030405-x.png"]
    with pytest.raises(UsageError, match="PNG"):
        plan_paths(tmp_path / "a.jpg", layout, ["x"], when)


def test_gallery_reads_the_png_when_the_sidecar_is_gone(tmp_path: Path) -> None:
    from llmctl.gallery import gallery_folder, list_images, write_image
    from llmctl.store.layout import StoreLayout

    layout = StoreLayout(tmp_path)
    path = gallery_folder(layout) / "20260102-030405-abcd1234.png"
    write_image(path, Image.new("RGB", (8, 16)), {"id": "abcd1234", "prompt": "p", "seed": 1})
    path.with_suffix(".json").unlink()
    [found] = list_images(layout)
    assert (found.id, found.meta["prompt"]) == ("abcd1234", "p")
