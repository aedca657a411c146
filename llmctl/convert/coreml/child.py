"""`--low-memory`: one component converted in a fresh Python process, whose memory goes
back to the system when it exits, so the peak is the largest component's rather than the
sum of what torch and coremltools keep around (Apple's FAQ advice for 8 GB Macs).

The protocol: the parent runs `python -m llmctl.convert.coreml.child JOB`, JOB being the
component, the source folder, the output package, the geometry and the export settings as
JSON. The child answers in JSON lines on stdout: {"status": ...} for each step, then
{"result": ...} (what the conversion reports) or {"error": ...} (an llmctl error, rebuilt
in the parent). The libraries' own output goes to stderr, which the parent sends to the
conversion's log.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmctl.convert.coreml.options import RESOURCE_NAMES
from llmctl.convert.coreml.pipeline import Pipeline
from llmctl.errors import EngineFailure, LlmctlError, UsageError, VerificationFailed


def convert_in_child(component: str, pipeline: Pipeline, settings: Any, out: Path, log: Path,
                     step: Callable[[str], None]) -> dict[str, Any]:
    """Convert `component` of `pipeline` with the export `settings` into `out`, in a
    process of its own; `step` gets its progress, `log` its libraries' output."""
    name = RESOURCE_NAMES[component]
    job = {"component": component, "source": str(pipeline.path), "out": str(out),
           "geometry": asdict(pipeline.geometry), "settings": asdict(settings)}
    step(f"{name}: starting its own process")
    with open(log, "a") as output:
        child = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(job)],
                                 stdout=subprocess.PIPE, stderr=output, text=True)
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        assert child.stdout is not None
        for line in child.stdout:
            message = json.loads(line)
            if "status" in message:
                step(f"{name}: {message['status']}")
            result = message.get("result", result)
            error = message.get("error", error)
        code = child.wait()
    if error:
        raise _rebuild_error(error)
    if code != 0 or result is None:
        why = "killed, probably for lack of memory" if code in (-9, 137) else f"exit {code}"
        raise EngineFailure(f"converting {name} failed in its process ({why}); its "
                            f"output: {log}")
    return result


def _error_message(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, UsageError):
        return {"type": "usage", "message": str(exc), "hint": exc.hint}
    if isinstance(exc, VerificationFailed):
        return {"type": "verification", "path": exc.path, "reason": exc.reason}
    return {"type": "failure", "message": f"{type(exc).__name__}: {exc}"}


def _rebuild_error(error: dict[str, Any]) -> LlmctlError:
    if error["type"] == "usage":
        return UsageError(error["message"], hint=error.get("hint"))
    if error["type"] == "verification":
        return VerificationFailed(error["path"], error["reason"])
    return EngineFailure(error["message"])


def main(argv: list[str]) -> int:
    """The child: convert the one component JOB names, answering in JSON lines."""
    from llmctl.convert.coreml.attention import AttentionImplementation
    from llmctl.convert.coreml.export import ExportSettings, Geometry, convert_component

    job = json.loads(argv[0])
    stdout = sys.stdout

    def send(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message, default=str) + "\n")
        stdout.flush()

    settings = job["settings"]
    try:
        # The libraries' chatter goes to stderr, which the parent sends to its log.
        with contextlib.redirect_stdout(sys.stderr):
            result = convert_component(
                job["component"], Path(job["source"]), Geometry(**job["geometry"]),
                ExportSettings(**(settings | {
                    "attention": AttentionImplementation(settings["attention"])})),
                Path(job["out"]), lambda status: send({"status": status}))
    except LlmctlError as exc:
        send({"error": _error_message(exc)})
        return 1
    send({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
