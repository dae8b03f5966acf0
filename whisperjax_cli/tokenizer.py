"""Whisper's tokenizer on the ``tokenizers`` library, read from a model's ``tokenizer.json``.

Behaviour follows openai/whisper ``whisper/tokenizer.py``: the same language table, the
same forced prefix (``sot_sequence``), the same suppressed ``non_speech_tokens`` and the
same word splitting for word timestamps. Special ids are looked up by their strings in
the file, never hard-coded, because English-only and multilingual vocabularies place
them differently (``<|endoftext|>`` is 50256 in one, 50257 in the other).
"""

from __future__ import annotations

import os
import string
from functools import cached_property
from typing import Sequence

import tokenizers

from whisperjax_cli.errors import ModelError, UsageError

# Seconds per timestamp token, and how many there are: <|0.00|> ... <|30.00|>.
TIME_PRECISION = 0.02
NUM_TIMESTAMPS = 1501

TASKS = ("transcribe", "translate")

# In token-id order: <|en|> is sot + 1, <|zh|> sot + 2, ... "yue" exists only in the
# 128-mel (large-v3) vocabulary, whose models have num_languages=100.
LANGUAGES = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

# Lowercased English names and common aliases -> code.
TO_LANGUAGE_CODE = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}

# Codes that older Hugging Face tokenizer.json files (the .en ones among them) use for
# the same token: Hebrew's ISO 639-1 code before 1989.
_OLD_LANGUAGE_TOKENS = {"he": ("iw",)}

# Scripts written without spaces: words are split wherever the tokens decode to whole
# characters, since there is no morphological analysis to do better.
_UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def normalize_language(value: str) -> str:
    """Turns a language code, English name or alias, or ``<|code|>`` token into a code.

    Args:
        value: e.g. ``"fr"``, ``"French"``, ``"FRENCH"``, ``"<|fr|>"`` or ``"castilian"``.

    Returns:
        The code, a key of ``LANGUAGES``.

    Raises:
        UsageError: the value names no known language.
    """
    key = value.strip().lower()
    if key.startswith("<|") and key.endswith("|>"):
        key = key[2:-2]
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UsageError(None, f"unknown language {value!r}")


def _normalize_task(task: str) -> str:
    if task not in TASKS:
        raise UsageError(None, f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    return task


class Tokenizer:
    """Whisper special tokens, prefixes and text <-> ids over a ``tokenizers.Tokenizer``.

    ``language`` and ``task`` are strings (``"fr"``, ``"transcribe"``). As in OpenAI's
    ``get_tokenizer``, a multilingual tokenizer defaults to English transcription; an
    English-only one is always ``("en", "transcribe")`` and its prefix is just ``(sot,)``.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        multilingual: bool,
        num_languages: int = 99,
        language: str | None = None,
        task: str | None = None,
    ):
        """Wraps a loaded ``tokenizers.Tokenizer``.

        Raises:
            ModelError: a special token, a language token or the timestamp range is missing.
            UsageError: an unknown language or task, or one an English-only model lacks.
        """
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        self.num_languages = num_languages

        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.sot_prev = self._special("<|startofprev|>")
        self.sot_lm = self._special("<|startoflm|>")
        self.transcribe = self._special("<|transcribe|>")
        self.translate = self._special("<|translate|>")
        # Older vocabularies (the .en models among them) call it <|nocaptions|>.
        self.no_speech = self._special("<|nospeech|>", "<|nocaptions|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        # Timestamps follow <|notimestamps|>; some tokenizer.json files omit them entirely.
        self.timestamp_begin = self.no_timestamps + 1
        first_timestamp = tokenizer.token_to_id("<|0.00|>")
        if first_timestamp is not None and first_timestamp != self.timestamp_begin:
            raise ModelError(
                None,
                f"<|0.00|> is id {first_timestamp}, expected {self.timestamp_begin} "
                "(right after <|notimestamps|>)",
            )
        self.vocab_size = self.timestamp_begin + NUM_TIMESTAMPS

        codes = tuple(LANGUAGES)[:num_languages]
        if len(codes) != num_languages:
            raise ModelError(
                None, f"num_languages={num_languages}, but only {len(LANGUAGES)} are known"
            )
        self.all_language_codes = codes
        self.all_language_tokens = tuple(
            self._special(*(f"<|{c}|>" for c in (code, *_OLD_LANGUAGE_TOKENS.get(code, ()))))
            for code in codes
        )
        self._language_ids = dict(zip(codes, self.all_language_tokens))

        if multilingual:
            self.language = "en" if language is None else self._supported_language(language)
            self.task = "transcribe" if task is None else _normalize_task(task)
        else:
            self._check_english_only(language, task)
            self.language, self.task = "en", "transcribe"
        self.sot_sequence = self.sot_sequence_for(self.language, self.task)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        multilingual: bool,
        num_languages: int = 99,
        language: str | None = None,
        task: str | None = None,
    ) -> "Tokenizer":
        """Loads a ``tokenizer.json`` file; errors about its contents name the file."""
        path = os.fspath(path)
        try:
            inner = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises plain Exception for bad files
            raise ModelError(path, f"cannot read tokenizer: {err}") from err
        try:
            return cls(
                inner,
                multilingual=multilingual,
                num_languages=num_languages,
                language=language,
                task=task,
            )
        except ModelError as err:
            raise ModelError(path, err.message) from None

    def _special(self, *names: str) -> int:
        """The id of the first of ``names`` present in the vocabulary."""
        for name in names:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ModelError(None, f"tokenizer has no {' or '.join(names)} token")

    def _supported_language(self, value: str) -> str:
        code = normalize_language(value)
        if code not in self._language_ids:
            raise UsageError(
                None, f"language {code!r} is not among this model's {self.num_languages} languages"
            )
        return code

    def _check_english_only(self, language: str | None, task: str | None) -> None:
        if language is not None and normalize_language(language) != "en":
            raise UsageError(None, f"English-only model cannot transcribe {language!r}")
        if task is not None and _normalize_task(task) != "transcribe":
            raise UsageError(None, f"English-only model cannot {task}")

    @property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        """The forced prefix for decoding without timestamps."""
        return (*self.sot_sequence, self.no_timestamps)

    @property
    def language_token(self) -> int:
        """The id of ``<|language|>`` for this tokenizer's language."""
        return self._language_ids[self.language]

    def to_language_token(self, code: str) -> int:
        """The id of a language's token; accepts whatever ``normalize_language`` does.

        Raises:
            UsageError: unknown language, or beyond this model's ``num_languages``.
        """
        return self._language_ids[self._supported_language(code)]

    def sot_sequence_for(self, language: str | None, task: str) -> tuple[int, ...]:
        """The forced decoder prefix for a language and task, as OpenAI builds it.

        Args:
            language: a code or name; ``None`` leaves the language token out (multilingual).
            task: ``"transcribe"`` or ``"translate"``.

        Returns:
            ``(sot,)`` for English-only models, else ``(sot, <|lang|>, <|task|>)`` (without
            the language token when ``language`` is ``None``).

        Raises:
            UsageError: unknown language or task, or one an English-only model lacks.
        """
        if not self.multilingual:
            self._check_english_only(language, task)
            return (self.sot,)
        sequence = [self.sot]
        if language is not None:
            sequence.append(self.to_language_token(language))
        task_token = self.transcribe if _normalize_task(task) == "transcribe" else self.translate
        sequence.append(task_token)
        return tuple(sequence)

    def encode(self, text: str) -> list[int]:
        """Text to BPE ids, with no special tokens added around it."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids, dropping special tokens and timestamps (every id >= eot)."""
        # Filter here rather than trust the file's "special" flags to skip them.
        text_ids = [int(i) for i in ids if i < self.eot]
        return self.tokenizer.decode(text_ids, skip_special_tokens=False)

    def decode_with_timestamps(self, ids: Sequence[int]) -> str:
        """Text with timestamps rendered as ``<|1.08|>`` and specials by their names.

        Raises:
            ValueError: an id outside ``[0, vocab_size)``.
        """
        parts: list[str] = []
        run: list[int] = []  # consecutive non-timestamp ids, decoded together
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} outside the vocabulary [0, {self.vocab_size})")
            if token < self.timestamp_begin:
                run.append(token)
                continue
            parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
            parts.append(f"<|{(token - self.timestamp_begin) * TIME_PRECISION:.2f}|>")
            run = []
        parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
        return "".join(parts)

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Ids to suppress so the model does not write speaker tags or sound annotations.

        E.g. "♪♪♪", "( SPEAKING FOREIGN LANGUAGE )", "[DAVID] Hey there,", while basic
        punctuation (commas, periods, question and exclamation marks) stays allowed.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += (
            "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        )
        # These may take one token or several depending on the vocabulary. When several,
        # suppressing the first is safe: all lie in U+2640..U+267F, whose 3-byte UTF-8
        # forms share their first two bytes with other symbols that may be suppressed.
        miscellaneous = set("♩♪♫♬♭♮♯")
        assert all(0x2640 <= ord(c) <= 0x267F for c in miscellaneous)

        # Hyphens and single quotes stay allowed between words, not at a word's start.
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in miscellaneous:
                    result.add(ids[0])
        return tuple(sorted(result))

    def split_to_word_tokens(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Groups ids into words, for word-level timestamps.

        Returns:
            ``(words, word_tokens)``: each word's text and the ids that make it up.
        """
        if self.language in _UNSPACED_LANGUAGES:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Splits wherever the ids so far decode to whole characters."""
        decoded_full = self.decode_with_timestamps(tokens)
        replacement_char = "\ufffd"
        words: list[str] = []
        word_tokens: list[list[int]] = []
        current: list[int] = []
        offset = 0  # characters of decoded_full already assigned to words
        for token in tokens:
            current.append(int(token))
            decoded = self.decode_with_timestamps(current)
            # A replacement char means an incomplete UTF-8 sequence, unless the full text
            # has one at the same place (the model really wrote U+FFFD or invalid bytes).
            bad = decoded.find(replacement_char)
            if bad < 0 or (
                offset + bad < len(decoded_full) and decoded_full[offset + bad] == replacement_char
            ):
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def split_tokens_on_spaces(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Joins subwords into words that start at a space, punctuation or a special token."""
        subwords, subword_tokens_list = self.split_tokens_on_unicode(tokens)
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for subword, subword_tokens in zip(subwords, subword_tokens_list):
            special = subword_tokens[0] >= self.eot
            with_space = subword.startswith(" ")
            punctuation = subword.strip() in string.punctuation
            if special or with_space or punctuation or not words:
                words.append(subword)
                word_tokens.append(subword_tokens)
            else:
                words[-1] += subword
                word_tokens[-1].extend(subword_tokens)
        return words, word_tokens


def load_tokenizer(
    model_dir: str | os.PathLike,
    *,
    multilingual: bool,
    num_languages: int = 99,
    language: str | None = None,
    task: str | None = None,
) -> Tokenizer:
    """Loads ``<model_dir>/tokenizer.json``.

    Raises:
        ModelError: the directory has no ``tokenizer.json`` (CTranslate2 directories may
            carry only ``vocabulary.json``/``vocabulary.txt``, which are not enough), or the
            file is unreadable or lacks Whisper's special tokens.
    """
    path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    if not os.path.isfile(path):
        found = [
            name
            for name in ("vocabulary.json", "vocabulary.txt")
            if os.path.isfile(os.path.join(os.fspath(model_dir), name))
        ]
        hint = f" (found only {', '.join(found)}, which lacks the BPE merges)" if found else ""
        raise ModelError(model_dir, f"no tokenizer.json{hint}")
    return Tokenizer.from_file(
        path,
        multilingual=multilingual,
        num_languages=num_languages,
        language=language,
        task=task,
    )
