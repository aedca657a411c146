"""The child processes some conversions run their work in (onnxruntime-genai's model
builder, ExecuTorch's export): their output read piece by piece as progress, and a child
stopped as Ctrl-C would stop it before the work folder it writes in is deleted."""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Callable

STOP_SECONDS = 30  # a child told to stop (Ctrl-C) gets this long before it is killed


def read_pieces(child: subprocess.Popen, on_piece: Callable[[str], None]) -> None:
    """Hand what the child writes to `on_piece`, split at newlines and carriage returns
    (tqdm redraws its bar after a carriage return)."""
    assert child.stdout is not None
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    held = ""
    while chunk := os.read(child.stdout.fileno(), 65536):
        *pieces, held = re.split(r"[\r\n]", held + decode(chunk))
        for piece in pieces:
            on_piece(piece)
    on_piece(held + decode(b"", True))


def stop(child: subprocess.Popen) -> None:
    """Stop the child as Ctrl-C would (it may have had it from the terminal already), and
    wait for it."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def killed_for_memory(code: int) -> bool:
    """Whether an exit code is the kernel's SIGKILL, which the OOM killer sends."""
    return code in (-9, 137)
