"""``wjx serve``: OpenAI's audio API over real HTTP, with the real ``openai`` client.

One server with tiny.en runs in a background thread for the module (a second, with a queue of
one and a short deadline, for the limits); its answers are checked against
:func:`whisperjax_cli.longform.transcribe` on the same files and options. The SIGTERM test runs
the command in a subprocess.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pysubs2
import pytest
import soundfile as sf

from whisperjax_cli.longform import transcribe
from whisperjax_cli.options import temperature_ladder
from whisperjax_cli.server import ServerConfig, make_server
from whisperjax_cli.server_protocol import WORDS_AVAILABLE

DATA = Path(__file__).parent / "data"
CLIPS = ("goforward.flac", "something.wav", "cards-005.flac")
KEY = "test-key-1"
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


class ServerThread:
    """A server on a free loopback port, run by uvicorn in a daemon thread."""

    def __init__(self, model, config: ServerConfig):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(model, config, "127.0.0.1", self.port, log_level="warning")
        self.service = self.server.config.app.state.service  # what the tests inspect
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


def client(server: ServerThread, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def server(tiny_en):
    s = ServerThread(tiny_en, ServerConfig(api_key=KEY, max_upload_mb=1.0, max_queue=16, request_timeout=300))
    yield s
    s.stop()
    assert not s.service.folder.exists(), "the upload folder outlived the server"


@pytest.fixture(scope="module")
def references(tiny_en):
    return {name: transcribe(tiny_en, DATA / name) for name in CLIPS}


def speech(seconds: float, seed: int) -> np.ndarray:
    """Dev clips in a shuffled order with short pauses, ``seconds`` long (16 kHz)."""
    from whisperjax_cli.audio import load_audio

    clips = [load_audio(DATA / name) for name in ("goforward.flac", "something.wav", "cards-005.flac",
                                                   "numbers.flac", "cards-002.flac")]
    rng, out, n = np.random.default_rng(seed), [], 0
    while n < seconds * 16000:
        out += [clips[rng.integers(len(clips))], np.zeros(int(rng.uniform(0.3, 1.0) * 16000), np.float32)]
        n += len(out[-2]) + len(out[-1])
    return np.concatenate(out)[: int(seconds * 16000)]


def create(c: openai.OpenAI, path: Path, **kwargs):
    with open(path, "rb") as f:
        return c.audio.transcriptions.create(model="whisper-1", file=f, **kwargs)


def upload_files(server: ServerThread) -> list:
    return list(server.service.folder.iterdir())


# ---------------------------------------------------------------- answers


def check_format(fmt: str, answer, reference) -> None:
    """``answer`` (what the openai client returned) says what ``reference`` says, in ``fmt``."""
    text = reference.text.strip()
    segments = [s for s in reference.segments if s.text.strip()]
    if fmt == "json":
        assert answer.text == text
    elif fmt == "text":
        assert answer == text + "\n"
    elif fmt in ("srt", "vtt"):
        subs = pysubs2.SSAFile.from_string(answer, format_=fmt)
        assert [e.plaintext.strip() for e in subs] == [s.text.strip() for s in segments]
        assert [(e.start, e.end) for e in subs] == [(round(s.start * 1000), round(s.end * 1000)) for s in segments]
    else:
        assert (answer.task, answer.language, answer.text) == ("transcribe", "english", text)
        assert answer.duration == pytest.approx(reference.duration)
        assert answer.words is None
        got = [(s.id, s.seek, s.start, s.end, s.text, s.tokens, s.temperature) for s in answer.segments]
        assert got == [(s.id, s.seek, s.start, s.end, s.text, s.tokens, s.temperature) for s in reference.segments]
        assert all(s.avg_logprob < 0 and 0 <= s.no_speech_prob <= 1 for s in answer.segments)


def test_every_format_concurrently_matches_the_library(server, references):
    """15 requests at once (3 clips x 5 formats): each gets its own file's text, as the library
    gives it, and they shared decode batches (one feed held several requests at a time)."""
    c = client(server)
    jobs = [(name, fmt) for name in CLIPS for fmt in FORMATS]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: create(c, DATA / job[0], response_format=job[1]), jobs))
    for (name, fmt), answer in zip(jobs, answers):
        check_format(fmt, answer, references[name])
    assert server.service.scheduler.peak_open >= 2
    assert server.health()["in_flight"] == 0 and upload_files(server) == []


def test_prompt_language_and_temperature_reach_the_decoder(server, tiny_en):
    """A prompt, a language and a sampling temperature (OpenAI's: where the fallback starts)
    give the library's result for the same options, samples included (same PRNG key)."""
    prompt, path = "Cards: 8 of Spades, 4 of Clubs.", DATA / "cards-005.flac"
    answer = create(client(server), path, response_format="verbose_json", prompt=prompt, language="en",
                    temperature=0.6)
    reference = transcribe(tiny_en, path, initial_prompt=prompt, language="en",
                           temperature=temperature_ladder(0.6, 0.2))
    assert answer.text == reference.text.strip()
    assert [s.tokens for s in answer.segments] == [s.tokens for s in reference.segments]
    assert {s.temperature for s in answer.segments} <= {0.6, 0.8, 1.0}


def test_models_and_health(server):
    models = client(server).models.list()
    assert {m.id for m in models.data} == {"tiny.en", "whisper-1"}
    assert client(server).models.retrieve("whisper-1").id == "whisper-1"
    assert server.health() == {"status": "ok", "model": "tiny.en", "in_flight": 0, "queued": 0, "decoding": 0}


def test_word_granularity(server, tiny_en):
    """Words with verbose_json when the library has word timestamps (the library's words), else
    a 400 saying so; word granularity with any other format is a 400 either way (as OpenAI's)."""
    c, path = client(server), DATA / "something.wav"
    with pytest.raises(openai.BadRequestError) as err:
        create(c, path, response_format="json", timestamp_granularities=["word"])
    assert err.value.body["param"] == "timestamp_granularities"
    if not WORDS_AVAILABLE:
        with pytest.raises(openai.BadRequestError, match="word timestamps are not available"):
            create(c, path, response_format="verbose_json", timestamp_granularities=["word"])
        return
    answer = create(c, path, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    reference = transcribe(tiny_en, path, word_timestamps=True)
    expected = [(w.word.strip(), round(w.start, 3), round(w.end, 3)) for s in reference.segments for w in s.words]
    assert [(w.word, w.start, w.end) for w in answer.words] == expected
    assert len(expected) == 5 and all(0 <= w.start <= w.end <= answer.duration for w in answer.words)
    assert answer.segments and answer.text == reference.text.strip()
    only_words = create(c, path, response_format="verbose_json", timestamp_granularities=["word"])
    assert only_words.segments is None and len(only_words.words) == len(expected)


def test_streaming(server, references):
    """stream=true: a transcript.text.delta per segment as decoded, then transcript.text.done."""
    name = "cards-005.flac"
    events = list(create(client(server), DATA / name, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert len(events) - 1 == len([s for s in references[name].segments if s.text.strip()])
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == references[name].text.strip()
    assert events[0].segment["start"] == references[name].segments[0].start
    assert server.health()["in_flight"] == 0


# ---------------------------------------------------------------- errors


def expect_error(status: int, call, param=None) -> dict:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    assert err.value.status_code == status
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_bad_audio_is_400_and_names_the_clients_file(server, tmp_path):
    c = client(server)
    for name, data in (("notes.txt", b"not audio at all\n" * 50), ("empty.wav", b""),
                       ("noise.flac", np.random.default_rng(0).bytes(5000))):
        (tmp_path / name).write_bytes(data)
        error = expect_error(400, lambda path=tmp_path / name: create(c, path), param="file")
        assert str(server.service.folder) not in error["message"]
    # An HLS playlist naming a file of the server's: ffmpeg would decode that file for the client.
    (tmp_path / "list.m3u8").write_text(f"#EXTM3U\n#EXTINF:3.0,\nfile:{DATA / 'goforward.flac'}\n#EXT-X-ENDLIST\n")
    assert "playlists" in expect_error(400, lambda: create(c, tmp_path / "list.m3u8"), param="file")["message"]
    with open(DATA / "goforward.flac", "rb") as f:  # still serving, and nothing left on disk
        assert c.audio.transcriptions.create(model="x", file=f).text == "Go forward 10 meters."
    assert upload_files(server) == []


@pytest.mark.parametrize("kwargs, param", [
    ({"response_format": "xml"}, "response_format"),
    ({"temperature": 1.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"language": "xx"}, "language"),
    ({"language": "fr"}, "language"),  # tiny.en is English-only
    ({"timestamp_granularities": ["char"], "response_format": "verbose_json"}, "timestamp_granularities"),
    ({"extra_body": {"stream": "maybe"}}, "stream"),
])
def test_bad_parameters_are_400(server, kwargs, param):
    expect_error(400, lambda: create(client(server), DATA / "something.wav", **kwargs), param=param)


def test_translation_needs_a_multilingual_model(server):
    with open(DATA / "something.wav", "rb") as f:
        call = lambda: client(server).audio.translations.create(model="whisper-1", file=f)  # noqa: E731
        assert "English-only" in expect_error(400, call)["message"]


def test_missing_or_wrong_key_is_401(server):
    expect_error(401, lambda: create(client(server, "wrong-key"), DATA / "something.wav"))
    expect_error(401, lambda: client(server, "wrong-key").models.list())
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": b"x"}, data={"model": "whisper-1"})
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("no API key")


def test_upload_over_the_limit_is_413(server, tmp_path):
    """1 MB limit: a 1.3 MB WAV is refused while streaming, and nothing of it stays on disk."""
    path = tmp_path / "big.wav"
    sf.write(path, speech(40, 1), 16000, subtype="PCM_16")  # 1.28 MB
    assert 1 << 20 < path.stat().st_size < 2 << 20
    assert expect_error(413, lambda: create(client(server), path), param="file")["code"] == "file_too_large"
    assert upload_files(server) == []


def test_queue_full_is_503_and_a_deadline_drops_the_work(tiny_en, tmp_path):
    """A queue of one: a second request while the first is in gets 503. The first, 6 min of
    speech (12+ windows), passes its 3 s deadline: 504, and its work stops within a step."""
    path = tmp_path / "long.flac"
    sf.write(path, speech(360, 2), 16000)
    s = ServerThread(tiny_en, ServerConfig(max_queue=1, request_timeout=3.0))
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(expect_error, 504, lambda: create(c, path))
            deadline = time.monotonic() + 30
            while s.health()["in_flight"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            error = expect_error(503, lambda: create(c, DATA / "something.wav"))
            assert error["type"] == "server_error"
            first.result()
        steps = s.service.scheduler.steps
        deadline = time.monotonic() + 20
        while s.health() != {"status": "ok", "model": "tiny.en", "in_flight": 0, "queued": 0, "decoding": 0}:
            assert time.monotonic() < deadline, s.health()
            time.sleep(0.1)
        assert s.service.scheduler.steps <= steps + 2  # at most the step in progress and the drop
        idle = s.service.scheduler.steps
        time.sleep(3.0)  # a window of the long file decodes in ~1-3 s: none may follow
        assert s.service.scheduler.steps == idle
        assert create(c, DATA / "something.wav").text == "Go somewhere and do something."
    finally:
        s.stop()
    assert not s.service.folder.exists()


# ---------------------------------------------------------------- the command, and SIGTERM


def test_sigterm_finishes_the_request_in_flight(tmp_path):
    """``python -m whisperjax_cli.cli_serve`` with the key from WJX_API_KEY: SIGTERM while a
    request decodes; that request still gets its answer, then the process exits 0 and its
    upload folder is gone."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WJX_API_KEY": KEY, "TMPDIR": str(tmp_path), "WJX_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("WJX_MODEL", None)
    proc = subprocess.Popen([sys.executable, "-m", "whisperjax_cli.cli_serve", "-m", "tiny.en", "--port", str(port),
                             "--shutdown-timeout", "120"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(create, c, DATA / "goforward.flac")
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health", timeout=5).json()["in_flight"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert answer.result().text == "Go forward 10 meters."
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "stopped (SIGTERM)" in stderr, stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("wjx-serve-")] == []
    assert json.dumps(stderr).count("Traceback") == 0, stderr
