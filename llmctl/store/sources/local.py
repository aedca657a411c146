"""Models already on this machine: a .gguf file, a folder holding one, a whisper.cpp
ggml-*.bin file, or a folder model (config.json with *.safetensors for mlx-lm; a
diffusers, Core ML or ONNX Runtime GenAI folder; a Whisper folder of CTranslate2 or
mlx-whisper)."""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import UsageError
from llmctl.formats import detect_format, onnx
from llmctl.formats.whisper import ggml_header
from llmctl.store.sources import LocalFiles

SUFFIX = ".gguf"
GGML_SUFFIX = ".bin"  # whisper.cpp's files: ggml-tiny.bin, ... (told apart by their magic)
# Files at the top of a folder that make it a model of several files (the ONNX Runtime
# GenAI builder writes no config.json).
FOLDER_MARKERS = ("config.json", "model_index.json", onnx.CONFIG)


def locate(path: Path) -> LocalFiles:
    path = path.expanduser()
    if not path.exists():
        raise UsageError(f"no such file or folder: {path}")
    if path.is_dir():
        if folder := _folder_model(path):
            return folder
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
        if not found:
            _builds_below(path)
        if len(found) != 1:
            what = "no .gguf file" if not found else f"{len(found)} .gguf files"
            raise UsageError(f"folder {path} holds {what}",
                             hint="name the .gguf file to use" if found else
                             "llmctl takes a .gguf file, or a folder with config.json and "
                             "*.safetensors")
        path = found[0]
    elif not path.is_file():
        # A FIFO or a device would block the first read for ever (issue 10).
        raise UsageError(f"{path} is not a regular file (a FIFO, device or socket)",
                         hint="give the path of a .gguf file or a model folder")
    elif path.suffix.lower() == GGML_SUFFIX:
        # Checked before anything is stored: a .bin is as often a pickle as a ggml file.
        if ggml_header(path) is None:
            raise UsageError(f"{path} is not a whisper.cpp model (no ggml magic at its start)",
                             hint="give a ggml-*.bin file of whisper.cpp, a .gguf file, or "
                                  "a model folder")
    elif path.suffix.lower() != SUFFIX:
        raise UsageError(f"{path} is not a .gguf file",
                         hint="give a .gguf file, or a folder with config.json and *.safetensors")
    return LocalFiles([path.resolve()], origin={"type": "path", "path": str(path.resolve())})


def _folder_model(folder: Path) -> LocalFiles | None:
    """Every file of a folder model, named by its path inside the folder; None when the
    folder is not one. Hidden files and folders (.git, .cache) are left out."""
    if not any((folder / marker).is_file() for marker in FOLDER_MARKERS) and not any(
            p.suffix.lower() in (".mlmodelc", ".mlpackage") for p in folder.iterdir()):
        return None  # neither a checkpoint, a diffusers pipeline nor Core ML resources
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    names = [p.relative_to(folder).as_posix() for p in files]
    found = detect_format(names)
    if found is None or found.format == "gguf":
        return None
    # Links are followed: a folder of links (a model folder of the store, a Hugging Face
    # snapshot) is stored by the files it points at.
    return LocalFiles([p.resolve() for p in files], names=names,
                      origin={"type": "path", "path": str(folder.resolve())})


def _builds_below(folder: Path) -> None:
    """A folder downloaded as Microsoft's ONNX repositories lay out their builds
    (`cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/`) is not itself the model: name
    the build folders to pull instead (a build folder is pulled as it is)."""
    builds = sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob(onnx.CONFIG)
                    if p.parent != folder and _is_onnx_build(p.parent))
    if builds:
        raise UsageError(f"folder {folder} holds ONNX Runtime GenAI builds in subfolders: "
                         f"{', '.join(builds)}",
                         hint=f"pull one, e.g. llmctl pull {folder / builds[0]}")


def _is_onnx_build(folder: Path) -> bool:
    found = detect_format([p.name for p in folder.iterdir() if p.is_file()])
    return found is not None and found.format == "onnx"


def model_name(files: LocalFiles) -> str:
    """The name a model pulled from a path gets: the folder's name for a folder model, the
    file's (without .gguf or .bin) otherwise."""
    if files.names is not None:
        return Path(files.origin["path"]).name
    return files.paths[0].stem
