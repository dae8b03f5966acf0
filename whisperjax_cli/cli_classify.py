"""``wjx classify FILE...`` (language ID, or a trained head) and ``wjx classify train``.

The commands of whisperjax_cli/classifier.py and whisperjax_cli/train.py, added to the ``wjx``
group by ``cli.py``: they share the transcribe command's runtime options, inputs, model loading
and exit codes (``whisperjax_cli.cli_common``). JAX and the model code are imported inside the commands.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Optional

import click

from whisperjax_cli.cli_common import (DTYPES, EXIT_FAILED, EXIT_OK, describe, load_for_cli, run_guarded,
                                       runtime_options, say)
from whisperjax_cli.cli_files import Input, collect_inputs
from whisperjax_cli.parallel_cli import process_options
from whisperjax_cli.errors import UsageError

# ---------------------------------------------------------------- classify

CLASSIFY_MODEL = "base"  # language ID needs a multilingual model: tiny.en has no language tokens

CLASSIFY_EPILOG = """\b
Examples:
  wjx classify talk.mp3                        # spoken language: top 5 with scores
  wjx classify -f json clips/ | jq -r '.labels[0].label'
  wjx classify --windows 3 -k 1 long.m4a       # average the first three 30 s windows
  wjx classify train data/ --out my-clf        # data/<label>/<clips>: train a classifier
  wjx classify -m my-clf new.wav               # its labels instead of languages

\b
-f json prints one line per input: {"file": ..., "labels": [{"label": "fr", "score": 0.93}, ...]},
best first. Exit codes as for transcribe; an English-only model exits 2. A file named
'train' must be written ./train.
"""

TRAIN_EPILOG = """\b
Examples:
  wjx classify train data/ --out my-clf        # a head on base's frozen encoder
  wjx classify train data/ -o my-clf -m tiny.en --epochs 50 --val-fraction 0.1
  wjx classify -m my-clf new.wav

\b
DATA_DIR holds one folder of clips per label (data/dog/*.wav, data/cat/*.wav); each clip's
first 30 s are used. DIR is a Hugging Face WhisperForAudioClassification folder. Unreadable
clips are skipped with a warning on stderr; the summary (or -f json) goes to stdout.
"""


def _classify_runtime_options(model_help: str, drop: tuple[str, ...] = ()):
    """:func:`runtime_options`, with ``--model`` defaulting to base and the options in ``drop`` left out."""
    def decorate(fn):
        fn = runtime_options(fn)
        kept = []
        for param in fn.__click_params__:
            if param.name == "model":
                param.default, param.show_default, param.help = CLASSIFY_MODEL, True, model_help
            if param.name == "dtype":  # mixed is a transcription speed-up (the output projection)
                param.type = click.Choice([d for d in DTYPES if d != "mixed"])
                param.help = "Compute dtype. Default: float32 on CPU, bfloat16 on accelerators."
            if param.name not in drop:
                kept.append(param)
        fn.__click_params__[:] = kept
        return fn

    return decorate


class _ClassifyCommand(click.Command):
    """``wjx classify FILE...``, which hands ``wjx classify train ...`` (issue #5's spelling) to
    the train command: a click Group could not also take FILE arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.subcommands: dict[str, click.Command] = {}

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] in self.subcommands:
            name = args[0]
            return self.subcommands[name].make_context(f"{info_name or 'classify'} {name}", args[1:],
                                                       parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


def _load_classify_model(name: str, dtype=None):
    # Imported here, not above: whisperjax_cli.classify imports JAX, which load_for_cli sets up first.
    from whisperjax_cli.classifier import load_classify_model

    return load_classify_model(name, dtype)


@click.command("classify", cls=_ClassifyCommand, epilog=CLASSIFY_EPILOG,
             short_help="Identify the language of audio FILEs (or train a classifier).")
@click.argument("inputs", nargs=-1, required=True, metavar="FILE...")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Labels shown per input, best first.")
@click.option("--windows", type=click.IntRange(min=1), default=1, show_default=True,
              help="30 s windows scored per input; their scores are averaged.")
@click.option("--skip-silence/--no-skip-silence", default=True, show_default=True,
              help="Language ID starts where the sound does (leading silence is skipped).")
@click.option("-f", "--output-format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="table: one row per input; json: one JSON object per input and line.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows scored together.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("--progress/--no-progress", "show_progress", default=None, hidden=True,
              help="Force the progress bar on or off (default: on when stderr is a terminal).")
@process_options
@_classify_runtime_options(
    "A multilingual Whisper for spoken-language ID (a directory, base, or a Hub id such as "
    "openai/whisper-small), or a classifier folder from 'wjx classify train'.")
def classify(**options) -> None:
    """Identify the spoken language of audio FILEs, or their class with a trained classifier.

    Folders are searched; '-' reads stdin. Results go to stdout in input order.
    'wjx classify train DATA_DIR --out DIR' trains a classifier (see its --help).
    """
    run_guarded(options["debug"], lambda: run_classify(options))


def run_classify(o: dict) -> int:
    """The classify command's body; returns the exit code. Several processes (``--coordinator``
    ...) each classify their share of the inputs and print their own rows; every one exits 1
    when an input failed in any of them."""
    from whisperjax_cli.parallel_cli import start_run

    processes = start_run({**o, "output_dir": None})
    failed = None
    try:
        failed = _classify_share(o, processes)
    finally:
        (total,) = processes.totals((1 if failed is None else failed,), tag="classify")
        processes.close()
    return EXIT_FAILED if total else EXIT_OK


def _classify_share(o: dict, processes) -> int:
    """This process's share of the inputs, classified and printed; returns how many failed."""
    from whisperjax_cli.progress import Reporter

    inputs, errors = collect_inputs(o["inputs"])
    errors = errors if processes.first else []  # every process finds the same; counted once
    for line in errors:
        say(line)
    inputs = processes.share(inputs)
    if not inputs:
        return len(errors)
    model = load_for_cli(o["model"], o["device"], o["dtype"], o["threads"], o["no_compile_cache"],
                         loader=_load_classify_model)
    show = o["show_progress"]
    if show is None:
        show = not o["quiet"] and sys.stderr.isatty()
    stdout = sys.stdout  # taken before the bars start: rich redirects sys.stdout to stderr while they show
    with Reporter([i.label for i in inputs], show_progress=show) as reporter:
        rows, failed = _classify_all(model, inputs, reporter, stdout, o)
    if rows:
        from whisperjax_cli.classifier import ClassifierModel
        from whisperjax_cli.tokenizer import LANGUAGES

        print_classify_table(rows, stdout, names=None if isinstance(model, ClassifierModel) else LANGUAGES)
    return failed + len(errors)


def _classify_all(model, inputs: list[Input], reporter, stdout, o: dict) -> tuple[list, int]:
    """Scores every input; JSON lines are printed as results come (in input order), table rows
    are returned. Returns ``(rows [(file, [(label, score), ...])], how many failed)``."""
    from whisperjax_cli.classifier import classify_files

    results = classify_files(model, [i.loader() for i in inputs], top_k=o["top_k"], windows=o["windows"],
                             skip_silence=o["skip_silence"], batch_size=o["batch_size"])
    rows, failed = [], 0
    for result in results:
        label = inputs[result.index].label
        if result.error is not None:
            if o["debug"]:
                traceback.print_exception(result.error)
            reporter.error(describe(result.error, label))
            failed += 1
        elif o["fmt"] == "json":
            stdout.write(json.dumps(result.to_dict(file=label), ensure_ascii=False) + "\n")
            stdout.flush()
        else:
            rows.append((label, result.labels))
        reporter.finished(result.index)
    return rows, failed


def print_classify_table(rows, stream, names: Optional[dict] = None) -> None:
    """FILE, LABEL, SCORE and the next labels, one row per input: a rich table on a terminal,
    plain columns (no trailing spaces, no box drawing) otherwise. ``names`` maps language
    codes to names, shown beside the top label ("ru (Russian)")."""
    def top(label: str) -> str:
        return f"{label} ({names[label].title()})" if names and label in names else label

    header = ["FILE", "LABEL", "SCORE", "NEXT"]
    body = [[file, top(labels[0][0]), f"{labels[0][1]:.3f}", ", ".join(f"{l} {s:.3f}" for l, s in labels[1:])]
            for file, labels in rows]
    if not any(row[3] for row in body):  # --top-k 1
        header, body = header[:3], [row[:3] for row in body]
    if stream.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(*header, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
        table.columns[0].overflow = "fold"
        table.columns[2].justify = "right"
        for row in body:
            table.add_row(*row)
        Console(file=stream, highlight=False).print(table)
        return
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    for row in [header, *body]:
        cells = [cell.rjust(w) if c == 2 else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        stream.write("  ".join(cells).rstrip() + "\n")
    stream.flush()


# ---------------------------------------------------------------- classify train


@click.command("train", epilog=TRAIN_EPILOG)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the classifier: new, empty, or one a previous training wrote.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True, help="Passes over the clips.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Adam learning rate of the head.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of each label's clips held out to measure accuracy on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffling, split and initialisation.")
@click.option("--train-top-layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also fine-tune this many top encoder blocks (slow on CPU); 0: the encoder stays frozen.")
@click.option("--encoder-lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="Learning rate of the fine-tuned encoder blocks.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Clips per step.")
@click.option("-f", "--output-format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="The summary on stdout: one line, or one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (warnings and errors are still shown).")
@click.option("--progress/--no-progress", "show_progress", default=None, hidden=True,
              help="Force progress bars on or off (default: on when stderr is a terminal).")
@_classify_runtime_options(
    "The Whisper model whose encoder the classifier is built on (English-only ones work too).",
    drop=("dtype",))  # trained and saved in float32
def classify_train(**options) -> None:
    """Train a classifier on DATA_DIR, one sub-folder of audio clips per label."""
    run_guarded(options["debug"], lambda: run_classify_train(options))


classify.subcommands["train"] = classify_train


def _check_train_out(out: Path) -> None:
    """Refuses a non-empty folder that no previous training wrote (a Whisper model's own folder
    would lose its config.json)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "WhisperForAudioClassification" not in (config.get("architectures") or []):
        raise UsageError(out, "is not empty and holds no classifier; give a new or empty folder")


def run_classify_train(o: dict) -> int:
    """The classify train command's body; returns the exit code."""
    import contextlib

    _check_train_out(o["out_dir"])
    model = load_for_cli(o["model"], o["device"], "float32", o["threads"], o["no_compile_cache"])
    show = o["show_progress"]
    if show is None:
        show = not o["quiet"] and sys.stderr.isatty()
    from whisperjax_cli.train import train_classifier

    with (_TrainBars(sys.stderr) if show else contextlib.nullcontext()) as bars:
        report = train_classifier(
            o["data_dir"], model, o["out_dir"], epochs=o["epochs"], lr=o["lr"], val_fraction=o["val_fraction"],
            seed=o["seed"], train_top_layers=o["train_top_layers"], encoder_lr=o["encoder_lr"],
            batch_size=o["batch_size"], progress=bars,
        )
    for file, why in report.skipped:
        say(f"{file}: skipped: {why.removeprefix(file + ': ')}")
    click.echo(json.dumps(train_summary(report), ensure_ascii=False) if o["fmt"] == "json"
               else _train_line(report))
    return EXIT_OK


def train_summary(report) -> dict:
    """A :class:`~whisperjax_cli.train.TrainReport` as JSON-ready data (``-f json``)."""
    return {
        "out_dir": str(report.out_dir), "labels": list(report.labels), "epochs": report.epochs,
        "train_size": report.train_size, "val_size": report.val_size, "train_accuracy": report.train_accuracy,
        "val_accuracy": report.val_accuracy, "train_loss": report.train_loss,
        "skipped": [{"file": f, "error": why} for f, why in report.skipped],
        "val_predictions": [{"file": f, "label": t, "predicted": p} for f, t, p in report.val_predictions],
    }


def _train_line(report) -> str:
    if report.val_accuracy is None:
        held_out = "no clips held out"
    else:
        right = round(report.val_accuracy * report.val_size)
        held_out = f"held-out accuracy {report.val_accuracy:.3f} ({right}/{report.val_size} clips)"
    return (f"{report.out_dir}: {len(report.labels)} labels, {held_out}, "
            f"train accuracy {report.train_accuracy:.3f} ({report.train_size} clips)")


class _TrainBars:
    """rich bars on stderr for ``train_classifier``'s ``progress(stage, done, total, metrics)``."""

    STAGES = {"features": "reading clips", "train": "training"}

    def __init__(self, stream):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(), console=Console(file=stream, force_terminal=True, highlight=False), transient=True,
        )
        self.tasks: dict[str, int] = {}
        self.metrics: dict[str, dict] = {}

    def __enter__(self) -> "_TrainBars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int, metrics: dict) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.STAGES.get(stage, stage), total=total, metrics="")
        shown = self.metrics.setdefault(stage, {})
        shown.update(metrics)  # the validation accuracy comes every few epochs: keep the last
        text = "  ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in shown.items())
        self.progress.update(self.tasks[stage], completed=done, total=total, metrics=text)
