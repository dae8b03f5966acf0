"""The ``wjx`` command line: parse options, call the library, map errors to exit codes.

Exit codes: see :mod:`whisperjax_cli.cli_common` (also in ``wjx --help``). Errors are one line on stderr, ``wjx: <file>: <what went wrong>``; ``--debug`` adds the
traceback. JAX and the model code are imported inside the commands, so ``wjx --help`` and
usage errors return at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import click

from whisperjax_cli import __version__, cli_classify
from whisperjax_cli.cli_common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE, check_terminated, describe,
                                       load_for_cli, run_guarded, runtime_options, say)
from whisperjax_cli.cli_files import Input, Outputs, collect_inputs, existing_outputs
from whisperjax_cli.cli_serve import serve
from whisperjax_cli.cli_vad import VAD_FLAGS, vad, vad_flags, vad_options_from_flags
from whisperjax_cli.parallel_cli import batch_options, parallel_options, spread_model, start_run, summary_line
from whisperjax_cli.profile import Timings, maybe, track_compiles
from whisperjax_cli.progress import Reporter
from whisperjax_cli.parallel_hosts import Processes
from whisperjax_cli.errors import UsageError
from whisperjax_cli.writers import ALL_FORMATS, FORMATS

EPILOG = """\b
Examples:
  wjx transcribe talk.mp3                      # talk.txt in the current folder
  wjx transcribe -f srt -f vtt -o subs/ talks/ # every audio file under talks/
  wjx transcribe a.flac -f json -o - | jq .text
  cat a.flac | wjx transcribe - -f jsonl -o -  # one JSON segment per line, as decoded
  wjx transcribe -m openai/whisper-small --language fr --skip-existing talks/
  wjx classify clip.flac                       # spoken language, top 5 with scores
  wjx classify train data/ --out my-clf        # a classifier from data/<label>/<clips>
  wjx models list
  wjx models download openai/whisper-base
  wjx models convert tiny.en ./tiny-en-hf

\b
Exit codes: 0 all inputs done, 1 some inputs failed (the rest written),
2 usage error (bad option or value, unknown language, absent --device),
3 model cannot be loaded, 130 interrupted, 143 terminated, 129 hung up (no partial
files left), 141 stdout closed early (| head).
"""

TRANSCRIBE_EPILOG = """\b
Examples:
  wjx transcribe talk.mp3 -f srt               # talk.srt
  wjx transcribe -f all -o out/ a.wav b/       # txt srt vtt tsv json for each input
  wjx transcribe a.flac -f json -o -           # JSON on stdout, nothing else
  ffmpeg -i v.mkv -f wav - | wjx transcribe -  # audio from stdin (outputs: stdin.*)
  wjx transcribe --verbose --language de interview.m4a

\b
Inputs with the same name in different folders get distinct outputs
(a/talk.wav, b/talk.wav -> a_talk.txt, b_talk.txt). Progress bars are drawn on
stderr only when it is a terminal. Environment: WJX_MODEL (default model),
WJX_CACHE_DIR (models and compiled programs), WJX_NO_COMPILE_CACHE=1.
"""


# ---------------------------------------------------------------- the group


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="wjx")
def cli() -> None:
    """wjx: Whisper speech recognition on JAX, from the command line.

    Every command is also a Python call: see whisperjax_cli.longform.transcribe_files,
    whisperjax_cli.loading.load_model and whisperjax_cli.writers.
    """


def main() -> None:
    """Console-script entry point (``wjx``, ``python -m whisperjax_cli``).

    Usage errors are one line (``wjx: No such option: --bogus (see 'wjx transcribe --help')``),
    exit code 2. Once JAX is loaded, the process ends with ``os._exit`` after flushing stdout
    and stderr: the interpreter's teardown of JAX's objects takes about 0.4 s and has nothing
    left to save (outputs are written with fsync and renamed; compiled programs are cached as made).
    """
    from whisperjax_cli.runtime import keep_freed_memory, quiet_start

    keep_freed_memory()  # a wjx process's own allocator setting, never a library import's
    quiet_start()
    try:
        code = cli.main(prog_name="wjx", standalone_mode=False)
    except click.exceptions.UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "wjx"
        say(f"{err.format_message()} (see '{where} --help')")
        code = err.exit_code
    except click.exceptions.ClickException as err:
        say(err.format_message())
        code = err.exit_code
    except click.exceptions.Abort:
        code = EXIT_INTERRUPTED
    code = code if isinstance(code, int) else 0
    if "jax" not in sys.modules:
        sys.exit(code)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed pipe: the reader went away (| head)
        code = code or EXIT_PIPE
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


# ---------------------------------------------------------------- transcribe: options


OPTION_FLAGS = ("task", "language", "beam_size", "best_of", "patience", "length_penalty", "initial_prompt",
                "condition_on_previous_text", "compression_ratio_threshold", "logprob_threshold",
                "no_speech_threshold", "stop_loops", "mode", "batch_size", "prepend_punctuations",
                "append_punctuations", "refine_word_timestamps", "hallucination_silence_threshold")
SUBTITLE_FLAGS = ("highlight_words", "max_line_width", "max_line_count", "max_words_per_line")
WORD_FLAGS = SUBTITLE_FLAGS + ("prepend_punctuations", "append_punctuations", "refine_word_timestamps",
                               "hallucination_silence_threshold")


VAD_FIELDS = tuple(field for _, field, _ in VAD_FLAGS)


def subtitle_options(o: dict):
    """The :class:`~whisperjax_cli.writers.SubtitleOptions` of the srt/vtt flags, or None."""
    from whisperjax_cli.writers import SubtitleOptions

    given = {name: o[name] for name in SUBTITLE_FLAGS if o.get(name) is not None}
    return SubtitleOptions(**given) if given else None


def transcribe_options(o: dict):
    """The :class:`~whisperjax_cli.options.TranscribeOptions` the flags ask for (validated there:
    a bad value is a usage error, exit code 2). Flags left out keep the options' defaults."""
    from whisperjax_cli.options import TranscribeOptions

    if not o.get("word_timestamps"):
        needing = [f"--{n.replace('_', '-')}" for n in WORD_FLAGS if o.get(n) is not None]
        if needing:
            raise UsageError(needing[0], "needs --word-timestamps")
    given = {name: o[name] for name in OPTION_FLAGS if o.get(name) is not None}
    given["without_timestamps"] = not o["timestamps"]
    given["word_timestamps"] = bool(o.get("word_timestamps"))
    if o.get("vad_filter") is not None:
        given["vad_filter"] = o["vad_filter"]
    vad_given = {k: o[k] for k in VAD_FIELDS if o.get(k) is not None}
    if vad_given:
        from whisperjax_cli.vad import VadOptions, batched_vad_options

        if o.get("vad_filter") is False:
            raise UsageError(None, "--vad-* options need the VAD (they were given with --no-vad)")
        # On top of the mode's defaults (batched: 160 ms of silence ends a segment).
        base = batched_vad_options() if o["mode"] == "batched" else VadOptions()
        given["vad_parameters"] = vad_options_from_flags(vad_given, base)
    if o["temperature"] is not None:
        given["temperature"] = o["temperature"]
        given["temperature_increment_on_fallback"] = o["temperature_increment_on_fallback"]
    return TranscribeOptions.create(**given)


# ---------------------------------------------------------------- transcribe: the command


@cli.command(epilog=TRANSCRIBE_EPILOG)
@click.argument("inputs", nargs=-1, required=True, metavar="FILE...")
@click.option("-f", "--output-format", "formats", multiple=True, default=["txt"], show_default=True,
              type=click.Choice([*FORMATS, "all"]),
              help=f"Output format; repeat for several. all = {' '.join(ALL_FORMATS)}.")
@click.option("-o", "--output-dir", default=".", show_default=True,
              help="Folder for the outputs; '-' writes the one chosen format to stdout.")
@click.option("--timestamps/--no-timestamps", default=True, show_default=True,
              help="Decode with timestamp tokens (segments with times) or without.")
@click.option("--language", default=None, help="Spoken language (code or name, e.g. fr or French); default: detect.")
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default="transcribe", show_default=True,
              help="Transcribe, or translate into English.")
@click.option("--temperature", type=click.FloatRange(0.0, 1.0), default=None,
              help="Sampling temperature; default: 0 with fallback 0.2, 0.4 ... 1.0 (batched: 0 alone).")
@click.option("--temperature-increment-on-fallback", type=click.FloatRange(0.0, 1.0), default=0.2,
              show_default=True, help="Fallback step above --temperature (0: no fallback).")
@click.option("--beam-size", type=click.IntRange(min=1), default=None, help="Beam search width at temperature 0.")
@click.option("--best-of", type=click.IntRange(min=1), default=None, help="Candidates sampled at temperature > 0.")
@click.option("--patience", type=float, default=None, help="Beam search patience.")
@click.option("--length-penalty", type=float, default=None, help="Length penalty alpha (default: length norm).")
@click.option("--initial-prompt", default=None, help="Text to condition the first window on.")
@click.option("--condition-on-previous-text/--no-condition-on-previous-text", default=None,
              help="Prompt each window with the previous window's text [sequential: yes; batched: no].")
@click.option("--stop-loops/--no-stop-loops", default=True, show_default=True,
              help="End a sample once it repeats itself and try the next temperature (no: OpenAI's rule alone).")
@click.option("--compression-ratio-threshold", type=float, default=None, help="Fallback above this gzip ratio [2.4].")
@click.option("--logprob-threshold", type=float, default=None, help="Fallback below this average log prob [-1].")
@click.option("--no-speech-threshold", type=float, default=None, help="Silence above this no-speech prob [0.6].")
@click.option("--mode", type=click.Choice(["sequential", "batched"]), default="sequential", show_default=True,
              help="sequential: OpenAI's long-form loop; batched: pauses shortened, cut into windows decoded side by side.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Windows decoded together, over all devices [8 per device on CPU; from memory on GPU/TPU].")
@click.option("--word-timestamps", is_flag=True, default=False,
              help="Times for every word (JSON 'words'; subtitles cut at words with the options below).")
@click.option("--highlight-words", is_flag=True, default=None, help="srt/vtt: underline each word as it is spoken.")
@click.option("--max-line-width", type=click.IntRange(min=1), default=None,
              help="srt/vtt: characters per line (lines break between words).")
@click.option("--max-line-count", type=click.IntRange(min=1), default=None,
              help="srt/vtt: lines per cue (with --max-line-width).")
@click.option("--max-words-per-line", type=click.IntRange(min=1), default=None,
              help="srt/vtt: words per cue (without --max-line-width).")
@click.option("--prepend-punctuations", default=None, help="Marks merged into the word after them [\"'“¿([{-].")
@click.option("--append-punctuations", default=None, help="Marks merged into the word before them [\"'.。,，!！?？:：”)]}、].")
@click.option("--refine-words/--no-refine-words", "refine_word_timestamps", default=None,
              help="Snap word times to the pauses in the audio [yes]; no: OpenAI's times exactly.")
@click.option("--hallucination-silence-threshold", type=float, default=None,
              help="Seconds: skip silences longer than this around likely hallucinations (OpenAI's option).")
@click.option("--vad/--no-vad", "vad_filter", default=None,
              help="Decode only speech found by Silero VAD (faster-whisper's vad_filter) [sequential: no; batched: yes].")
@vad_flags
@click.option("--skip-existing", is_flag=True, help="Skip inputs whose every requested output exists.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Print '[mm:ss.mmm --> mm:ss.mmm] text' on stderr as decoded.")
@click.option("--profile", "profile", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write where the time went (seconds per phase: imports, model load, compile, "
                   "encoder, decode...) as JSON to this file.")
@click.option("--progress/--no-progress", "show_progress", default=None, hidden=True,
              help="Force progress bars on or off (default: on when stderr is a terminal).")
@parallel_options
@runtime_options
def transcribe(**options) -> None:
    """Transcribe audio FILEs (folders are searched; '-' reads stdin)."""
    run_guarded(options["debug"], lambda: run_transcribe(options))


def _check_options(o: dict) -> tuple[list[str], Optional[Path]]:
    """Validates option combinations before anything slow; returns (formats, output dir or None)."""
    from whisperjax_cli.writers import expand_formats

    formats = expand_formats(o["formats"])
    if o["output_dir"] != "-":
        return formats, Path(o["output_dir"])
    if len(formats) != 1:
        raise UsageError(None, f"-o - writes one format to stdout, not {len(formats)} ({' '.join(formats)})")
    if o["skip_existing"]:
        raise UsageError(None, "--skip-existing needs an output folder, not -o -")
    return formats, None


def run_transcribe(o: dict) -> int:
    """The transcribe command's body, on this process's devices and share of the inputs
    (several processes: ``--coordinator`` ..., see :mod:`whisperjax_cli.parallel_cli`); returns
    the exit code.

    Every process returns the same code: 1 when any input failed in any process. A process
    whose own part raised still joins the closing sums (as one failure), so the others do not
    wait for it forever; it then raises as it would alone.
    """
    started = time.monotonic()
    timings = Timings() if o.get("profile") else None
    options = transcribe_options(o)  # every bad value is a usage error here, before anything slow
    subtitles = subtitle_options(o)
    formats, output_dir = _check_options(o)
    processes = start_run(o)
    done = None
    try:
        done = _transcribe_share(o, options, formats, output_dir, processes, subtitles, timings)
    finally:
        counts = (1, 0, 0, 0) if done is None else (done[0], done[1], done[2].written, round(done[2].audio * 1000))
        failed, skipped, written, audio_ms = processes.totals(counts)
        processes.close()
    where = "stdout" if output_dir is None else str(output_dir)
    if processes.count == 1:
        if done[2].labels:  # alone and with nothing to decode: no summary, as cli.run_transcribe
            done[2].summary(where=where, failed=failed, skipped=skipped)
    elif processes.first and not o["quiet"]:
        say(summary_line(where, written, failed, skipped, audio_ms / 1000, time.monotonic() - started,
                         processes.count))
    if timings is not None:
        write_profile(o["profile"], timings, time.monotonic() - started)
    return EXIT_FAILED if failed else EXIT_OK


def write_profile(path: str, timings: Timings, seconds: float) -> None:
    """``--profile``: the phases of this process's run as JSON, with ``interpreter`` (from the
    process's start to the command) and ``other`` (what no phase covers) making up its wall time."""
    from whisperjax_cli.profile import cpu_description, process_seconds

    alive = process_seconds()
    if alive is not None:
        timings.add("interpreter", max(0.0, alive - seconds))
    total = alive if alive is not None else seconds
    timings.add("other", max(0.0, total - sum(timings.seconds.values())))
    try:
        timings.write(path, total_seconds=round(total, 4), cpu=cpu_description(), argv=sys.argv[1:])
    except OSError as err:
        say(f"{path}: cannot write the profile: {err.strerror or err}")


def _transcribe_share(o: dict, options, formats, output_dir, processes: Processes, subtitles=None,
                      timings: Optional[Timings] = None) -> tuple[int, int, Reporter]:
    """This process's share of the run: ``(failed, skipped, reporter)``."""
    inputs, errors = collect_inputs(o["inputs"])
    errors = errors if processes.first else []  # every process finds the same; counted once
    for line in errors:
        say(line)
    inputs = processes.share(inputs)
    skipped = 0
    if output_dir is not None and o["skip_existing"]:
        done = [existing_outputs(i, output_dir, formats) for i in inputs]
        if not o["quiet"]:
            for i in (i for i, d in zip(inputs, done) if d):
                say(f"{i.label}: skipped, its outputs exist")
        skipped = sum(done)
        inputs = [i for i, d in zip(inputs, done) if not d]
    show = o["show_progress"]
    if show is None:
        show = not o["quiet"] and sys.stderr.isatty()
    reporter = Reporter([i.label for i in inputs], show_progress=show and bool(inputs),
                                verbose=o["verbose"], quiet=o["quiet"])
    if not inputs:
        return len(errors), skipped, reporter
    from whisperjax_cli.loading import throughput_dtype

    dtype = o["dtype"] or (throughput_dtype(o["device"]) if options.mode == "batched" else None)
    with reporter:
        with reporter.status(f"loading {o['model']}"):
            model = spread_model(load_for_cli(o["model"], o["device"], dtype, o["threads"], o["no_compile_cache"],
                                              timings=timings), o)
        options = batch_options(options, model, o["batch_size"])
        with track_compiles(timings):
            failed = len(errors) + _transcribe_all(model, inputs, formats, output_dir, reporter, options, o["debug"],
                                                   subtitles, timings)
    return failed, skipped, reporter


def _transcribe_all(model, inputs: list[Input], formats, output_dir, reporter, options, debug: bool,
                    subtitles=None, timings: Optional[Timings] = None) -> int:
    """Decodes every input, writing each as it completes; returns how many failed."""
    from whisperjax_cli.longform import transcribe_files

    outputs = Outputs(inputs, formats, output_dir, reporter, subtitles)
    events = transcribe_files(model, [i.loader() for i in inputs], options=options, progress=reporter.progress,
                              timings=timings)
    failed = 0
    for event in events:
        check_terminated()  # before anything is written for this event
        if event.error is not None:
            if debug:
                traceback.print_exception(event.error)
            reporter.error(describe(event.error, inputs[event.index].label))
            outputs.failed(event.index)
            reporter.finished(event.index, ok=False)
            failed += 1
            continue
        reporter.segments(event.index, event.segments)
        outputs.segments(event.index, event.segments)
        if event.transcript is not None:
            with maybe(timings, "writing"):
                ok = outputs.complete(event.index, event.transcript)
            failed += not ok
            reporter.finished(event.index, ok=ok, seconds=event.transcript.duration)
    return failed


# ---------------------------------------------------------------- models


@cli.group()
def models() -> None:
    """List, download and convert models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model, one per line.")
def models_list(as_json: bool) -> None:
    """Bundled and cached models, with size on disk and whether multilingual."""
    run_guarded(False, lambda: _models_list(as_json))


def _models_list(as_json: bool) -> int:
    from whisperjax_cli.catalog import list_models

    rows = list_models()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return EXIT_OK
    click.echo(f"{'NAME':32} {'SOURCE':8} {'SIZE':>9} {'MULTILINGUAL':12} PATH")
    for r in rows:
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.0f} MB"
        multi = {True: "yes", False: "no", None: "?"}[r["multilingual"]]
        click.echo(f"{r['name']:32} {r['source']:8} {size:>9} {multi:12} {r['path'] or r['note']}")
    return EXIT_OK


@models.command("download")
@click.argument("model_id")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def models_download(model_id: str, debug: bool) -> None:
    """Fetch MODEL_ID from the Hugging Face Hub into its cache; prints the local folder.

    MODEL_ID is a Hub id (openai/whisper-small) or a short name (small, large-v3, turbo).
    """
    def body() -> int:
        from whisperjax_cli.hub import HUB_ALIASES, hub_snapshot

        repo = HUB_ALIASES.get(model_id, model_id)
        if "/" not in repo:
            raise UsageError(model_id, f"not a Hub id (owner/name) or one of: {', '.join(sorted(HUB_ALIASES))}")
        click.echo(str(hub_snapshot(repo, download=True)))
        return EXIT_OK

    run_guarded(debug, body)


@models.command("convert")
@click.argument("source")
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Weight dtype in model.safetensors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def models_convert(source: str, destination: Path, dtype: str, debug: bool) -> None:
    """Write SOURCE (any model wjx reads) as a Hugging Face folder DESTINATION.

    DESTINATION gets config.json, model.safetensors, tokenizer.json and, when known,
    generation_config.json and preprocessor_config.json. It must not exist yet (or be empty).
    """
    def body() -> int:
        from whisperjax_cli.catalog import convert_model

        click.echo(str(convert_model(source, destination, dtype)))
        return EXIT_OK

    run_guarded(debug, body)


cli.add_command(cli_classify.classify)  # and `wjx classify train`, which it hands on
cli.add_command(vad)
cli.add_command(serve)
