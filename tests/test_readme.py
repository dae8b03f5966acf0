"""The README's code works as written: its Python example runs from the repository root, and its
two first commands are the ones CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_example_runs_as_written(tmp_path):
    (code,) = [b for b in blocks("python") if "load_model(" in b]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
    env["WJX_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(" Go forward 10 meters.\n"), out
    assert "-->" in out and "something.wav" in out and "numbers.flac" in out
    languages = re.search(r"^\[\('(\w+)', ([\d.]+)\)", out, flags=re.M)
    assert languages and languages.group(1) == "ru" and float(languages.group(2)) > 0.9, out


def test_first_commands_are_what_ci_runs():
    install, tests = blocks("sh")[:2]
    assert "wjx transcribe tests/data/goforward.flac" in install and "python3 -m venv" in install
    ci = (ROOT / ".ci" / "run").read_text()
    extras = re.search(r'pip install -e "(\.\[[^\]]+\])"', tests).group(1)
    assert f'pip install -q -e "{extras}"' in ci and "python -m pytest -q" in tests and "python -m pytest -q" in ci


def test_server_example_runs_against_wjx_serve(tmp_path):
    """The OpenAI SDK snippet of `wjx serve`'s section, against a real server (its port and
    file name replaced by a free port and a bundled clip)."""
    import socket
    import time
    import urllib.request

    (code,) = [b for b in blocks("python") if "OpenAI(" in b]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WJX_", "JAX_", "XLA_"))}
    env["WJX_CACHE_DIR"] = str(tmp_path / "cache")
    server = subprocess.Popen([sys.executable, "-m", "whisperjax_cli", "serve", "--model", "tiny.en", "--port",
                               str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        code = code.replace("8000", str(port)).replace('"talk.flac"', '"tests/data/goforward.flac"')
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "Go forward 10 meters.\n"
    finally:
        server.terminate()
        server.wait(timeout=60)
