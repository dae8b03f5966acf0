"""Batched mode encodes the next step's windows while a step decodes (readahead.py)."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from tests.conftest import CLIPS
from whisperjax_cli.readahead import ReadAhead


class Stream:
    pass


def _encoder(calls: list):
    """An 'encoder' that tags each row with its mel's first value and records its thread."""

    def encode(mels: np.ndarray):
        calls.append((threading.current_thread().name, mels.shape[0]))
        return jax.device_put(np.asarray(mels[:, :1, :1], np.float32) * 10)

    return encode


def test_read_ahead_hands_back_only_the_windows_it_made():
    calls = []
    ahead = ReadAhead(_encoder(calls))
    streams = [Stream() for _ in range(3)]
    keys = [(id(s), 0, 3000) for s in streams]
    mels = [np.full((3000, 80), i + 1, np.float32) for i in range(3)]

    ahead.start(streams, keys, mels)
    out, rows = ahead.take(keys)  # exactly its batch: the output itself
    assert rows == [] and np.asarray(out)[:, 0, 0].tolist() == [10, 20, 30]
    assert calls == [("wjx-encode-ahead_0", 3)]

    ahead.start(streams, keys, mels)
    other = (id(Stream()), 0, 3000)
    moved = (keys[0][0], 500, 2500)  # the same stream at another window: not what was made
    out, rows = ahead.take([moved, keys[2], other, keys[1]])
    assert out is None
    assert [None if r is None else r.ravel().tolist() for r in rows] == [None, [30], None, [20]]

    assert ahead.take(keys) == (None, [None] * 3)  # taken once only
    ahead.start(streams, keys, mels)
    assert ahead.take([other]) == (None, [None])  # nothing of it wanted: waited for, dropped


def test_read_ahead_orders_its_streams_first_and_an_unused_failure_is_dropped():
    def broken(mels):
        raise RuntimeError("no encoder")

    ahead = ReadAhead(broken)
    a, b, c, d = (Stream() for _ in range(4))
    assert ahead.first([a, b, c]) == [a, b, c]  # nothing pending: order kept
    ahead.start([c, a], [(id(c), 0, 1), (id(a), 0, 1)], [np.zeros((1, 1))] * 2)
    assert ahead.first([a, b, c, d]) == [c, a, b, d]
    assert ahead.take([(id(b), 0, 1)]) == (None, [None])  # its error is nobody's
    ahead.start([a], [(id(a), 0, 1)], [np.zeros((1, 1))])
    with pytest.raises(RuntimeError, match="no encoder"):  # but the step that uses it meets it
        ahead.take([(id(a), 0, 1)])


AVX512 = frozenset({"avx2", "avx512f"})  # a CPU where every program keeps YNNPACK, so programs may overlap


def test_batched_mode_reads_ahead_across_files_and_decodes_the_same(tiny_en, monkeypatch):
    """Many short files, two rows a step: every step after the first finds its windows made
    (files are opened two batches ahead), and the text is what it is without read-ahead."""
    from whisperjax_cli import runtime
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions

    monkeypatch.setattr(runtime, "cpu_flags", lambda: AVX512)
    taken = []
    take = ReadAhead.take

    def counting(self, keys):
        out = take(self, keys)
        taken.append("whole" if out[0] is not None else sum(r is not None for r in out[1]))
        return out

    monkeypatch.setattr(ReadAhead, "take", counting)
    files = [p for p in CLIPS if p.suffix == ".flac"][:7]
    texts = {}
    for ahead in (True, False):
        t = Transcriber(tiny_en, TranscribeOptions(mode="batched", batch_size=2))
        if not ahead:
            t._ahead = None
        texts[ahead] = [(e.index, e.transcript.text) for e in t.run(files) if e.transcript is not None]
    assert taken == [0, "whole", "whole", "whole"]  # 7 windows: 2 + 2 + 2 + 1
    assert texts[True] == texts[False] and len(texts[True]) == 7
    assert [i for i, _ in texts[True]] == list(range(7))


def test_read_ahead_only_in_batched_mode_without_previous_text_and_where_programs_may_overlap(tiny_en, monkeypatch):
    from whisperjax_cli import runtime
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions

    monkeypatch.setattr(runtime, "cpu_flags", lambda: AVX512)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert Transcriber(tiny_en, TranscribeOptions())._ahead is None
    assert Transcriber(tiny_en, TranscribeOptions(mode="batched", condition_on_previous_text=True))._ahead is None
    assert Transcriber(tiny_en, TranscribeOptions(mode="batched"))._ahead is not None
    # Decode programs without YNNPACK (AVX2 without AVX-512, or XLA_FLAGS) must run alone.
    monkeypatch.setenv("XLA_FLAGS", f"--{runtime.YNN_FUSIONS}=")
    assert Transcriber(tiny_en, TranscribeOptions(mode="batched"))._ahead is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert Transcriber(tiny_en, TranscribeOptions(mode="batched"))._ahead is None


def test_a_decode_gives_the_same_tokens_while_an_encode_runs_beside_it_where_programs_may_overlap(
        tiny_en, monkeypatch):
    """What read-ahead relies on. With the decode programs compiled without YNNPACK this failed
    on an AMD EPYC Zen 3 (every row of 5 changed), hence runtime.programs_may_overlap."""
    from whisperjax_cli import runtime
    from whisperjax_cli.audio import load_audio
    from whisperjax_cli.features import N_FRAMES, LogMelWindows, model_window
    from whisperjax_cli.window_decoder import LazyKey, WindowDecoder, build_prompt
    from whisperjax_cli.options import TranscribeOptions

    from whisperjax_cli.decoding import decode_window

    monkeypatch.setattr(runtime, "cpu_flags", lambda: AVX512)
    assert runtime.programs_may_overlap("cpu")
    # Programs made earlier in this process have the real CPU's options: made again here.
    monkeypatch.setattr(decode_window, "_jit_made", None)
    monkeypatch.setattr(decode_window, "_programs", {})
    speech = np.concatenate([load_audio(p) for p in CLIPS if "russian" not in p.name])  # 32 s of English
    rows = 5  # a batch bucket of 8, where the failure showed (2 or 4 rows never did)
    mel = LogMelWindows(np.concatenate([speech, speech]), tiny_en.n_mels)
    mels = np.stack([model_window(mel, i * 600, N_FRAMES) for i in range(rows)])
    decoder = WindowDecoder(tiny_en, TranscribeOptions(mode="batched"))
    audio = decoder.encode(mels)
    prompt, tail = build_prompt(tiny_en.tokenizer, tuple(tiny_en.tokenizer.sot_sequence), [], False, 448)

    def decode():  # end of text held to 28 s: every row decodes its whole window
        results = decoder.decode(audio, rows, [prompt] * rows, tail, LazyKey(), [1400] * rows)
        return [list(r.tokens) for r in results]

    alone = decode()
    stop = threading.Event()

    def encode_meanwhile():
        while not stop.is_set():
            jax.block_until_ready(decoder.encode(mels[::-1]))

    worker = threading.Thread(target=encode_meanwhile)
    worker.start()
    try:
        beside = decode()
    finally:
        stop.set()
        worker.join()
    assert beside == alone and min(len(t) for t in alone) > 40
