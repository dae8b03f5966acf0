"""Audio classification: spoken-language ID with any multilingual Whisper, and Whisper
classification heads in Hugging Face's ``WhisperForAudioClassification`` layout.

Both tasks score 30 s windows and average the scores of a file's windows, so ``classify_files``
batches windows of many files together whatever the task:

* **Language ID** (a multilingual Whisper): leading silence is skipped, each window is the
  log-mel of the content zero-padded past its end (faster-whisper's ``detect_language``), and
  the language scores are the softmax over the language tokens after ``<|startoftranscript|>``.
* **Heads** (a ``WhisperForAudioClassification`` checkpoint): each window is the log-mel of
  30 s of audio, zero-padded as samples (HF's feature extractor), and the scores are the
  softmax of the head's logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from whisperjax_cli.audio import load_audio
from whisperjax_cli.dims import ModelDimensions
from whisperjax_cli.errors import ModelError, UsageError
from whisperjax_cli.features import N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisperjax_cli.language import detect_language_mel, language_windows
from whisperjax_cli.model import AudioEncoder

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # padded batch sizes, so few shapes are ever compiled

# HF ``WhisperConfig`` defaults: its config.json omits any field equal to them.
HF_WHISPER_DEFAULTS = {
    "vocab_size": 51865, "num_mel_bins": 80, "encoder_layers": 4, "encoder_attention_heads": 6,
    "decoder_layers": 4, "decoder_attention_heads": 6, "d_model": 384, "max_source_positions": 1500,
    "max_target_positions": 448, "classifier_proj_size": 256, "use_weighted_layer_sum": False,
}  # fmt: skip


@dataclasses.dataclass
class Classification:
    """One input's result: top-k ``(label, score)`` pairs sorted by score, or its error."""

    index: int
    source: Any
    labels: list[tuple[str, float]]
    error: Optional[Exception] = None
    windows: int = 0  # windows scored

    def to_dict(self, file: Optional[str] = None) -> dict:
        """``{"file": ..., "labels": [{"label": "fr", "score": 0.93}, ...]}`` (``-f json``)."""
        name = file if file is not None else str(self.source)
        return {"file": name, "labels": [{"label": l, "score": round(s, 4)} for l, s in self.labels]}


# ---------------------------------------------------------------- the head, in Flax


class WhisperClassifier(nn.Module):
    """HF's ``WhisperForAudioClassification``: encoder → optional softmax-weighted sum of its
    hidden states → ``projector`` → mean over all ``n_audio_ctx`` positions → ``classifier``.

    HF's Flax port stacks the encoder's output tuple instead of its hidden states in the
    weighted sum; this follows the PyTorch model, which stacks ``hidden_states``.
    """

    dims: ModelDimensions
    num_labels: int
    proj_size: int = 256
    weighted_layer_sum: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = AudioEncoder(self.dims, self.dtype)
        if self.weighted_layer_sum:
            n = self.dims.n_audio_layer + 1  # every block's input and the final output
            self.layer_weights = self.param("layer_weights", nn.initializers.constant(1.0 / n), (n,))
        init = nn.initializers.normal(0.02)  # HF's init_std
        self.projector = nn.Dense(self.proj_size, kernel_init=init, dtype=self.dtype)
        self.classifier = nn.Dense(self.num_labels, kernel_init=init, dtype=self.dtype)

    def __call__(self, mel: jax.Array) -> jax.Array:
        """Logits ``[batch, num_labels]`` for mel ``[batch, 2 * n_audio_ctx, n_mels]``."""
        x, hidden = self.encoder(mel, all_hidden=True)
        if self.weighted_layer_sum:
            weights = jax.nn.softmax(self.layer_weights.astype(jnp.float32))
            stacked = jnp.stack(hidden, axis=1).astype(jnp.float32)  # [batch, layers, ctx, state]
            x = jnp.einsum("l,blts->bts", weights, stacked)
        x = self.projector(x.astype(self.dtype))  # [batch, ctx, proj]
        return self.classifier(x.mean(axis=1)).astype(jnp.float32)

    def from_pooled(self, pooled: jax.Array) -> jax.Array:
        """The same logits from ``pooled`` ``[batch, n_audio_layer + 1, state]``, the time means
        of every hidden state. Exact: the weighted sum and the projector are affine, so they
        commute with the mean (the trainer caches these means instead of whole sequences)."""
        if self.weighted_layer_sum:
            x = jnp.einsum("l,bls->bs", jax.nn.softmax(self.layer_weights.astype(jnp.float32)), pooled)
        else:
            x = pooled[:, -1]
        return self.classifier(self.projector(x.astype(self.dtype))).astype(jnp.float32)

    def encode_from(self, x: jax.Array, first: int) -> jax.Array:
        """Time means ``[batch, n_audio_layer - first, state]`` of the hidden states after block
        ``first``'s input ``x`` ``[batch, ctx, state]`` (for training the top blocks)."""
        blocks = self.encoder.blocks[first:]
        means = []
        for i, block in enumerate(blocks):
            x = block(x)
            h = self.encoder.ln_post(x) if i == len(blocks) - 1 else x
            means.append(h.astype(jnp.float32).mean(axis=1))
        return jnp.stack(means, axis=1)


@dataclasses.dataclass(eq=False)
class ClassifierModel:
    """A loaded classification head: dimensions, labels, parameters (in the compute dtype)."""

    name: str
    path: Path
    dims: ModelDimensions
    labels: tuple[str, ...]
    proj_size: int
    weighted_layer_sum: bool
    params: Any
    dtype: Any

    @property
    def n_mels(self) -> int:
        return self.dims.n_mels

    @property
    def module(self) -> WhisperClassifier:
        return WhisperClassifier(self.dims, len(self.labels), self.proj_size, self.weighted_layer_sum, self.dtype)


def is_classifier_config(config: dict) -> bool:
    """True for a ``WhisperForAudioClassification`` config (or a bare one with labels)."""
    architectures = config.get("architectures") or []
    return "WhisperForAudioClassification" in architectures or (not architectures and "id2label" in config)


def head_table(dims: ModelDimensions, weighted_layer_sum: bool) -> list[tuple[str, str, str]]:
    """(our path, HF name, layout) rows of a classifier, encoder included (HF's ``encoder.``)."""
    from whisperjax_cli.weights import encoder_table

    rows = encoder_table(dims, "encoder", "encoder")
    for part in ("projector", "classifier"):
        rows += [(f"{part}/kernel", f"{part}.weight", "linear"), (f"{part}/bias", f"{part}.bias", "copy")]
    if weighted_layer_sum:
        rows.append(("layer_weights", "layer_weights", "copy"))
    return rows


def read_classifier_config(path: Path) -> tuple[dict, ModelDimensions, tuple[str, ...]]:
    """A classifier's config with HF's defaults filled in, its dimensions and its labels."""
    from whisperjax_cli.loading import _read_json

    raw = _read_json(path / "config.json")
    if not raw:
        raise ModelError(path, "config.json is missing")
    config = {**HF_WHISPER_DEFAULTS, **raw}
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ModelError(path / "config.json", "a classifier needs a non-empty 'id2label'")
    try:
        names = {int(i): str(label) for i, label in id2label.items()}
    except ValueError:
        raise ModelError(path / "config.json", "'id2label' keys must be integers") from None
    if sorted(names) != list(range(len(names))):
        raise ModelError(path / "config.json", "'id2label' keys must be 0..n-1")
    labels = tuple(names[i] for i in range(len(names)))
    try:
        return config, ModelDimensions.from_hf_config(config), labels
    except ValueError as err:
        raise ModelError(path / "config.json", f"not a Whisper config: {err}") from None


def load_classifier(name_or_path: str | Path, dtype: Any = None) -> ClassifierModel:
    """Loads a ``WhisperForAudioClassification`` checkpoint, strictly, from a directory with
    ``config.json`` and ``model.safetensors`` or ``flax_model.msgpack`` (or a Hub id).

    Raises:
      ModelError: a missing or extra tensor, a wrong shape, or a config without labels.
    """
    from whisperjax_cli import weights
    from whisperjax_cli.loading import default_dtype
    from whisperjax_cli.hub import resolve_model

    path = resolve_model(str(name_or_path))
    config, dims, labels = read_classifier_config(path)
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        state = weights.read_safetensors(path)
    elif (path / "flax_model.msgpack").exists():
        state = weights.read_flax_msgpack(path / "flax_model.msgpack")
    else:
        raise ModelError(path, "no classifier weights found (model.safetensors or flax_model.msgpack)")
    proj, weighted = int(config["classifier_proj_size"]), bool(config["use_weighted_layer_sum"])
    module = WhisperClassifier(dims, len(labels), proj, weighted)
    shapes = weights.flatten(jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2 * dims.n_audio_ctx, dims.n_mels)))
    )["params"])  # fmt: skip
    flat = {}
    for ours, theirs, kind in head_table(dims, weighted):
        if theirs not in state:
            raise ModelError(path, f"missing tensor '{theirs}'")
        value = np.asarray(state.pop(theirs), np.float32)
        # Linear and conv layouts are our shapes reversed (see weights._TO_FLAX).
        expected = shapes[ours].shape if kind == "copy" else shapes[ours].shape[::-1]
        if value.shape != expected:
            raise ModelError(path, f"tensor '{theirs}' has shape {value.shape}, expected {expected}")
        flat[ours] = weights._TO_FLAX[kind](value)
    if state:
        raise ModelError(path, f"unexpected tensors: {', '.join(sorted(state)[:5])}")
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(default_dtype())
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), weights.unflatten(flat))
    return ClassifierModel(str(name_or_path), path, dims, labels, proj, weighted, params, dtype)


def load_classify_model(name_or_path: str, dtype: Any = None):
    """What ``wjx classify --model`` loads: a classifier checkpoint, or a multilingual Whisper
    for language ID (a :class:`~whisperjax_cli.loading.WhisperModel`).

    Raises:
      UsageError: an English-only Whisper (it has no language tokens to score).
      ModelError: the model cannot be found, read or validated.
    """
    from whisperjax_cli.loading import _read_json, load_model
    from whisperjax_cli.hub import resolve_model

    path = resolve_model(name_or_path)
    if is_classifier_config(_read_json(path / "config.json")):
        return load_classifier(path, dtype)
    model = load_model(str(path), dtype)
    model.name = name_or_path
    if not model.is_multilingual:
        raise UsageError(name_or_path, "English-only model: it cannot identify languages; use a multilingual "
                         "model (e.g. --model base) or a classifier trained with 'wjx classify train'")
    return model


# ---------------------------------------------------------------- windows


def head_windows(audio: np.ndarray, n_mels: int, windows: int = 1):
    """Windows for a classifier head: HF's features of consecutive 30 s stretches of audio
    (zero-padded as samples, so the pad is the log-mel floor), weighted by their length."""
    n = max(1, min(windows, math.ceil(audio.shape[0] / N_SAMPLES)))
    mels = np.stack([
        log_mel_spectrogram(pad_or_trim(audio[i * N_SAMPLES : (i + 1) * N_SAMPLES], N_SAMPLES), n_mels)
        for i in range(n)
    ])  # fmt: skip
    weights = np.array([min(N_SAMPLES, audio.shape[0] - i * N_SAMPLES) for i in range(n)], np.float64)
    return mels, weights


# ---------------------------------------------------------------- scores


@functools.partial(jax.jit, static_argnames=("module",))
def head_logits(module: WhisperClassifier, params, mel: jax.Array) -> jax.Array:
    """Classifier logits ``[batch, num_labels]`` for mel windows ``[batch, frames, n_mels]``."""
    return module.apply({"params": params}, mel)


def _bucketed(fn: Callable[[np.ndarray], np.ndarray], mels: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``mels`` in chunks of bucket sizes: ``batch_size`` rounded down to a bucket,
    then the rest split into smaller buckets (12 = 8 + 4), so no window is padding."""
    sizes = [b for b in BATCH_BUCKETS if b <= max(1, batch_size)]
    out, i = [], 0
    while i < mels.shape[0]:
        size = max(b for b in sizes if b <= mels.shape[0] - i)
        out.append(np.asarray(fn(np.ascontiguousarray(mels[i : i + size], np.float32))))
        i += size
    return np.concatenate(out)


def window_scores(model, mels: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Probabilities ``[n, n_labels]`` of mel windows ``[n, N_FRAMES, n_mels]`` (either task)."""
    if isinstance(model, ClassifierModel):
        module, params = model.module, model.params
        return _bucketed(lambda m: jax.nn.softmax(head_logits(module, params, m), axis=-1), mels, batch_size)
    return _bucketed(lambda m: detect_language_mel(model, m)[1], mels, batch_size)


def label_names(model) -> tuple[str, ...]:
    """The labels scores refer to: a head's ``id2label``, or the model's language codes."""
    if isinstance(model, ClassifierModel):
        return model.labels
    if not model.tokenizer.multilingual:
        raise UsageError(model.name, "English-only model: it cannot identify languages")
    return tuple(model.tokenizer.all_language_codes)


def top_labels(names, probs: np.ndarray, top_k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[: max(1, top_k)]
    return [(names[i], float(probs[i])) for i in order]


# ---------------------------------------------------------------- many files


def _load(source, sample_rate: Optional[int]) -> np.ndarray:
    if callable(source):  # a loader: the caller decodes lazily and names its own errors
        return source()
    if isinstance(source, np.ndarray) and sample_rate is None:
        return source  # already 16 kHz mono
    return load_audio(source, sample_rate)


def classify_files(
    model, sources: Iterable, sample_rate: Optional[int] = None, *, top_k: int = 5, windows: int = 1,
    skip_silence: bool = True, batch_size: int = 8,
) -> Iterator[Classification]:
    """Classifies many inputs, batching the windows of several files together.

    Args:
      model: from :func:`load_classify_model` (a classifier, or a multilingual Whisper).
      sources: paths, binary file objects, 16 kHz arrays, or zero-argument loaders.
      sample_rate: the rate of array sources, when they are not already 16 kHz.
      top_k: labels kept per input, best first.
      windows: 30 s windows scored per input; their probabilities are averaged.
      skip_silence: language ID starts at the first loud frame (heads see the audio as HF does).
      batch_size: windows per model call.
    Yields:
      a :class:`Classification` per input, in input order; an input that cannot be read
      yields one with ``error`` set (an :class:`~whisperjax_cli.errors.AudioError`) and the
      others go on.
    """
    if windows < 1:
        raise UsageError(None, f"--windows must be at least 1, not {windows}")
    names = label_names(model)
    queue: list[tuple[Classification, np.ndarray, np.ndarray]] = []
    for index, source in enumerate(sources):
        result = Classification(index, source, [])
        mels = weights = None
        try:
            audio = _load(source, sample_rate)
            if isinstance(model, ClassifierModel):
                mels, weights = head_windows(audio, model.n_mels, windows)
            else:
                mels, weights = language_windows(audio, model.n_mels, windows, skip_silence)
        except Exception as err:  # noqa: BLE001 - per-file isolation; the CLI reports it
            result.error = err
        queue.append((result, mels, weights))
        if sum(0 if m is None else m.shape[0] for _, m, _ in queue) >= batch_size:
            yield from _score_queue(model, names, queue, top_k, batch_size)
            queue = []
    yield from _score_queue(model, names, queue, top_k, batch_size)


def _score_queue(model, names, queue, top_k: int, batch_size: int) -> Iterator[Classification]:
    """Scores the windows of every queued file in one batched run, then averages per file."""
    ready = [m for _, m, _ in queue if m is not None]
    probs = window_scores(model, np.concatenate(ready), batch_size) if ready else None
    offset = 0
    for result, mels, weights in queue:
        if mels is not None:
            rows = probs[offset : offset + mels.shape[0]]  # [windows, n_labels]
            offset += mels.shape[0]
            result.labels = top_labels(names, weights @ rows / weights.sum(), top_k)
            result.windows = mels.shape[0]
        yield result


def classify(model, audio, sample_rate: Optional[int] = None, **kwargs) -> list[tuple[str, float]]:
    """Top-k ``(label, score)`` of one input; ``model`` may be a name (see :func:`classify_files`).

    Raises:
      AudioError: the input cannot be read.
    """
    if isinstance(model, (str, Path)):
        model = load_classify_model(str(model))
    (result,) = classify_files(model, [audio], sample_rate, **kwargs)
    if result.error is not None:
        raise result.error
    return result.labels
