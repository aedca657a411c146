"""Generated images on disk: where they go, how they are written, the gallery's listing.

Every image is a PNG carrying its generation parameters (one JSON text chunk, "llmctl",
plus the standard Description, Source, Software and Creation Time keywords that image
viewers show) and a JSON sidecar beside it with the same parameters. Both are written to
temporary names and renamed, so a reader, or a Ctrl-C, never leaves half of either.

    $LLMCTL_HOME/gallery/<YYYYmmdd-HHMMSS>-<id>.png    the image (the default output)
                         <YYYYmmdd-HHMMSS>-<id>.json   its sidecar
                         <YYYYmmdd-HHMMSS>-<id>.step-NNN.png   previews (--preview-every)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.engines.image import Image, ImageEngine, ImageRequest, Rendered, Step
from llmctl.errors import UsageError

if TYPE_CHECKING:
    from llmctl.store.layout import StoreLayout

PNG_KEY = "llmctl"


def gallery_folder(layout: StoreLayout) -> Path:
    return layout.root / "gallery"


def new_id() -> str:
    return secrets.token_hex(4)


def plan_paths(output: Path | None, layout: StoreLayout, ids: list[str],
               created: datetime) -> list[Path]:
    """Where each image goes: `output` as the file (with -n, `name-1.png`, `name-2.png`
    ...), or as a folder (one that exists, or a path not ending in .png), or the gallery.
    Folders get `<date>-<time>-<id>.png` names (local time), which sort by time."""
    if output is not None and output.suffix.lower() == ".png" and not output.is_dir():
        if len(ids) == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{i}.png") for i in range(1, len(ids) + 1)]
    if output is not None and output.suffix and not output.is_dir():
        raise UsageError(f"-o {output}: llmctl writes PNG files (they carry the generation "
                         "parameters)", hint="name a .png file or a folder")
    folder = output if output is not None else gallery_folder(layout)
    stamp = created.strftime("%Y%m%d-%H%M%S")
    return [folder / f"{stamp}-{image_id}.png" for image_id in ids]


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def preview_path(path: Path, step: int) -> Path:
    return path.with_name(f"{path.stem}.step-{step:03d}.png")


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C arriving while the image and its sidecar are renamed into place waits
    until both are there (or neither: it may come before, then nothing was renamed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _png_info(meta: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(meta, ensure_ascii=False))
    info.add_itxt("Description", meta.get("prompt", ""))
    info.add_text("Source", f"{meta.get('model')} ({meta.get('engine')})")
    info.add_text("Software", f"llmctl {meta.get('llmctl', '')}".strip())
    info.add_text("Creation Time", meta.get("created", ""))
    return info


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def write_image(path: Path, image: Any, meta: dict[str, Any] | None) -> None:
    """The PNG (with `meta` in its text chunks) and, when `meta` is given, its sidecar:
    both written under temporary names, then renamed together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    png_tmp, json_tmp = _temporary(path), _temporary(sidecar(path))
    try:
        image.save(png_tmp, format="PNG", pnginfo=_png_info(meta) if meta else None)
        if meta is not None:
            json_tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        with _interrupts_deferred():
            os.replace(png_tmp, path)
            if meta is not None:
                os.replace(json_tmp, sidecar(path))
    finally:
        for tmp in (png_tmp, json_tmp):
            tmp.unlink(missing_ok=True)


def read_png_meta(path: Path) -> dict[str, Any]:
    """The parameters embedded in an image llmctl wrote ({} for other PNGs)."""
    from PIL import Image as PILImage

    with PILImage.open(path) as image:
        text = getattr(image, "text", {}).get(PNG_KEY)
    return json.loads(text) if text else {}


def render(engine: ImageEngine, requests: list[ImageRequest], paths: list[Path],
           ids: list[str], base: dict[str, Any]) -> Iterator[Step | Image]:
    """Run each request through `engine`, write its previews and image, and pass the
    engine's steps on (with previews as paths). On an interruption or an error, the
    previews of the unfinished image are deleted; finished images stay."""
    for request, path, image_id in zip(requests, paths, ids, strict=True):
        previews: list[Path] = []
        events = engine.generate(request)
        try:
            for event in events:
                if isinstance(event, Step):
                    if event.preview is not None:
                        target = preview_path(path, event.index)
                        write_image(target, event.preview, None)
                        previews.append(target)
                        event = Step(event.index, event.total, event.elapsed, event.eta,
                                     target)
                    yield event
                elif isinstance(event, Rendered):
                    meta = image_meta(base, request, event, image_id, path)
                    write_image(path, event.image, meta)
                    yield Image(path, meta)
        except BaseException:
            events.close()
            for target in previews:
                target.unlink(missing_ok=True)
            raise


def image_meta(base: dict[str, Any], request: ImageRequest, rendered: Rendered,
               image_id: str, path: Path) -> dict[str, Any]:
    width, height = rendered.image.size
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return {
        "id": image_id, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "seed": request.seed, "steps": request.steps, "guidance": request.guidance,
        "width": width, "height": height, "scheduler": rendered.scheduler,
        **base, "created": created, "device": rendered.device,
        "seconds": round(rendered.seconds, 3), "step_seconds": round(rendered.step_seconds, 4),
        "image": path.name,
    }


# --- the gallery ------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryImage:
    path: Path
    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.meta.get("id") or self.path.stem)

    def files(self) -> list[Path]:
        """The image, its sidecar and its previews."""
        previews = sorted(self.path.parent.glob(f"{self.path.stem}.step-*.png"))
        return [self.path, sidecar(self.path), *previews]


def list_images(layout: StoreLayout) -> list[GalleryImage]:
    """The gallery's images, oldest first, from their sidecars (an image whose sidecar is
    gone is read from its PNG chunks)."""
    folder = gallery_folder(layout)
    found = []
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if ".step-" in path.name:
            continue
        try:
            meta = json.loads(sidecar(path).read_text())
        except (OSError, ValueError):
            try:
                meta = read_png_meta(path)
            except (OSError, ValueError):
                meta = {}
        found.append(GalleryImage(path, meta if isinstance(meta, dict) else {}))
    return sorted(found, key=lambda image: (str(image.meta.get("created", "")), image.path))


def find_images(layout: StoreLayout, ids: list[str]) -> list[GalleryImage]:
    """The images `ids` name (an ID, a unique prefix of one, or a file name); unknown or
    ambiguous ones are refused before anything is deleted."""
    images = list_images(layout)
    chosen: dict[Path, GalleryImage] = {}
    for text in ids:
        matches = [i for i in images if i.id == text or i.path.name == text
                   or i.path.stem == text]
        matches = matches or [i for i in images if i.id.startswith(text)]
        if not matches:
            raise UsageError(f"no image '{text}' in the gallery", hint="see: llmctl ls --images")
        if len(matches) > 1:
            raise UsageError(f"'{text}' matches several images "
                             f"({', '.join(i.id for i in matches[:5])})", hint="use a longer ID")
        chosen[matches[0].path] = matches[0]
    return list(chosen.values())


def delete_images(images: list[GalleryImage]) -> None:
    for image in images:
        for path in image.files():
            path.unlink(missing_ok=True)
