"""Batched windows across breaks (packing.vad_windows) and the segments cut at them (seams.py)."""

import math

import numpy as np

from whisperjax_cli.packing import Timeline, chunk_timeline, vad_windows
from whisperjax_cli.results import Segment, Word
from whisperjax_cli.seams import Piece, crosses_break, cut_window


def test_vad_windows_merge_across_breaks_as_evenly_as_their_count_allows():
    # spans of 20, 9, 8, 7 and 3 s with 40 s left out between each (every seam a break)
    lengths = [2000, 900, 800, 700, 300]
    starts = np.cumsum([0] + [n + 4000 for n in lengths])[:-1]
    line = Timeline(tuple((int(s), int(s) + n) for s, n in zip(starts, lengths)))
    # faster-whisper's rule fills 30 s: 29 s then 18 s; as many windows, the longest 27 s
    assert vad_windows(line) == [(0, 2000), (2000, 4700)]
    alone = Timeline(((0, 3500), (4000, 4200), (9000, 9200)))  # a span of 35 s is a window of its own
    assert vad_windows(alone) == [(0, 3500), (3500, 3900)]
    assert vad_windows(Timeline(())) == []


def test_vad_windows_fill_by_vad_chunk_inside_joined_spans():
    """Touching VAD chunks of 20, 15 and 20 s joined into one 55 s span of the file (times map
    through it), then 10 s more after a gap: windows end where chunks do, none over 30 s."""
    line = Timeline(((1000, 6500), (9000, 10000)), joins=(3000, 4500))
    assert line.piece_starts.tolist() == [0, 2000, 3500, 5500, 6500]
    assert line.pieces().tolist() == [2000, 1500, 2000, 1000]
    assert line.to_source(25.0) == 35.0  # one span: no seam at the joins
    assert line.breaks.tolist() == [5500]  # 25 s left out; a join is no break
    assert line.holds_break(5000, 6000) and not line.holds_break(0, 5500)
    windows = vad_windows(line)
    assert windows == [(0, 2000), (2000, 3500), (3500, 6500)]
    assert all(b - a <= 3000 for a, b in windows)
    assert vad_windows(Timeline(((1000, 6500), (9000, 10000)))) == [(0, 5500), (5500, 6500)]  # unjoined: one span


def test_touching_vad_chunks_join_into_one_span_that_remembers_the_joins():
    chunks = [(1000, 3000), (2990, 4500), (4500, 6500), (6000, 6400), (9000, 10000), (12000, 13000)]
    line = chunk_timeline(chunks, [(0, 12500)])
    assert line.spans == ((1000, 6500), (9000, 10000), (12000, 12500))  # clipped to the clips
    assert line.joins == (3000, 4500)  # a chunk inside the span before adds no join
    assert chunk_timeline(chunks[:2], [(0, 2000), (2500, 5000)]).spans == ((1000, 2000), (2500, 4500))


def _segment(tok, start, end, text, offset):
    stamp = lambda t: tok.timestamp_begin + round((t - offset) / 0.02)  # noqa: E731
    tokens = [stamp(start), *tok.encode(text), stamp(end)]
    return Segment(0, 600, start, end, text, tokens, 0.0, -0.2, 1.2, 0.01)


def test_a_segment_read_across_a_break_is_cut_there_by_its_words(tiny_en):
    """Packed [0, 10) s and [10, 20) s are the file's [0, 10) and [50, 60): 40 s left out.
    A window from 6 s holds " Fresh bread." (before the break) and " Go forward 10 meters.
    33 4 692" from 7.5 to 12 s, which the alignment times on both sides of it."""
    tok = tiny_en.tokenizer
    line = Timeline(((0, 1000), (5000, 6000)))
    fresh = _segment(tok, 6.0, 7.5, " Fresh bread.", 6.0)
    across = _segment(tok, 7.5, 12.0, " Go forward 10 meters. 33 4 692", 6.0)
    assert crosses_break(line, [fresh, across]) and not crosses_break(line, [fresh])
    # Each text token's entry into the alignment path (0.02 s from the window's start), then
    # the end of text: Fresh bread . | Go forward 10 meters . | 33 4 6 92 | end
    times = [0.0, 0.5, 1.2, 1.5, 2.0, 2.6, 3.0, 3.9, 4.1, 4.5, 5.0, 5.1, 5.8]
    entry, probs = np.round(np.array(times) * 50).astype(np.int64), np.full(12, 0.9)
    pieces = cut_window(tok, line, [fresh, across], 6.0, entry, probs, "en")
    assert pieces[0].segment is fresh and (pieces[0].low, pieces[0].high) == (-math.inf, 10.0)
    first, second = pieces[1].segment, pieces[2].segment
    # The "." from 9.9 to 10.1 s stays with " meters"; " 692" (two tokens) goes whole.
    assert [first.text, second.text] == [" Go forward 10 meters.", " 33 4 692"]
    assert (first.start, first.end, second.start, second.end) == (7.5, 10.0, 10.0, 12.0)
    ts = tok.timestamp_begin
    assert first.tokens == [ts + 75, *tok.encode(" Go forward 10 meters."), ts + 200]
    assert second.tokens == [ts + 200, *tok.encode(" 33 4 692"), ts + 300]
    assert (pieces[2].low, pieces[2].high) == (10.0, math.inf)
    assert second.avg_logprob == across.avg_logprob and second.seek == across.seek
    assert line.segment_to_source(first.start, first.end) == (7.5, 10.0)
    assert line.segment_to_source(second.start, second.end) == (50.0, 52.0)  # uncut: (7.5, 52.0)
    # A word is on the side of its middle: " meters" from 9.6 to 10.6 s goes after the break.
    short = _segment(tok, 7.5, 11.0, " Go forward 10 meters", 6.0)
    entry = np.round(np.array([1.5, 2.0, 2.6, 3.6, 4.6]) * 50).astype(np.int64)
    texts = [p.segment.text for p in cut_window(tok, line, [short], 6.0, entry, np.full(4, 0.9), "en")]
    assert texts == [" Go forward 10", " meters"]


def test_a_segment_with_a_short_edge_across_a_break_is_kept_whole_on_its_side(tiny_en):
    """0.2 s before the break is not where " Fresh bread." is (Timeline.segment_to_source):
    not cut, and its words are kept after the break."""
    tok = tiny_en.tokenizer
    line = Timeline(((0, 1000), (5000, 6000)))
    fresh = _segment(tok, 9.8, 14.0, " Fresh bread.", 6.0)
    assert not crosses_break(line, [fresh])
    entry = np.round(np.array([3.8, 5.0, 7.0, 8.0]) * 50).astype(np.int64)
    (piece,) = cut_window(tok, line, [fresh], 6.0, entry, np.full(3, 0.9), "en")
    assert piece.segment is fresh and (piece.low, piece.high) == (10.0, math.inf)
    fresh.words = [Word(9.8, 11.0, " Fresh", 0.9), Word(11.0, 14.0, " bread.", 0.9)]
    piece.keep_inside()
    assert (fresh.start, fresh.words[0].start, fresh.words[0].end) == (10.0, 10.0, 11.0)
    bounded = Piece(Segment(0, 0, 8.0, 10.3, "", [], 0.0, 0.0, 0.0, 0.0, [Word(9.7, 10.3, " x", 0.5)]), high=10.0)
    bounded.keep_inside()
    assert (bounded.segment.end, bounded.segment.words[0].end) == (10.0, 10.0)
