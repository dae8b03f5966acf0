"""The ``wjx`` command line: parse options, call the library, map errors to exit codes.

Exit codes (also in ``wjx --help``):

====  ==========================================================================
0     every input was transcribed (or skipped with ``--skip-existing``)
1     some inputs failed; the others were still written
2     usage error: unknown option, bad value, unknown language, absent ``--device``
3     the model cannot be found or loaded
130   interrupted (Ctrl-C); no partial output file is left behind
====  ==========================================================================

Errors are one line on stderr, ``wjx: <file>: <what went wrong>``; ``--debug`` adds the
traceback. JAX and the model code are imported inside the commands, so ``wjx --help`` and
usage errors return at once.
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import click

from whisperjax_cli import __version__
from whisperjax_cli.cli_files import Input, Outputs, collect_inputs, existing_outputs
from whisperjax_cli.errors import ModelError, UsageError, WjxError
from whisperjax_cli.writers import ALL_FORMATS, FORMATS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DTYPES = ("float32", "bfloat16", "float16", "mixed")

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
3 model cannot be loaded, 130 interrupted (no partial files left).
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


# ---------------------------------------------------------------- errors and exit codes


def _say(message: str) -> None:
    click.echo(f"wjx: {message}", err=True)


def _describe(err: BaseException, subject: Optional[str] = None) -> str:
    """One line for an error: WjxErrors carry their subject; others get the input's name."""
    if isinstance(err, WjxError):
        return str(err)
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return f"{subject}: {text}" if subject else text


def run_guarded(debug: bool, body: Callable[[], int]) -> None:
    """Runs a command body and exits with the code its outcome maps to."""
    try:
        code = body()
    except (click.exceptions.ClickException, click.exceptions.Exit):
        raise
    except BrokenPipeError:
        # Whoever read stdout went away (``| head``): stop quietly, as other Unix tools do.
        _silence_stdout()
        code = EXIT_FAILED
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _say("interrupted")
        code = EXIT_INTERRUPTED
    except WjxError as err:
        if debug:
            traceback.print_exc()
        _say(str(err))
        code = EXIT_USAGE if isinstance(err, UsageError) else EXIT_MODEL if isinstance(err, ModelError) else EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - a bug or an environment problem: one line, not a traceback
        if debug:
            traceback.print_exc()
        _say(f"error: {_describe(err)}" + ("" if debug else " (--debug shows the traceback)"))
        code = EXIT_FAILED
    click.get_current_context().exit(code)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


# ---------------------------------------------------------------- the group


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="wjx")
def cli() -> None:
    """wjx: Whisper speech recognition on JAX, from the command line.

    Every command is also a Python call: see whisperjax_cli.transcribe.transcribe_files,
    whisperjax_cli.models.load_model and whisperjax_cli.writers.
    """


def main() -> None:
    """Console-script entry point (``wjx``, ``python -m whisperjax_cli``).

    Once JAX is loaded, the process ends with ``os._exit`` after flushing stdout and stderr:
    the interpreter's teardown of JAX's objects takes about 0.4 s and has nothing left to
    save (outputs are written with fsync and renamed; compiled programs are cached as made).
    """
    try:
        cli(prog_name="wjx")
    except SystemExit as done:
        if "jax" not in sys.modules or not isinstance(done.code, (int, type(None))):
            raise
        code = done.code or 0
        try:
            sys.stdout.flush()
        except (OSError, ValueError):  # a closed pipe: the results did not all arrive
            code = code or EXIT_FAILED
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)


def runtime_options(fn):
    """Options every model-running command shares (transcribe, and classify when it lands)."""
    options = [
        click.option("-m", "--model", default=lambda: os.environ.get("WJX_MODEL") or "tiny.en",
                     show_default="$WJX_MODEL or tiny.en",
                     help="Model: a local directory, a bundled name (tiny.en, base) or a Hub id "
                          "(openai/whisper-small, or a short name such as small)."),
        click.option("--device", type=click.Choice(["cpu", "gpu", "tpu"]), default=None,
                     help="Run on this device; exit 2 if JAX has none. Default: an accelerator if any, else CPU."),
        click.option("--dtype", type=click.Choice(DTYPES), default=None,
                     help="Compute dtype. Default: float32 on CPU, bfloat16 on accelerators; for "
                          "transcribe --mode batched on a CPU with bfloat16 dot instructions, mixed: "
                          "float32 with the encoder's and the output projection's products in bfloat16."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for XLA (pins the process to that many cores)."),
        click.option("--no-compile-cache", is_flag=True,
                     help="Do not keep compiled programs under the cache dir (also WJX_NO_COMPILE_CACHE=1)."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_for_cli(model: str, device, dtype, threads, no_compile_cache, loader: Optional[Callable] = None,
                 on_params: Optional[Callable] = None):
    """Sets up JAX (threads, device, compile cache), then ``loader(model, dtype=dtype)``.

    ``loader`` defaults to :func:`whisperjax_cli.models.load_model` (which is then given
    ``on_params``); failures become ModelError.
    """
    from whisperjax_cli import models, runtime

    if loader is None and "jax" not in sys.modules:
        if threads is not None:
            runtime.limit_threads(threads)  # before the preload's threads start (configure repeats it)
        # The weights are read and laid out on a background thread while JAX imports.
        models.preload_model(model, dtype, device)
    runtime.configure(device, threads, compile_cache=not runtime.compile_cache_disabled(no_compile_cache))
    try:
        if loader is None and on_params is not None:
            return models.load_model(model, dtype=dtype, on_params=on_params)
        return (loader or models.load_model)(model, dtype=dtype)
    except WjxError:
        raise
    except (OSError, ValueError) as err:
        raise ModelError(model, f"cannot load: {_describe(err)}") from None


# ---------------------------------------------------------------- transcribe: options


def decode_options(o: dict) -> dict:
    """Keyword arguments for :func:`~whisperjax_cli.transcribe.transcribe_files` from options."""
    kwargs = dict(task=o["task"], without_timestamps=not o["timestamps"], mode=o["mode"],
                  condition_on_previous_text=o["condition_on_previous_text"], stop_loops=o["stop_loops"])
    if o["temperature"] is not None:
        t, step = o["temperature"], o["temperature_increment_on_fallback"]
        # openai-whisper: fall back from T in steps up to 1.0; a step of 0 means no fallback.
        kwargs["temperature"] = (t,) if not step else tuple(
            round(t + k * step, 6) for k in range(int((1.0 - t) / step + 1e-6) + 1))
    for name in ("language", "beam_size", "best_of", "patience", "length_penalty", "initial_prompt",
                 "batch_size", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold"):
        if o[name] is not None:
            kwargs[name] = o[name]
    return kwargs


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
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Windows decoded together [8].")
@click.option("--skip-existing", is_flag=True, help="Skip inputs whose every requested output exists.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Print '[mm:ss.mmm --> mm:ss.mmm] text' on stderr as decoded.")
@click.option("--progress/--no-progress", "show_progress", default=None, hidden=True,
              help="Force progress bars on or off (default: on when stderr is a terminal).")
@runtime_options
def transcribe(**options) -> None:
    """Transcribe audio FILEs (folders are searched; '-' reads stdin)."""
    run_guarded(options["debug"], lambda: run_transcribe(options))


def _check_options(o: dict) -> tuple[list[str], Optional[Path]]:
    """Validates option combinations before anything slow; returns (formats, output dir or None)."""
    from whisperjax_cli.tokenizer import normalize_language
    from whisperjax_cli.writers import expand_formats

    if o["language"] is not None:
        o["language"] = normalize_language(o["language"])
    formats = expand_formats(o["formats"])
    if o["output_dir"] != "-":
        return formats, Path(o["output_dir"])
    if len(formats) != 1:
        raise UsageError(None, f"-o - writes one format to stdout, not {len(formats)} ({' '.join(formats)})")
    if o["skip_existing"]:
        raise UsageError(None, "--skip-existing needs an output folder, not -o -")
    return formats, None


def run_transcribe(o: dict) -> int:
    """The transcribe command's body; returns the exit code."""
    from whisperjax_cli.progress import Reporter

    formats, output_dir = _check_options(o)
    inputs, errors = collect_inputs(o["inputs"])
    for line in errors:
        _say(line)
    if output_dir is not None and o["skip_existing"]:
        done = [existing_outputs(i, output_dir, formats) for i in inputs]
        if not o["quiet"]:
            for i in (i for i, d in zip(inputs, done) if d):
                _say(f"{i.label}: skipped, its outputs exist")
        inputs = [i for i, d in zip(inputs, done) if not d]
    if not inputs:
        return EXIT_FAILED if errors else EXIT_OK
    on_params = _read_ahead(inputs, o)
    from whisperjax_cli.models import throughput_dtype

    dtype = o["dtype"] or (throughput_dtype(o["device"]) if o["mode"] == "batched" else None)
    model = load_for_cli(o["model"], o["device"], dtype, o["threads"], o["no_compile_cache"], on_params=on_params)
    show = o["show_progress"]
    if show is None:
        show = not o["quiet"] and sys.stderr.isatty()
    failed = len(errors)
    with Reporter([i.label for i in inputs], show_progress=show, verbose=o["verbose"]) as reporter:
        failed += _transcribe_all(model, inputs, formats, output_dir, reporter, o)
    return EXIT_FAILED if failed else EXIT_OK


READ_AHEAD_SECONDS = 120  # longer inputs: the first window's log-mel needs a pass over it all


def _read_ahead(inputs: list[Input], o: dict) -> Optional[Callable]:
    """Start-up of a short single-file run: what can go on while JAX and the model load.

    For one audio file transcribed in sequential mode, the file is decoded on a background
    thread from now on (the transcription takes that audio instead of reading it again), and
    the returned ``load_model(on_params=...)`` hook starts the first window's encoder pass
    (``runtime.speculate``, on a background thread) as soon as the weights are on the device,
    while the main thread still loads the tokenizer and imports the decoding code. The window
    is ``features.first_window``, the one ``Transcriber`` encodes first; the encoder result is
    only used by a call with equal input, so the output cannot change. None (nothing done) for other runs.
    """
    if len(inputs) != 1 or inputs[0].path is None or o["mode"] != "sequential":
        return None
    import threading
    from concurrent.futures import Future

    from whisperjax_cli import features
    from whisperjax_cli.audio import SAMPLE_RATE, load_audio  # imported here: the thread imports nothing

    path, audio = str(inputs[0].path), Future()

    def decode():
        try:
            audio.set_result(load_audio(path))
        except BaseException as err:  # noqa: BLE001 - Input.loader reads it again and reports it
            audio.set_exception(err)

    threading.Thread(target=decode, name="wjx-audio", daemon=True).start()
    inputs[0].ahead = audio
    # A multilingual model without --language first encodes the language-ID window.
    detect = o["language"] is None

    def on_params(params, dims) -> None:
        from whisperjax_cli import runtime

        try:
            samples = audio.result()
        except Exception:  # noqa: BLE001 - reported when the transcription reads it
            return
        if len(samples) > READ_AHEAD_SECONDS * SAMPLE_RATE:
            return
        # Built here (a few ms): a background thread would wait for the GIL at every numpy call.
        mel = features.LogMelWindows(samples, dims.n_mels, padding=features.N_SAMPLES)
        content = mel.n_frames - features.N_FRAMES
        if content > 0:
            window = features.first_window(mel, content, language_id=detect and dims.is_multilingual)
            runtime.speculate("encode", [params, window[None]])

    return on_params


def _transcribe_all(model, inputs: list[Input], formats, output_dir, reporter, o: dict) -> int:
    """Decodes every input, writing each as it completes; returns how many failed."""
    from whisperjax_cli.transcribe import transcribe_files

    outputs = Outputs(inputs, formats, output_dir, reporter)
    events = transcribe_files(model, [i.loader() for i in inputs], progress=reporter.progress,
                              **decode_options(o))
    failed = 0
    for event in events:
        if event.error is not None:
            if o["debug"]:
                traceback.print_exception(event.error)
            reporter.error(_describe(event.error, inputs[event.index].label))
            outputs.failed(event.index)
            reporter.finished(event.index)
            failed += 1
            continue
        reporter.segments(event.index, event.segments)
        outputs.segments(event.index, event.segments)
        if event.transcript is not None:
            failed += not outputs.complete(event.index, event.transcript)
            reporter.finished(event.index)
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
        from whisperjax_cli.models import HUB_ALIASES, hub_snapshot

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


# `wjx classify` and `wjx classify train` live in cli_classify.py; importing it registers them
# on the group above (it imports this module's shared options, inputs and exit codes).
from whisperjax_cli import cli_classify  # noqa: E402,F401
