"""llmctl transcribe: speech to text on Whisper; the transcript goes to stdout or files."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.options import EngineOpt, ForceOpt, QuietOpt, ThreadsOpt, complete_model
from llmctl.cli.output import Output, audio_progress

SpeechModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="A speech model: NAME[:TAG] (whisper, whisper:small, ...), a "
    "CTranslate2 or mlx-whisper folder, a whisper.cpp ggml .bin, or an ID prefix.",
    autocompletion=complete_model, show_default=False)]


def transcribe(
    model: SpeechModelArg,
    audio: Annotated[list[str], typer.Argument(
        metavar="AUDIO...", help="Audio or video files (wav, mp3, m4a, flac, ogg, mp4, mkv, "
        "anything FFmpeg decodes); - reads one from stdin.", show_default=False)],
    format: Annotated[str, typer.Option(
        "--format", "-F", help="text, srt, vtt, json or tsv.")] = "text",
    output: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="PATH", help="A file, or a folder (existing, or ending "
        "in /) for one transcript per input named after it. [default: stdout]",
        show_default=False)
    ] = None,
    language: Annotated[str | None, typer.Option(
        help="The spoken language's code (en, fr, de, ...). [default: detected, and "
        "printed on stderr]", show_default=False)] = None,
    task: Annotated[str, typer.Option(
        help="transcribe, or translate (into English).")] = "transcribe",
    initial_prompt: Annotated[str | None, typer.Option(
        help="Text the speech continues: names, spellings, punctuation style.",
        show_default=False)] = None,
    vad: Annotated[bool, typer.Option(
        "--vad", help="Skip silence (voice activity detection) before decoding.")] = False,
    temperature: Annotated[float | None, typer.Option(
        help="0 decodes greedily or with the beam. [default: 0, then up to 1 for windows "
        "that decode badly]", show_default=False)] = None,
    beam_size: Annotated[int, typer.Option(help="Beams (1: greedy).")] = 5,
    word_timestamps: Annotated[bool, typer.Option(
        "--word-timestamps", help="Time every word (in --format json).")] = False,
    threads: ThreadsOpt = None,
    device: Annotated[str | None, typer.Option(
        help="cpu or cuda (faster-whisper); cpu or gpu (mlx-whisper). [default: the "
        "engine's best]", show_default=False)] = None,
    compute_type: Annotated[str | None, typer.Option(
        help="faster-whisper's weights in memory: int8, float16, float32, ... "
        "[default: int8 on a CPU, float16 on a GPU]", show_default=False)] = None,
    engine: EngineOpt = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Load time, real-time factor and peak memory on stderr.")
    ] = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Transcribe speech to text with a Whisper model.

    Each input's transcript is written as it is decoded: to stdout one input after the
    other, or with -o to a file (or one file per input in a folder), written under a
    temporary name and renamed when whole, so Ctrl-C (exit 130) leaves no partial file.
    The detected language, progress for long audio (audio time done, time left) and, with
    --verbose, the statistics go to stderr. --format json gives, per input, the segments
    with start, end, text, avg_logprob and no_speech_prob (and words with
    --word-timestamps). A catalog model that is not stored yet is pulled first.

    Examples:

    \b
        llmctl transcribe whisper memo.m4a
        llmctl transcribe whisper memo.m4a | llmctl run smollm2 "Summarise this"
        llmctl transcribe whisper:small talk.mp4 --format srt -o talk.srt
        llmctl transcribe whisper *.wav --format vtt -o subtitles/
        llmctl transcribe whisper interview.flac --language fr --task translate
        curl -s https://example.com/clip.ogg | llmctl transcribe whisper -
        llmctl transcribe whisper lecture.mp3 --vad --format json --word-timestamps
    """
    from llmctl import loader, transcript
    from llmctl.cli.options import open_store
    from llmctl.engines.speech import Detected, SpeechLoadOptions, SpeechRequest, check_request
    from llmctl.errors import UsageError
    from llmctl.store.names import parse_reference

    out = Output(quiet=quiet)
    if format not in transcript.FORMATS:
        raise UsageError(f"unknown --format '{format}'",
                         hint=f"choose one of: {', '.join(transcript.FORMATS)}")
    request = SpeechRequest(language, task, initial_prompt, vad, temperature, beam_size,
                            word_timestamps)
    check_request(request)
    destinations = transcript.plan_outputs(audio, output, format)
    sources = transcript.read_sources(audio)
    longest = max((s.seconds or 0.0 for s in sources), default=0.0)
    with out.progress() as report:
        opened = loader.open_speech(
            parse_reference(model), *open_store(), audio_seconds=longest, engine=engine,
            options=SpeechLoadOptions(device, compute_type, threads), force=force,
            on_event=report, on_note=out.note)

    def on_language(source: str, detected: Detected) -> None:
        if detected.probability is not None:
            out.info(f"{source}: language {detected.language} "
                     f"(detected, p={detected.probability:.2f})")
        elif language is None:
            out.info(f"{source}: language {detected.language} ("
                     + ("the model knows no other)" if detected.only else "detected)"))

    try:
        with audio_progress(out) as progress:
            for source, path in zip(sources, destinations, strict=True):
                done = transcript.transcribe_one(
                    opened.engine, source, request, path, format, opened.model.name,
                    load_seconds=opened.load_seconds, on_language=on_language,
                    on_progress=progress)
                if verbose:
                    out.speech_stats(source.label, done.stats)
                if path is not None:
                    out.line(str(path))
    finally:
        opened.engine.close()
