"""Batched mode: pauses shortened, windows cut at gaps, times mapped back, faster-whisper's defaults."""

from __future__ import annotations

import numpy as np

from whisperjax_cli.longform import transcribe


def test_batched_times_are_the_file_s_across_the_silence_it_dropped(tiny_en, clip_audio):
    """Two dev clips with 20 s of silence before, 40 s between and 10 s after them: batched
    mode decodes 0.4 s of each silence, and its segments still start where sequential mode's
    do in each clip alone (within 0.5 s, the tolerance against faster-whisper), at the clip's
    place in the file."""
    a, b = clip_audio["goforward.flac"], clip_audio["numbers.flac"]
    gap = lambda s: np.zeros(int(s * 16000), np.float32)  # noqa: E731
    audio = np.concatenate([gap(20), a, gap(40), b, gap(10)])
    b_at = 60 + len(a) / 16000
    starts = [20 + s.start for s in transcribe(tiny_en, a).segments]
    starts += [b_at + s.start for s in transcribe(tiny_en, b).segments]
    batched = transcribe(tiny_en, audio, mode="batched")
    assert batched.duration == len(audio) // 160 / 100  # the file's, in whole frames as sequential mode
    assert len(batched.segments) >= len(starts)
    last = 0.0
    for seg in batched.segments:
        assert min(abs(seg.start - t) for t in starts) <= 0.5, (seg, starts)
        assert last <= seg.start <= seg.end <= b_at + len(b) / 16000 + 0.5
        last = seg.start
    assert any(s.start >= b_at - 0.5 for s in batched.segments)


def test_batched_words_stay_on_their_side_of_the_silence_it_dropped(tiny_en, clip_audio):
    """The same file with word timestamps: the window reads both clips, and every segment and
    word lies in one clip (0.5 s either side), none through the 40 s left out between them."""
    a, b = clip_audio["goforward.flac"], clip_audio["numbers.flac"]
    gap = lambda s: np.zeros(int(s * 16000), np.float32)  # noqa: E731
    audio = np.concatenate([gap(20), a, gap(40), b, gap(10)])
    clips = [(20 - 0.5, 20 + len(a) / 16000 + 0.5), (60 + len(a) / 16000 - 0.5, 60 + (len(a) + len(b)) / 16000 + 0.5)]
    batched = transcribe(tiny_en, audio, mode="batched", word_timestamps=True)
    words = [w for seg in batched.segments for w in seg.words]
    for item in batched.segments + words:
        assert any(lo <= item.start <= item.end <= hi for lo, hi in clips), (item, clips)
    assert all(any(lo <= w.start <= hi for w in words) for lo, hi in clips)


def test_speech_spans_shorten_pauses_and_drop_quiet_ends():
    from whisperjax_cli.packing import speech_spans

    quiet = np.zeros(1000, bool)
    quiet[:100] = True  # 1 s of quiet at the start: dropped but for 0.2 s
    quiet[300:320] = True  # 0.2 s: too short to be a pause, kept whole
    quiet[500:620] = True  # 1.2 s pause: 0.2 s kept on each side
    quiet[900:] = True  # quiet to the end
    assert speech_spans(quiet, 0, 1000) == [(80, 520), (600, 920)]
    assert speech_spans(quiet, 200, 560) == [(200, 520)]  # a range's own ends
    assert speech_spans(np.zeros(50, bool), 0, 50) == [(0, 50)]
    assert speech_spans(np.ones(500, bool), 0, 500) == []


def test_quiet_frames_are_relative_to_the_file_and_absolute_below_80_dbfs():
    from whisperjax_cli.packing import quiet_frames

    energy = np.r_[np.full(90, -2.0), np.full(10, -5.4), np.full(10, -5.6), np.full(10, -9.0)]
    assert quiet_frames(energy).tolist() == [False] * 100 + [True] * 20  # 35 dB under -2
    assert not quiet_frames(np.full(100, -7.0)).any()  # noise alone is its own level
    assert quiet_frames(np.full(100, -10.0)).all()  # digital silence is quiet in any file


def test_window_cuts_end_in_the_longest_gap_15_to_30_s_in():
    from whisperjax_cli.packing import WindowCuts

    n = 8000
    quiet = np.zeros(n, bool)
    quiet[1200:1220] = True  # a sentence gap at 12 s: too early
    quiet[2000:2020] = True  # a sentence gap at 20 s
    quiet[2600:2610] = True  # a comma at 26 s: later, but a shorter gap
    quiet[4600:4610] = True  # only a comma in the next window's 15-30 s
    energy = np.where(quiet, -8.0, -2.0)
    energy[7300:7320] = -3.0  # no gap at all in the third: its quietest 0.2 s of the last 5 s
    cuts = WindowCuts(quiet, energy)
    assert cuts.windows() == [(0, 2010), (2010, 4605), (4605, 7310), (7310, n)]
    assert cuts.end(7310, n) == n
    assert cuts.sound_end(1900, 2015) == 2000 and cuts.sound_end(2005, 2015) == 2005
    assert WindowCuts(np.zeros(0, bool), np.zeros(0)).windows() == []
    # A break (a long silence dropped there) ends a window wherever it is.
    broken = WindowCuts(quiet, energy, np.array([700, 5000]))
    assert broken.windows() == [(0, 700), (700, 2605), (2605, 5000), (5000, n)]
    assert cuts.middle(0, 4605) == 2010  # the longest kind of gap in the middle third, nearest its centre
    assert cuts.middle(1500, 3800) == 2605 and cuts.middle(2000, 3300) == 2605  # a comma if that is all
    assert 4605 + 901 <= cuts.middle(4605, 7310) <= 7310 - 901  # no gap: somewhere in the middle third


def test_timeline_maps_packed_times_back_to_the_file():
    from whisperjax_cli.packing import Timeline

    line = Timeline(((100, 300), (500, 600), (1000, 1100)))  # frames of the file
    assert line.frames == 400
    assert line.to_source(0.0) == 1.0 and line.to_source(1.5) == 2.5
    assert line.to_source(2.0) == 5.0  # a seam: the next span's start ...
    assert line.to_source(2.0, end=True) == 3.0  # ... or, for an end, the previous one's
    assert line.to_source(3.5) == 10.5 and line.to_source(4.0, end=True) == 11.0
    packed = line.audio(np.arange(1200 * 160, dtype=np.float32))
    assert len(packed) == 400 * 160 and packed[200 * 160] == 500 * 160
    assert line.frames_of(np.arange(1200)).tolist() == [*range(100, 300), *range(500, 600), *range(1000, 1100)]


def test_a_segment_does_not_stretch_over_a_seam_for_a_short_edge_piece():
    """Packed frames [0, 1000) and [1000, 2000) are the file's [0, 1000) and [5000, 6000): 40 s
    left out between. A segment starting 0.3 s before the seam is the next span's speech; one
    with 2 s on each side is read across it and keeps both; an end 0.3 s past it comes back."""
    from whisperjax_cli.packing import Timeline

    line = Timeline(((0, 1000), (5000, 6000)))
    assert line.segment_to_source(9.7, 14.0) == (50.0, 54.0)  # was (9.7, 54.0): 40 s of nothing
    assert line.to_source(9.7) == 9.7  # a lone time still maps where it is
    assert line.segment_to_source(6.0, 10.3) == (6.0, 10.0)
    assert line.segment_to_source(8.0, 12.0) == (8.0, 52.0)  # 2 s each side: one segment across
    assert line.segment_to_source(9.8, 10.2) == (9.8, 50.2)  # 0.2 s each side: each a quarter or more
    assert line.segment_to_source(1.0, 3.0) == (1.0, 3.0) and line.segment_to_source(12.0, 12.0) == (52.0, 52.0)


def test_loop_start_finds_where_the_repeats_begin():
    from whisperjax_cli.decoding import LOOP_SPAN, loop_start

    ts = 1000
    head = [ts, 5, 6, 7]
    assert loop_start(np.array(head + [8, 9] * 40), ts) == len(head)
    # A loop of timestamped segments: rising times, the same tokens otherwise.
    stamped = head + [x for k in range(20) for x in (ts + 2 * k, 3, ts + 2 * k + 1)]
    assert loop_start(np.array(stamped), ts) == len(head)
    plain = np.arange(LOOP_SPAN + 20)
    assert loop_start(plain, ts) == len(plain)


def test_a_looping_window_keeps_its_closed_segments_and_is_decoded_again_in_halves(tiny_en):
    from whisperjax_cli.packing import WindowCuts
    from whisperjax_cli.streams import FileState, Stream
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import DecodingResult

    tok = tiny_en.tokenizer
    ts = lambda s: tok.timestamp_begin + round(s / 0.02)  # noqa: E731

    def looping(*head):
        tokens = [*head, *tok.encode(" la") * 60]
        return DecodingResult(tokens, tok.decode([t for t in tokens if t < tok.eot]), -20.0, -0.2, 0.0, 0.0, 9.0,
                              looped=True)

    quiet = np.zeros(2500, bool)
    quiet[1300:1320] = True  # a gap in the middle of what is left
    cuts = WindowCuts(quiet, np.where(quiet, -8.0, -2.0))
    transcriber = Transcriber(tiny_en, TranscribeOptions(mode="batched"))
    stream, after = Stream(0, [(0, 2500)], [], packed=True), Stream(0, [(2500, 3000)], [], packed=True)
    f = FileState(0, None, None, 3000, "en", None, (), [stream, after], None, 3000, cuts)
    hello = tok.encode(" Hello there.")
    transcriber._advance(f, stream, 2500, looping(ts(0), *hello, ts(1.5), ts(2.0)))
    assert [(s.start, s.end, s.text) for s in stream.segments] == [(0.0, 1.5, " Hello there.")]
    # The second half is a stream of its own, next in time order: both are decoded in one step.
    half = f.streams[1]
    assert f.streams == [stream, half, after] and half.packed and half.seek == 1310
    assert stream.seek == 200 and stream.clips == [(0, 200), (200, 1310)] and half.clips == [(1310, 2500)]
    assert not stream.done and not half.done
    # A half that loops too keeps what came before its loop, and is not split again.
    transcriber._advance(f, half, 1190, looping(ts(0), *tok.encode(" Then")))
    assert half.segments[-1].text == " Then" and half.segments[-1].end == 25.0 and half.done
    transcriber._advance(f, stream, 1110, looping(ts(0), *tok.encode(" Bye."), ts(1.0), ts(1.0)))
    assert stream.segments[-1].text == " Bye." and stream.seek == 1310 and stream.done
    assert f.streams == [stream, half, after]
    # Conditioned on previous text, the second half's prompt is the first's text: one stream.
    conditioned = Transcriber(tiny_en, TranscribeOptions(mode="batched", condition_on_previous_text=True))
    stream = Stream(0, [(0, 2500)], [], packed=True)
    f = FileState(0, None, None, 2500, "en", None, (), [stream], None, 2500, cuts)
    conditioned._advance(f, stream, 2500, looping(ts(0), *hello, ts(1.5), ts(2.0)))
    assert f.streams == [stream] and stream.clips == [(0, 200), (200, 1310), (1310, 2500)]


def test_a_packed_window_whose_text_stops_early_is_decoded_on_from_its_last_segment(tiny_en):
    """tiny.en ends some packed windows sentences before their speech does (bench/longform.py:
    27.8 % WER against 23.7 % when decoded on); with nothing but quiet left, the window is done."""
    from whisperjax_cli.packing import WindowCuts
    from whisperjax_cli.streams import FileState, Stream
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.window_decoder import DecodingResult

    tok = tiny_en.tokenizer
    ts = lambda s: tok.timestamp_begin + round(s / 0.02)  # noqa: E731

    def closed(*tokens):  # the model closed its last segment and stopped
        return DecodingResult(list(tokens), tok.decode([t for t in tokens if t < tok.eot]), -5.0, -0.2, 0.0, 0.0, 1.2)

    quiet = np.zeros(3000, bool)
    quiet[2200:] = True  # sound until 22 s, then quiet to the window's end
    cuts = WindowCuts(quiet, np.where(quiet, -8.0, -2.0))
    transcriber = Transcriber(tiny_en, TranscribeOptions(mode="batched"))
    f = FileState(0, None, None, 3000, "en", None, (), [], None, 3000, cuts)
    stream = Stream(0, [(0, 3000)], [], packed=True)
    transcriber._advance(f, stream, 3000, closed(ts(0), *tok.encode(" Hello there."), ts(7.5), ts(8.0)))
    assert stream.seek == 750 and not stream.done  # 14.5 s of sound after 7.5 s: decoded on from there
    transcriber._advance(f, stream, 2250, closed(ts(0), *tok.encode(" Bye."), ts(14.0), ts(14.5)))
    assert stream.done  # 0.5 s of sound after 21.5 s: less than CONTINUE_MIN, the window is done
    assert [(s.start, s.end, s.text) for s in stream.segments] == [(0.0, 7.5, " Hello there."), (7.5, 21.5, " Bye.")]
    # Text that closes within the window's first CONTINUE_MIN moves on too (no window is decoded twice).
    stream = Stream(0, [(0, 3000)], [], packed=True)
    transcriber._advance(f, stream, 3000, closed(ts(0), *tok.encode(" Hi."), ts(0.5), ts(0.6)))
    assert stream.done and stream.segments[0].text == " Hi."


def test_a_vad_window_holds_its_text_to_1_s_before_its_end_an_energy_window_to_its_last_sound(tiny_en):
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions
    from whisperjax_cli.packing import WindowCuts
    from whisperjax_cli.streams import FileState, Stream

    stream = Stream(0, [(0, 3000)], [], packed=True)
    vad = Transcriber(tiny_en, TranscribeOptions(mode="batched"))
    assert vad._hold_index(None, stream, 2706) == 1303  # timestamp index: (2706 - 100 frames) / 2
    assert vad._hold_index(None, stream, 80) == 0  # a window under 1 s holds nothing
    quiet = np.zeros(3000, bool)
    quiet[2200:] = True  # sound until 22 s
    f = FileState(0, None, None, 3000, "en", None, (), [], None, 3000, WindowCuts(quiet, np.where(quiet, -8.0, -2.0)))
    energy = Transcriber(tiny_en, TranscribeOptions(mode="batched", vad_filter=False))
    assert energy._hold_index(f, stream, 3000) == 1050  # 1 s before its last sound, not its end


def test_batched_mode_defaults_are_faster_whisper_s_and_yield_to_explicit_ones(tiny_en):
    from whisperjax_cli.longform import Transcriber
    from whisperjax_cli.options import TranscribeOptions

    batched = Transcriber(tiny_en, TranscribeOptions(mode="batched"))
    assert batched.options.temperatures == (0.0,) and batched.condition is False
    sequential = Transcriber(tiny_en)
    assert len(sequential.options.temperatures) == 6 and sequential.condition is True
    asked = Transcriber(tiny_en, TranscribeOptions(mode="batched", temperature=(0.0, 0.5), condition_on_previous_text=True))
    assert asked.options.temperatures == (0.0, 0.5) and asked.condition is True
