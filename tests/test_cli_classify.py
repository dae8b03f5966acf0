"""``wjx classify`` and ``wjx classify train``: outputs, per-file errors, exit codes.

In-process through Click's CliRunner with the session's ``base`` and ``tiny_en`` models (from
conftest.py) injected in place of ``load_model``, so nothing is loaded or compiled twice.
Every multi-file run passes ``--batch-size 1``: only the one-window batch shape is compiled.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import cli_invoker, hide_ffmpeg, no_model
from whisperjax_cli import loading
from whisperjax_cli.cli_classify import print_classify_table

DATA = Path(__file__).parent / "data"
RU = DATA / "russian-8k.wav"
GO = DATA / "goforward.flac"
CARDS = sorted(DATA.glob("cards-00*.flac"))


@pytest.fixture()
def run(base, tiny_en, monkeypatch, tmp_path):
    """Invokes ``wjx`` in-process in ``tmp_path``; bundled base and tiny.en are the session's."""
    shared = {Path(m.path).resolve(): m for m in (base, tiny_en)}
    real_load = loading.load_model

    def load_shared(name, dtype=None, pending=None):
        found = shared.get(Path(name).resolve()) or {"base": base, "tiny.en": tiny_en}.get(name)
        return found if found is not None else real_load(name, dtype, pending=pending)

    monkeypatch.setattr(loading, "load_model", load_shared)
    return cli_invoker(monkeypatch, tmp_path)


# ---------------------------------------------------------------- language ID


def test_json_is_one_line_per_input_best_first(run):
    result = run("classify", RU, "-f", "json")  # -m base is the default
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["file"] == str(RU)
    assert len(record["labels"]) == 5
    assert record["labels"][0]["label"] == "ru" and record["labels"][0]["score"] > 0.9
    scores = [label["score"] for label in record["labels"]]
    assert scores == sorted(scores, reverse=True)


def test_bad_files_are_reported_and_the_rest_printed(run, tmp_path, monkeypatch):
    hide_ffmpeg(monkeypatch)  # with ffmpeg, text.wav's error is ffmpeg's (test_cli covers both)
    (tmp_path / "text.wav").write_text("not audio at all\n")
    args = ("classify", "-m", "base", "--batch-size", "1", "-k", "2", "-f", "json")
    result = run(*args, RU, "text.wav", "missing.mp3", "-", input=GO.read_bytes())
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(RU), "-"]
    assert records[0]["labels"][0]["label"] == "ru"
    assert records[1]["labels"][0]["label"] == "en" and len(records[1]["labels"]) == 2
    assert set(result.stderr.splitlines()) == {
        "wjx: missing.mp3: no such file",
        "wjx: text.wav: not an audio file (unrecognised format; ffmpeg, if installed, reads more formats)",
    }


def test_table_names_the_file_and_the_language(run, tmp_path):
    shutil.copy(RU, tmp_path / "ru.wav")
    result = run("classify", "--batch-size", "1", "ru.wav", GO)
    assert result.exit_code == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["FILE", "LABEL", "SCORE", "NEXT"]
    assert rows[0].startswith("ru.wav ") and "ru (Russian)" in rows[0]
    assert rows[1].startswith(str(GO)) and "en (English)" in rows[1]
    assert all(line == line.rstrip() and "─" not in line for line in result.stdout.splitlines())
    top1 = run("classify", "-k", "1", "ru.wav")
    assert top1.stdout.splitlines()[0].split() == ["FILE", "LABEL", "SCORE"]


def test_forced_progress_goes_to_stderr_only(run):
    result = run("classify", "--progress", "-f", "json", RU)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["labels"][0]["label"] == "ru"
    assert "\x1b[" in result.stderr  # rich drew on stderr


def test_table_on_a_terminal_is_drawn_by_rich():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    print_classify_table([("a.wav", [("ru", 0.9871), ("uk", 0.01)])], out, names={"ru": "russian"})
    text = out.getvalue()
    assert "a.wav" in text and "ru (Russian)" in text and "0.987" in text and "uk 0.010" in text


def test_english_only_model_exits_2(run):
    result = run("classify", "-m", "tiny.en", RU)
    assert result.exit_code == 2
    assert result.stderr.startswith("wjx: tiny.en: English-only model: it cannot identify languages")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_bad_model_exits_3(run):
    result = run("classify", "-m", "./no-such-model", RU)
    assert result.exit_code == 3
    assert result.stderr == "wjx: ./no-such-model: not a model directory\n"


def test_usage_errors_exit_2_before_loading(run, monkeypatch):
    no_model(monkeypatch)
    for args, message in [
        (["classify"], "Missing argument 'FILE...'"),
        (["classify", "--windows", "0", "x.wav"], "--windows"),
        (["classify", "-f", "csv", "x.wav"], "'csv' is not one of"),
        (["classify", "train", "no-such-dir", "--out", "x"], "'DATA_DIR': Directory 'no-such-dir' does not exist"),
        (["classify", "train", "."], "Missing option '-o' / '--out'"),
    ]:
        result = run(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_help_lists_classify_and_train(run):
    assert "classify" in run("--help").stdout
    help_text = run("classify", "--help").stdout
    assert "Usage: cli classify [OPTIONS] FILE..." in help_text and "wjx classify train" in help_text
    assert "[default: base]" in " ".join(help_text.split())
    train_help = run("classify", "train", "--help").stdout
    assert "Usage: cli classify train [OPTIONS] DATA_DIR" in train_help
    assert "--train-top-layers" in train_help and "--dtype" not in train_help


# ---------------------------------------------------------------- train


def test_train_then_classify_with_the_head(run, tmp_path):
    others = [p for p in DATA.iterdir() if p.suffix in (".flac", ".wav", ".mp3", ".ogg") and p not in CARDS]
    for label, clips in {"cards": CARDS, "other": others}.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for clip in clips:
            shutil.copy(clip, tmp_path / "data" / label / clip.name)
    (tmp_path / "data" / "other" / "broken.wav").write_bytes(b"")  # skipped, with a warning
    result = run("classify", "train", "data", "--out", "clf", "-m", "tiny.en", "--epochs", "5",
                 "--val-fraction", "0.1", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"wjx: {Path('data/other/broken.wav')}: skipped: empty file (0 bytes)\n"
    summary = json.loads(result.stdout)
    assert summary["labels"] == ["cards", "other"] and summary["val_size"] == 2
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert (tmp_path / "clf" / "config.json").exists() and (tmp_path / "clf" / "model.safetensors").exists()

    again = run("classify", "train", "data", "-o", "clf", "-m", "tiny.en", "--epochs", "1")  # retraining is fine
    assert again.exit_code == 0, again.stderr
    assert again.stdout.startswith("clf: 2 labels, held-out accuracy ") and "train accuracy" in again.stdout

    result = run("classify", "-m", "clf", CARDS[0], "-f", "json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert [label["label"] for label in record["labels"]] in (["cards", "other"], ["other", "cards"])
    table = run("classify", "-m", "clf", CARDS[0])
    assert "(" not in table.stdout.splitlines()[1]  # head labels are not language codes


def test_train_refuses_a_folder_that_is_not_a_classifier(run, monkeypatch, tmp_path):
    no_model(monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["WhisperForConditionalGeneration"]}')
    result = run("classify", "train", "data", "--out", "model")
    assert result.exit_code == 2
    assert result.stderr == "wjx: model: is not empty and holds no classifier; give a new or empty folder\n"


def test_train_with_one_label_exits_2(run, tmp_path):
    (tmp_path / "data" / "only").mkdir(parents=True)
    shutil.copy(GO, tmp_path / "data" / "only")
    result = run("classify", "train", "data", "--out", "clf", "-m", "tiny.en")
    assert result.exit_code == 2
    assert result.stderr == "wjx: data: found 1 label folder(s); a classifier needs at least 2\n"
