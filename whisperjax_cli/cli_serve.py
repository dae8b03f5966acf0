"""``wjx serve``: the OpenAI-compatible transcription server, from the command line.

The command object is registered on the ``wjx`` group by cli.py (``cli.add_command(serve)``);
this module does not import cli.py. The server itself is :mod:`whisperjax_cli.server`; this
module parses flags, loads the model once, and runs it. Starlette and uvicorn are imported only
when the command runs (``pip install 'whisperjax-cli[serve]'``).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os

import click

from whisperjax_cli.cli_common import EXIT_OK, Terminated, load_for_cli, run_guarded, runtime_options, say
from whisperjax_cli.errors import UsageError

SERVE_EPILOG = """\b
Examples:
  wjx serve -m tiny.en                               # http://127.0.0.1:8000/v1
  WJX_API_KEY=secret wjx serve -m base --host 0.0.0.0 --port 9000
  curl http://127.0.0.1:8000/v1/audio/transcriptions -F file=@talk.mp3 -F model=whisper-1

\b
Speaks OpenAI's audio API: POST /v1/audio/transcriptions and /v1/audio/translations
(multipart: file, model (any), language, prompt, temperature, response_format json | text |
srt | verbose_json | vtt, timestamp_granularities[], stream=true for server-sent events),
GET /v1/models and GET /health. Concurrent requests share decode batches. SIGTERM (or
Ctrl-C) stops accepting, lets in-flight requests finish within --shutdown-timeout, and
exits 0 (130 for Ctrl-C). Exit codes otherwise as for transcribe: 2 usage, 3 model.
"""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve", epilog=SERVE_EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 or :: to accept other machines (set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", envvar="WJX_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on the API routes (default: no key).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=25.0, show_default=True,
              help="Largest audio file accepted (413 above), counted as it streams in.")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests in the server at once, uploading or decoding; more get 503.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds from a request's arrival to its answer; past it, 504 and its work is dropped.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="On SIGTERM, seconds for in-flight requests to finish.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows decoded together, across requests.")
@runtime_options
def serve(**options) -> None:
    """Serve a model over OpenAI's audio API (transcriptions, translations)."""
    run_guarded(options["debug"], lambda: run_serve(options))


def run_serve(o: dict) -> int:
    """Checks the flags, loads the model once, and serves until SIGTERM or Ctrl-C."""
    missing = [name for name in ("starlette", "uvicorn", "python_multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(None, f"wjx serve needs {', '.join(missing)}: pip install 'whisperjax-cli[serve]'")
    if o["api_key"] is not None and not o["api_key"].strip():
        raise UsageError("--api-key", "must not be empty")
    if not _loopback(o["host"]) and o["api_key"] is None:
        say(f"warning: listening on {o['host']} without --api-key: anyone who reaches this port may use it")
    # The model first: the server's modules import JAX, and load_for_cli sets JAX up before that.
    model = load_for_cli(o["model"], o["device"], o["dtype"], o["threads"], o["no_compile_cache"])
    from whisperjax_cli.server import ServerConfig, make_server

    config = ServerConfig(api_key=o["api_key"], max_upload_mb=o["max_upload_mb"], max_queue=o["max_queue"],
                          request_timeout=o["request_timeout"], shutdown_timeout=o["shutdown_timeout"],
                          batch_size=o["batch_size"])
    server = make_server(model, config, o["host"], o["port"], log_level="debug" if o["debug"] else "info")
    host = f"[{o['host']}]" if ":" in o["host"] else o["host"]
    say(f"{model.name} loaded; serving on http://{host}:{o['port']}/v1 (pid {os.getpid()}; Ctrl-C or SIGTERM stops)")
    try:
        server.run()
    except Terminated:
        # uvicorn caught SIGTERM, let the requests in flight finish, and raised it again on its
        # way out: a graceful stop, so exit 0 (a service manager reads that as clean).
        say("stopped (SIGTERM); requests in flight were finished")
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":  # python -m whisperjax_cli.cli_serve, until cli.py registers it
    serve(prog_name="wjx serve")
