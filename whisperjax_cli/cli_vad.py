"""``wjx vad FILE...``: where someone speaks, as TSV or JSON lines on stdout.

The command object is registered on the ``wjx`` group by cli.py (``cli.add_command(vad)``);
this module does not import cli.py. :func:`vad_flags` and :func:`vad_options_from_flags` give
any command the same ``--vad-*`` flags. JAX is imported only when the model runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, TextIO

import click

from whisperjax_cli.cli_common import EXIT_FAILED, EXIT_OK, run_guarded, say
from whisperjax_cli.errors import AudioError
SAMPLE_RATE = 16000

# flag -> VadOptions field; defaults are VadOptions' (None: not given).
VAD_FLAGS = (
    ("--vad-threshold", "threshold", "Speech probability at or above which a 32 ms chunk is speech [0.5]."),
    ("--vad-min-silence-ms", "min_silence_duration_ms", "Silence that ends a speech segment, ms [2000]."),
    ("--vad-speech-pad-ms", "speech_pad_ms", "Padding added to each side of a segment, ms [400]."),
    ("--vad-min-speech-ms", "min_speech_duration_ms", "Shorter speech segments are dropped, ms [0]."),
    ("--vad-max-speech-s", "max_speech_duration_s", "Longer speech is split at a pause, seconds [no limit]."),
)

VAD_EPILOG = """\b
Examples:
  wjx vad talk.mp3                              # file, start, end (seconds) per segment
  wjx vad -f json clips/ | jq -r '.start'
  wjx vad --vad-min-silence-ms 300 --vad-speech-pad-ms 100 call.wav

\b
Speech is found with Silero VAD v6 and faster-whisper's rules (same options and defaults).
tsv prints a header line, then 'file<TAB>start<TAB>end' per segment; json one
{"file": ..., "start": ..., "end": ...} object per segment and line. Times in seconds,
3 decimals. Exit codes: 0 ok, 1 some input failed (the others are printed), 2 usage.
"""


def vad_flags(fn):
    """Adds the ``--vad-*`` flags (floats, default None: VadOptions' default)."""
    for flag, field, help_text in reversed(VAD_FLAGS):
        fn = click.option(flag, field, type=float, default=None, help=help_text)(fn)
    return fn


def vad_options_from_flags(flags: dict[str, Any], base=None):
    """The :class:`~whisperjax_cli.vad.VadOptions` the flags ask for, on top of ``base``.

    Raises:
        UsageError: A value VadOptions rejects (exit code 2).
    """
    from whisperjax_cli.vad import VadOptions

    given = {field: flags[field] for _, field, _ in VAD_FLAGS if flags.get(field) is not None}
    return dataclasses.replace(VadOptions() if base is None else base, **given)


def _rows(label: str, speeches: list[dict], fmt: str) -> str:
    """One line per speech segment, times in seconds with 3 decimals."""
    lines = []
    for s in speeches:
        start, end = round(s["start"] / SAMPLE_RATE, 3), round(s["end"] / SAMPLE_RATE, 3)
        if fmt == "json":
            lines.append(json.dumps({"file": label, "start": start, "end": end}, ensure_ascii=False))
        else:
            lines.append(f"{label.replace(chr(9), ' ').replace(chr(10), ' ')}\t{start:.3f}\t{end:.3f}")
    return "".join(line + "\n" for line in lines)


def run_vad(inputs: tuple[str, ...], fmt: str, options, batch_size: int = 16,
            out: TextIO | None = None) -> int:
    """Prints the speech segments of every input in order; returns the exit code.

    Inputs are read and run ``batch_size`` at a time, so memory follows that many files. The
    model's programs are kept in the compile cache as transcribe's are (``WJX_CACHE_DIR``,
    ``WJX_NO_COMPILE_CACHE``): a later run reads them back instead of tracing and compiling.
    """
    from whisperjax_cli import programs, runtime
    from whisperjax_cli.cli_files import collect_inputs
    from whisperjax_cli.vad import batch_speech_timestamps
    from whisperjax_cli.vad_weights import load_weights

    out = sys.stdout if out is None else out
    found, errors = collect_inputs(inputs)
    for line in errors:
        say(line)
    if found:  # JAX is started only when there is audio to run
        runtime.configure(compile_cache=not runtime.compile_cache_disabled())
        programs.prefetch("vad")
    params = load_weights()
    runtime.start_up_done()
    if fmt == "tsv":
        out.write("file\tstart\tend\n")
    failed = bool(errors)
    for first in range(0, len(found), batch_size):
        loaded = []
        for item in found[first: first + batch_size]:
            try:
                loaded.append((item.label, item.loader()()))
            except AudioError as err:
                say(str(err))
                failed = True
        speeches = batch_speech_timestamps([a for _, a in loaded], options, params=params, batch_size=batch_size)
        out.write("".join(_rows(label, s, fmt) for (label, _), s in zip(loaded, speeches)))
        out.flush()
    return EXIT_FAILED if failed else EXIT_OK


@click.command("vad", epilog=VAD_EPILOG, short_help="Print where someone speaks in audio FILEs.")
@click.argument("inputs", nargs=-1, required=True, metavar="FILE...")
@click.option("-f", "--output-format", "fmt", type=click.Choice(["tsv", "json"]), default="tsv", show_default=True,
              help="tsv: a header, then file, start, end per segment; json: one object per segment and line.")
@vad_flags
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Files run through the model together.")
def vad(inputs: tuple[str, ...], fmt: str, batch_size: int, **flags) -> None:
    """Print the speech segments of audio FILEs (Silero VAD v6, faster-whisper's rules).

    Folders are searched; '-' reads stdin. Results go to stdout in input order.
    """
    run_guarded(False, lambda: run_vad(inputs, fmt, vad_options_from_flags(flags), batch_size))
