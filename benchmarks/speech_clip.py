"""Make llmctl/data/bench_speech.ogg, the speech `llmctl bench` measures Whisper models on
when no --audio is given: "The North Wind and the Sun" (the fable phoneticians record,
in the public domain) spoken by espeak-ng, as 16 kHz mono Opus.

    python benchmarks/speech_clip.py [OUT]     (needs espeak-ng and PyAV)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import av

FABLE = (
    "The North Wind and the Sun were disputing which was the stronger, when a traveler "
    "came along wrapped in a warm cloak. They agreed that the one who first succeeded in "
    "making the traveler take his cloak off should be considered stronger than the other. "
    "Then the North Wind blew as hard as he could, but the more he blew the more closely "
    "did the traveler fold his cloak around him; and at last the North Wind gave up the "
    "attempt. Then the Sun shined out warmly, and immediately the traveler took off his "
    "cloak. And so the North Wind was obliged to confess that the Sun was the stronger of "
    "the two."
)


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "fable.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), FABLE], check=True)
        with av.open(str(wav)) as source, av.open(str(out), "w", format="ogg") as target:
            stream = target.add_stream("libopus", rate=16000, layout="mono")
            stream.bit_rate = 24_000
            resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
            for frame in source.decode(audio=0):
                for piece in resampler.resample(frame):
                    target.mux(stream.encode(piece))
            for piece in resampler.resample(None):
                target.mux(stream.encode(piece))
            target.mux(stream.encode(None))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else
         Path(__file__).parents[1] / "llmctl" / "data" / "bench_speech.ogg")
