"""Training a Whisper classification head on a folder of labelled clips (``wjx classify train``).

``DATA_DIR`` holds one folder per label. Each clip is read once and run once through the frozen
encoder as HF's feature extractor sees it (its first 30 s, zero-padded as samples); the trainer
caches the *time means* of the encoder's hidden states, ``[n_audio_layer + 1, state]`` per clip.
That is exact, not an approximation: HF's head is ``classifier(mean_t(projector(sum_l w_l h_l)))``
and the weighted sum and the projector are affine, so they commute with the mean over time.
With ``train_top_layers=k`` the input of the first trainable block is cached whole instead and
the top ``k`` blocks (and the final layer norm) are trained with the head.

The result is an HF ``WhisperForAudioClassification`` directory: ``config.json`` (with
``id2label``) and ``model.safetensors`` under HF's names, encoder included.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from whisperjax_cli.audio import load_audio
from whisperjax_cli.classifier import BATCH_BUCKETS, HF_WHISPER_DEFAULTS, WhisperClassifier, head_table
from whisperjax_cli.errors import UsageError
from whisperjax_cli.features import N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisperjax_cli.model import AudioEncoder

# Files a classifier directory keeps from its Whisper model, so that it is self-contained.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json")
Progress = Callable[[str, int, int, dict], None]  # (stage, done, total, metrics)


@dataclasses.dataclass
class TrainReport:
    """What a training run did; ``val_accuracy`` is None when nothing was held out."""

    out_dir: Path
    labels: tuple[str, ...]
    train_size: int
    val_size: int
    train_accuracy: float
    val_accuracy: Optional[float]
    train_loss: float
    epochs: int
    skipped: list[tuple[str, str]]  # (file, why) for clips that could not be read
    val_predictions: list[tuple[str, str, str]]  # (file, true label, predicted label)
    val_probs: Optional[np.ndarray] = None  # [val_size, n_labels]


def scan_dataset(data_dir: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Labels (the sub-folder names, sorted) and ``(file, label index)`` for every file under them.

    Raises:
      UsageError: fewer than two label folders, or a label folder without files.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(data_dir, "not a directory (expected one sub-folder of clips per label)")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise UsageError(data_dir, f"found {len(folders)} label folder(s); a classifier needs at least 2")
    items = []
    for i, folder in enumerate(folders):
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UsageError(folder, "label folder has no files")
        items += [(f, i) for f in files]
    return tuple(p.name for p in folders), items


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices; each label gives ``round(n * val_fraction)`` clips to
    validation, at least one when ``val_fraction > 0`` and it has two, and keeps one for training."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(np.array(train, np.int64)), np.sort(np.array(val, np.int64))


# ---------------------------------------------------------------- features


@functools.partial(jax.jit, static_argnames=("encoder", "first"))
def encoder_features(encoder: AudioEncoder, params, mel: jax.Array, first: int):
    """Time means of every hidden state ``[batch, n_audio_layer + 1, state]`` and, when ``first``
    is a block (``< n_audio_layer``), that block's whole input ``[batch, ctx, state]``."""
    _, hidden = encoder.apply({"params": params}, mel, True)
    means = jnp.stack([h.astype(jnp.float32).mean(axis=1) for h in hidden], axis=1)
    return means, (hidden[first].astype(jnp.float32) if first < len(hidden) - 1 else None)


def clip_features(model, files: list[Path], first: int, batch_size: int, progress: Optional[Progress]):
    """Reads and encodes every clip once. Returns ``(means, sequences or None, kept, skipped)``."""
    encoder = AudioEncoder(model.dims, jnp.float32)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), model.params["encoder"])
    means, seqs, kept, skipped, mels = [], [], [], [], []

    def flush():
        size = next((b for b in BATCH_BUCKETS if b >= len(mels)), len(mels))  # few shapes, little padding
        batch = np.zeros((size, *mels[0].shape), np.float32)
        batch[: len(mels)] = np.stack(mels)
        m, s = encoder_features(encoder, params, batch, first)
        means.append(np.asarray(m)[: len(mels)])
        if s is not None:
            seqs.append(np.asarray(s)[: len(mels)])
        mels.clear()

    for i, path in enumerate(files):
        try:
            audio = load_audio(path)
        except Exception as err:  # noqa: BLE001 - a bad clip is reported, not fatal
            skipped.append((str(path), str(err)))
        else:
            mels.append(log_mel_spectrogram(pad_or_trim(audio, N_SAMPLES), model.n_mels))  # HF's features
            kept.append(i)
            if len(mels) == batch_size:
                flush()
        if progress is not None:
            progress("features", i + 1, len(files), {})
    if mels:
        flush()
    if not kept:
        raise UsageError(None, "no readable audio clips in the data directory")
    return np.concatenate(means), (np.concatenate(seqs) if seqs else None), kept, skipped


# ---------------------------------------------------------------- the head


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """Per-layer centring and scaling of the pooled features, used while training only.

    Clips are short next to the 30 s window, so the pooled features of different clips differ by
    ~1% of their size; training on ``(means - mean[l]) / scale[l]`` makes that difference
    visible to Adam. :func:`fold` then moves it into the projector and the layer weights, so
    the saved head takes the raw features, exactly as HF's does.
    """

    mean: np.ndarray  # [n_audio_layer + 1, state]
    scale: np.ndarray  # [n_audio_layer + 1]

    @classmethod
    def fit(cls, means: np.ndarray) -> "Standardizer":
        """From training features ``[clips, layers, state]``: per-layer mean and RMS spread."""
        spread = np.sqrt(means.var(axis=0).mean(axis=-1))  # [layers]
        return cls(means.mean(axis=0), spread + 1e-3 * spread.max() + 1e-12)

    @classmethod
    def identity(cls, layers: int, state: int) -> "Standardizer":
        return cls(np.zeros((layers, state), np.float32), np.ones((layers,), np.float32))


def fold(params: dict, std: Standardizer, weighted_layer_sum: bool) -> dict:
    """Head parameters on standardized features → the same function of the raw features.

    With weights ``w'`` on ``(m_l - mu_l) / s_l``: ``v_l = w'_l / s_l``, ``c = sum(v)``,
    ``w = v / c``; then ``sum_l w'_l (m_l - mu_l) / s_l = c * (sum_l w_l m_l - sum_l w_l mu_l)``,
    so the projector's kernel is scaled by ``c`` and its bias absorbs the offset.
    """
    layers = std.scale.shape[0]
    if weighted_layer_sum:
        w_std = np.asarray(jax.nn.softmax(jnp.asarray(params["layer_weights"], jnp.float32)), np.float64)
    else:
        w_std = np.eye(layers)[-1]  # only the last hidden state
    v = w_std / std.scale
    c, w = v.sum(), v / v.sum()
    kernel = np.asarray(params["projector"]["kernel"], np.float64)  # [state, proj]
    offset = (w @ std.mean.astype(np.float64)) @ kernel  # [proj]
    out = dict(params)
    out["projector"] = {"kernel": (c * kernel).astype(np.float32),
                        "bias": (np.asarray(params["projector"]["bias"], np.float64) - c * offset).astype(np.float32)}
    if weighted_layer_sum:
        out["layer_weights"] = np.log(np.maximum(w, 1e-30)).astype(np.float32)  # softmax(log w) = w
    return out


def _split(params: dict, first: int, n_layer: int) -> tuple[dict, dict]:
    """(trainable, frozen): the head, plus blocks ``first..`` and ``ln_post`` when ``first < n_layer``."""
    trainable = {k: v for k, v in params.items() if k != "encoder"}
    encoder = dict(params["encoder"])
    if first < n_layer:
        top = [f"blocks_{i}" for i in range(first, n_layer)] + ["ln_post"]
        trainable["encoder"] = {k: encoder.pop(k) for k in top}
    return trainable, {"encoder": encoder}


def _merge(trainable: dict, frozen: dict) -> dict:
    merged = {**frozen, **{k: v for k, v in trainable.items() if k != "encoder"}}
    merged["encoder"] = {**frozen["encoder"], **trainable.get("encoder", {})}
    return merged


@functools.partial(jax.jit, static_argnames=("module", "first"))
def pooled_logits(module: WhisperClassifier, first: int, trainable, frozen, mean, scale, means, seq):
    """Logits from cached features: ``means`` ``[batch, layers, state]`` (standardized with
    ``mean``/``scale``) and, when blocks ``first..`` train, their input ``seq``."""
    params = _merge(trainable, frozen)
    if seq is not None:  # the trainable blocks' hidden states, from the cached input
        top = module.apply({"params": params}, seq, first, method=WhisperClassifier.encode_from)
        means = jnp.concatenate([means[:, : first + 1], top], axis=1)
    z = (means - mean) / scale[:, None]  # [batch, layers, state]
    return module.apply({"params": params}, z, method=WhisperClassifier.from_pooled)


def _param_labels(trainable: dict) -> dict:
    return {k: jax.tree_util.tree_map(lambda _: "encoder" if k == "encoder" else "head", v) for k, v in trainable.items()}


def optimizer(lr: float, encoder_lr: float) -> optax.GradientTransformation:
    """Adam: the head at ``lr``, trainable encoder blocks at their own (smaller) ``encoder_lr``."""
    return optax.multi_transform({"head": optax.adam(lr), "encoder": optax.adam(encoder_lr)}, _param_labels)


@functools.partial(jax.jit, static_argnames=("module", "first", "lr", "encoder_lr"))
def train_step(module, first: int, lr: float, encoder_lr: float, trainable, opt_state, frozen, norm, means, seq, y):
    """One Adam step on the mean softmax cross-entropy of a batch; returns ``(trainable, opt_state, loss)``."""
    def loss_fn(t):
        logits = pooled_logits(module, first, t, frozen, *norm, means, seq)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = optimizer(lr, encoder_lr).update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def fit_head(
    module: WhisperClassifier, params: dict, first: int, std: Standardizer, means: np.ndarray,
    seqs: Optional[np.ndarray], labels: np.ndarray, *, epochs: int, lr: float, encoder_lr: float,
    batch_size: int, seed: int, progress: Optional[Progress] = None,
    evaluate: Optional[Callable[[dict], dict]] = None,
) -> tuple[dict, float]:
    """Adam on the softmax cross-entropy over standardized features; deterministic given
    ``seed``. Returns ``(params on the standardized features, last epoch's loss)``."""
    trainable, frozen = _split(params, first, module.dims.n_audio_layer)
    norm = (jnp.asarray(std.mean, jnp.float32), jnp.asarray(std.scale, jnp.float32))
    opt_state = optimizer(lr, encoder_lr).init(trainable)
    rng = np.random.default_rng(seed)
    n, batch_size, loss = len(labels), max(1, min(batch_size, len(labels))), float("nan")
    steps = -(-n // batch_size)
    for epoch in range(epochs):
        # Every clip once per epoch; the last batch wraps around so that every batch has one shape.
        order = np.resize(rng.permutation(n), steps * batch_size).reshape(steps, batch_size)
        losses = []
        for b in order:
            seq = None if seqs is None else seqs[b]
            trainable, opt_state, batch_loss = train_step(
                module, first, float(lr), float(encoder_lr), trainable, opt_state, frozen, norm, means[b], seq, labels[b]
            )
            losses.append(batch_loss)
        loss = float(np.mean(jax.device_get(losses)))
        if progress is not None:
            metrics = {"loss": loss}
            if evaluate is not None and (epoch == epochs - 1 or (epoch + 1) % max(1, epochs // 10) == 0):
                metrics.update(evaluate(_merge(trainable, frozen)))
            progress("train", epoch + 1, epochs, metrics)
    return _merge(trainable, frozen), loss


def predict_pooled(module, params, first: int, std: Standardizer, means, seqs, batch: int = 16) -> np.ndarray:
    """Probabilities ``[n, n_labels]`` from cached features (batches padded to one shape)."""
    trainable, frozen = _split(params, first, module.dims.n_audio_layer)
    norm = (jnp.asarray(std.mean, jnp.float32), jnp.asarray(std.scale, jnp.float32))
    batch, out = max(1, min(batch, len(means))), []
    for i in range(0, len(means), batch):
        idx = np.resize(np.arange(i, min(i + batch, len(means))), batch)  # pad by repeating rows
        seq = None if seqs is None else seqs[idx]
        logits = pooled_logits(module, first, trainable, frozen, *norm, means[idx], seq)
        out.append(np.asarray(jax.nn.softmax(logits))[: min(batch, len(means) - i)])
    return np.concatenate(out) if out else np.zeros((0, module.num_labels), np.float32)


# ---------------------------------------------------------------- saving


def save_classifier(out_dir: Path, model, labels, params: dict, proj_size: int, weighted_layer_sum: bool) -> None:
    """Writes an HF ``WhisperForAudioClassification`` directory that :func:`load_classifier` (and
    HF transformers) load: ``config.json``, ``model.safetensors`` (float32), tokenizer files."""
    from safetensors.numpy import save_file

    from whisperjax_cli.weights import state_from_params

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    state = state_from_params(params, model.dims, table=head_table(model.dims, weighted_layer_sum))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {
        **{k: v for k, v in (model.config or {}).items() if k not in ("id2label", "label2id")},
        **model.dims.to_hf_config(),
        "architectures": ["WhisperForAudioClassification"],
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "classifier_proj_size": proj_size,
        "use_weighted_layer_sum": weighted_layer_sum,
        "activation_function": "gelu",
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if (Path(model.path) / name).is_file():
            shutil.copyfile(Path(model.path) / name, out_dir / name)
    if not (out_dir / "preprocessor_config.json").exists():
        (out_dir / "preprocessor_config.json").write_text(json.dumps({
            "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": model.dims.n_mels,
            "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
            "n_samples": N_SAMPLES, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
            "return_attention_mask": False,
        }, indent=2) + "\n")  # fmt: skip
    from whisperjax_cli.catalog import normal_permissions

    normal_permissions(out_dir)


# ---------------------------------------------------------------- the whole run


def train_classifier(
    data_dir, model: Any = "base", out_dir=None, *, epochs: int = 100, lr: float = 1e-3, val_fraction: float = 0.2,
    seed: int = 0, train_top_layers: int = 0, encoder_lr: float = 1e-5, batch_size: int = 16,
    proj_size: int = HF_WHISPER_DEFAULTS["classifier_proj_size"], weighted_layer_sum: bool = True,
    progress: Optional[Progress] = None,
) -> TrainReport:
    """Trains a classification head on ``data_dir`` (one sub-folder of clips per label) and saves it.

    Args:
      data_dir: the dataset; each clip's first 30 s are used.
      model: a Whisper name or path, or a loaded :class:`~whisperjax_cli.loading.WhisperModel`.
      out_dir: where the HF-layout checkpoint goes (``wjx classify --model OUT_DIR`` loads it).
      epochs, lr, batch_size, seed: Adam on the cross-entropy, shuffled with ``seed``.
      val_fraction: share of each label's clips held out to report accuracy on.
      train_top_layers: also train this many top encoder blocks (and the final layer norm), at
        ``encoder_lr``; 0 is a linear probe on the frozen encoder. Above 0, each clip's input to
        those blocks is cached whole (``n_audio_ctx * state`` floats) and every step runs them:
        meant for an accelerator.
      proj_size, weighted_layer_sum: HF's ``classifier_proj_size`` and ``use_weighted_layer_sum``.
      progress: called as ``progress(stage, done, total, metrics)``, stage "features" or "train".
    Raises:
      UsageError: a bad dataset or option. ModelError: the model cannot be loaded.
    """
    from whisperjax_cli.loading import load_model

    if out_dir is None:
        raise UsageError(None, "an output directory is required (--out DIR)")
    if isinstance(model, (str, Path)):
        model = load_model(str(model), dtype="float32")  # saved weights stay full precision
    n_layer = model.dims.n_audio_layer
    if not 0 <= train_top_layers <= n_layer:
        raise UsageError(None, f"--train-top-layers must be between 0 and {n_layer}, not {train_top_layers}")
    if not 0 <= val_fraction < 1:
        raise UsageError(None, f"--val-fraction must be in [0, 1), not {val_fraction}")
    labels, items = scan_dataset(data_dir)
    first = n_layer - train_top_layers
    means, seqs, kept, skipped = clip_features(model, [f for f, _ in items], first, 8, progress)
    files = [items[i][0] for i in kept]
    y = np.array([items[i][1] for i in kept], np.int32)
    for i, label in enumerate(labels):
        if not np.any(y == i):
            raise UsageError(Path(data_dir) / label, "no readable audio clips for this label")
    train, val = stratified_split(y, val_fraction, seed)

    module = WhisperClassifier(model.dims, len(labels), proj_size, weighted_layer_sum)
    head = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, n_layer + 1, model.dims.n_audio_state)),
                       method=WhisperClassifier.from_pooled)["params"]
    encoder = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), model.params["encoder"])
    std = Standardizer.fit(means[train])
    raw = Standardizer.identity(*means.shape[1:])
    subset = lambda idx: (means[idx], None if seqs is None else seqs[idx])  # noqa: E731

    def evaluate(p: dict) -> dict:
        if not len(val):
            return {}
        return {"val_accuracy": float(np.mean(predict_pooled(module, p, first, std, *subset(val)).argmax(-1) == y[val]))}

    params, loss = fit_head(
        module, {**head, "encoder": encoder}, first, std, *subset(train), y[train], epochs=epochs, lr=lr,
        encoder_lr=encoder_lr, batch_size=batch_size, seed=seed, progress=progress, evaluate=evaluate,
    )
    params = fold(params, std, weighted_layer_sum)  # from here on: HF's head on the raw features
    save_classifier(out_dir, model, labels, params, proj_size, weighted_layer_sum)
    train_acc = float(np.mean(predict_pooled(module, params, first, raw, *subset(train)).argmax(-1) == y[train]))
    val_probs = predict_pooled(module, params, first, raw, *subset(val))
    predicted = val_probs.argmax(-1)
    return TrainReport(
        out_dir=Path(out_dir), labels=labels, train_size=len(train), val_size=len(val),
        train_accuracy=train_acc, val_accuracy=float(np.mean(predicted == y[val])) if len(val) else None,
        train_loss=loss, epochs=epochs, skipped=skipped,
        val_predictions=[(str(files[i]), labels[y[i]], labels[p]) for i, p in zip(val, predicted)],
        val_probs=val_probs,
    )
