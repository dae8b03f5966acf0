"""What every ``wjx`` command shares: exit codes, one-line errors, signals, runtime options and
model loading. The commands themselves live in ``cli.py`` (the group, transcribe, models),
``cli_classify.py`` and ``cli_vad.py``; each imports this module, none imports another.

Exit codes:

====  ==========================================================================
0     every input succeeded (or was skipped with ``--skip-existing``)
1     some inputs failed; the others were still written
2     usage error: unknown option, bad value, unknown language, absent ``--device``
3     the model cannot be found or loaded
129   hung up (SIGHUP); no partial output file is left behind
130   interrupted (Ctrl-C); no partial output file is left behind
141   stdout was closed early (``| head``): wjx stops quietly, as Unix tools do
143   terminated (SIGTERM); no partial output file is left behind
====  ==========================================================================
"""

from __future__ import annotations

import io
import os
import signal
import sys
import traceback
from typing import Callable, Optional

import click

from whisperjax_cli.errors import ModelError, UsageError, WjxError
from whisperjax_cli.interrupts import (Terminated, check_terminated, forget_signals,  # noqa: F401 - re-exported
                                      handle_termination)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 128 + 13
DTYPES = ("float32", "bfloat16", "float16", "mixed")

# C0 and C1 control characters (and DEL) shown escaped, so one error stays one line whatever a
# file name holds: "bad\nline.wav" prints as bad\nline.wav.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(0x20), *range(0x7F, 0xA0)]}


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b`` ...): always one line."""
    return str(text).translate(_ESCAPES)


def say(message: str) -> None:
    """``wjx: <message>`` on stderr, on one line."""
    click.echo(f"wjx: {one_line(message)}", err=True)


def describe(err: BaseException, subject: Optional[str] = None) -> str:
    """One line for an error: WjxErrors carry their subject; others get the input's name."""
    if isinstance(err, WjxError):
        return one_line(str(err))
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return one_line(f"{subject}: {text}" if subject else text)


def exit_code(err: BaseException) -> int:
    """The documented exit code of an error that ended a command."""
    if isinstance(err, Terminated):
        return 128 + err.signum
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, UsageError):
        return EXIT_USAGE
    if isinstance(err, ModelError):
        return EXIT_MODEL
    return EXIT_FAILED


def run_guarded(debug: bool, body: Callable[[], int]) -> None:
    """Runs a command body and exits with the code its outcome maps to."""
    previous = handle_termination()
    try:
        code = body()
    except (click.exceptions.ClickException, click.exceptions.Exit):
        raise
    except BrokenPipeError:
        # Whoever read stdout went away (``| head``): stop quietly, as other Unix tools do.
        silence_stdout()
        code = EXIT_PIPE
    except (KeyboardInterrupt, Terminated) as err:
        if debug:
            traceback.print_exc()
        say("interrupted" if isinstance(err, KeyboardInterrupt) else f"terminated ({err})")
        code = exit_code(err)
    except WjxError as err:
        if debug:
            traceback.print_exc()
        say(str(err))
        code = exit_code(err)
    except Exception as err:  # noqa: BLE001 - a bug or an environment problem: one line, not a traceback
        if debug:
            traceback.print_exc()
        say(f"error: {describe(err)}" + ("" if debug else " (--debug shows the traceback)"))
        code = EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        forget_signals()
    click.get_current_context().exit(code)


def silence_stdout() -> None:
    """Points stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def runtime_options(fn):
    """Options every model-running command shares (transcribe, classify)."""
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
                 timings=None):
    """Sets up JAX (threads, device, compile cache), then ``loader(model, dtype=dtype)``.

    ``loader`` defaults to :func:`whisperjax_cli.loading.load_model`, whose weights are then
    read and laid out on a background thread while JAX imports; failures become ModelError.
    ``timings`` (:class:`~whisperjax_cli.profile.Timings`) gets ``imports`` (JAX, its backend
    and the decoding modules) and ``model load``.
    """
    from whisperjax_cli import runtime
    from whisperjax_cli.profile import maybe

    pending = None
    if loader is None and "jax" not in sys.modules:
        from whisperjax_cli import loading

        if threads is not None:
            runtime.limit_threads(threads)  # before the reading threads start (configure repeats it)
        pending = loading.read_ahead(model, dtype, device)
    with maybe(timings, "imports"):
        runtime.configure(device, threads, compile_cache=not runtime.compile_cache_disabled(no_compile_cache))
        from whisperjax_cli import programs

        programs.prefetch(f"{model}\0{dtype}")  # read back while Flax and the model are imported
        if timings is not None:  # imported later anyway; here its import is told apart
            import whisperjax_cli.longform  # noqa: F401
    try:
        with maybe(timings, "model load"):
            if loader is None:
                from whisperjax_cli.loading import load_model

                return load_model(model, dtype=dtype, pending=pending)
            return loader(model, dtype=dtype)
    except WjxError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelError(model, f"cannot load: {describe(err)}") from None
    finally:
        runtime.start_up_done()
