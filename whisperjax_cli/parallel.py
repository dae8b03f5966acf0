"""Data parallelism over one machine's devices: a mesh, the batch sharded, the parameters replicated.

A model whose parameters live on a mesh (:func:`place_model`) is decoded on all of the mesh's
devices at once: :class:`~whisperjax_cli.window_decoder.WindowDecoder` reads the mesh off the
parameters (:func:`placement_of`), pads each batch to a multiple of the device count and
spreads its leading axis (mel windows, encoder output, prompts, pads, holds) over the mesh's
``batch`` axis. The scheduler is unchanged: a batch of ``per-device rows x devices``
(:func:`total_batch_size`) keeps every device busy.

How the programs run over the mesh:

* **encoding, greedy decoding and beam search**: ``jax.shard_map`` of the one-device program.
  Each device encodes and decodes its own rows and nothing crosses devices: a device's decode
  loop, and each of its shrinking phases (``decoding.decode_phases``), ends when its own rows
  are done. Handed to XLA's partitioner instead, the encoder ran whole on every device (its
  chunk loop indexes the batch), and the phases after the first ran replicated.
* **sampling** (temperature > 0): the jitted program on batch-sharded inputs (XLA's SPMD
  partitioner). Its random numbers are drawn for the whole batch, so the samples are one
  device's; under ``shard_map`` every device would draw the same numbers for its own rows.
* **parameters sharded** (``model_axis > 1``, for a model too big for one device): a second
  mesh axis ``model`` splits each large matrix; the programs run on the partitioner, which
  adds the collectives. Results then differ from one device's by rounding (sums split).

A row's arithmetic does not depend on the other rows of its batch (what already lets the
scheduler refill rows and pad batches), so with replicated parameters the results are the
one-device results, bit for bit (tests/test_parallel.py). Shardings are fixed per mesh, so
each program compiles once per batch and prompt bucket, as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from whisperjax_cli.decoding import DecodeInputs, DecodeOutput, LoopConfig, encode

BATCH, MODEL = "batch", "model"  # mesh axes: rows of a batch; slices of a parameter
SHARD_MIN_BYTES = 1 << 20  # parameters smaller than this stay whole on every device (biases, norms)
MAX_PER_DEVICE = 64  # the largest batch bucket: rows per device past it decode no faster
CPU_PER_DEVICE = 8  # a CPU is bound by its cores, not its memory: TranscribeOptions' default
MEMORY_SHARE = 0.5  # of a device's free memory given to a batch; XLA's temporaries take the rest


def make_mesh(devices: Sequence, model_axis: int = 1) -> Mesh:
    """A ``(batch, model)`` mesh over ``devices``: ``len(devices) // model_axis`` groups of
    ``model_axis`` devices, each group holding the parameters once between them."""
    if model_axis < 1 or len(devices) % model_axis:
        raise ValueError(f"{len(devices)} devices do not split into groups of {model_axis}")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_axis, model_axis)
    return Mesh(grid, (BATCH, MODEL))


def param_spec(shape: tuple[int, ...], itemsize: int, model_size: int) -> PartitionSpec:
    """Where one parameter lives: split over ``model`` along its largest axis that divides
    evenly, when it is at least :data:`SHARD_MIN_BYTES`; else whole on every device."""
    if model_size == 1 or int(np.prod(shape, dtype=np.int64)) * itemsize < SHARD_MIN_BYTES:
        return PartitionSpec()
    axes = sorted((n, -i) for i, n in enumerate(shape) if n % model_size == 0)
    if not axes:
        return PartitionSpec()
    axis = -axes[-1][1]
    return PartitionSpec(*([None] * axis), MODEL)


def place_params(params: Any, mesh: Mesh) -> Any:
    """``params`` on ``mesh``: replicated, or large ones split over ``model`` (:func:`param_spec`)."""
    size = mesh.shape[MODEL]
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, param_spec(p.shape, p.dtype.itemsize, size)), params)
    return jax.device_put(params, shardings)


def place_model(model, devices: Sequence, model_axis: int = 1):
    """``model`` with its parameters on a mesh over ``devices`` (a copy; ``model`` is kept).

    With one device the model is returned as it is: decoding then takes the one-device path
    unchanged. ``model_axis`` > 1 splits large parameters over that many devices each.
    """
    if len(devices) == 1:
        return model
    return dataclasses.replace(model, params=place_params(model.params, make_mesh(devices, model_axis)))


def placement_of(params: Any) -> Optional["DataParallel"]:
    """The data-parallel placement of a model whose parameters live on a mesh of several
    devices (:func:`place_model`); None for parameters on one device."""
    leaves = jax.tree.leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sharding, NamedSharding) or BATCH not in sharding.mesh.axis_names:
        return None
    return DataParallel(sharding.mesh) if sharding.mesh.size > 1 else None


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Runs the encode and decode programs with their batch spread over ``mesh``'s ``batch`` axis."""

    mesh: Mesh

    @property
    def size(self) -> int:
        """Devices the batch is spread over: batches are padded to a multiple of it."""
        return self.mesh.shape[BATCH]

    @property
    def params_split(self) -> bool:
        return self.mesh.shape.get(MODEL, 1) > 1

    def rows(self, x) -> jax.Array:
        """``x`` with its leading axis spread over the devices (a no-op when it already is)."""
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(BATCH)))

    def whole(self, x) -> jax.Array:
        """``x`` whole on every device."""
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    def encode(self, module, params, mel: np.ndarray, rows: np.ndarray) -> jax.Array:
        """:func:`~whisperjax_cli.decoding.encode` of ``mel`` ``[batch, frames, n_mels]`` (batch
        a multiple of :attr:`size`), windows ``[0, rows)`` encoded; output spread by rows."""
        mel, rows = self.rows(mel), self.whole(rows)
        if self.params_split:
            return encode(module, params, mel, rows)
        return _encode_spread(module, params, mel, rows, self.mesh)

    def decode(self, program: Callable, module, params, inputs: DecodeInputs, config: LoopConfig) -> DecodeOutput:
        """``program(module, params, inputs, config)`` (``decode_window`` or ``beam_search_window``)
        with the per-row inputs spread over the devices and the rest whole on each."""
        per_row = {"audio": inputs.audio, "prompt": inputs.prompt, "pad": inputs.pad, "hold": inputs.hold}
        inputs = inputs.replace(
            **{k: None if v is None else self.rows(v) for k, v in per_row.items()},
            **{k: self.whole(getattr(inputs, k)) for k in ("sot_index", "suppress_mask", "begin_mask",
                                                          "temperature", "key")})
        if config.sample or self.params_split:
            return program(module, params, inputs, config)
        return _decode_spread(program, module, params, inputs, config, self.mesh)


def _input_specs(inputs: DecodeInputs) -> DecodeInputs:
    """The shard_map specs of a :class:`DecodeInputs`: rows split, the rest whole."""
    rows, whole = PartitionSpec(BATCH), PartitionSpec()
    return DecodeInputs(rows, rows, rows, whole, whole, whole, whole, whole, None if inputs.hold is None else rows)


@functools.partial(jax.jit, static_argnames=("module", "mesh"))
def _encode_spread(module, params, mel: jax.Array, rows: jax.Array, mesh: Mesh) -> jax.Array:
    """Each device encodes its own rows with the one-device program (windows past ``rows``,
    counted over the whole batch, are zeros as there)."""

    def local(params, mel, rows):
        n = mel.shape[0]  # rows on this device
        mine = jnp.clip(rows - jax.lax.axis_index(BATCH) * n, 0, n)
        return encode(module, params, mel, mine)

    spread = PartitionSpec(BATCH)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), spread, PartitionSpec()),
                         out_specs=spread, check_vma=False)(params, mel, rows)


@functools.partial(jax.jit, static_argnames=("program", "module", "config", "mesh"))
def _decode_spread(program: Callable, module, params, inputs: DecodeInputs, config: LoopConfig,
                 mesh: Mesh) -> DecodeOutput:
    """Each device decodes its own rows with the one-device program; every output is per row.

    ``check_vma`` is off: the loops' carries start from constants (the same on every device)
    and become per-row values, which the check would have every program annotate.
    """

    def local(params, inputs):
        return program(module, params, inputs, config)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), _input_specs(inputs)),
                         out_specs=PartitionSpec(BATCH), check_vma=False)(params, inputs)


# ---------------------------------------------------------------- batch sizes


def window_bytes(dims, itemsize: int, rows_per_window: int = 1, sample_len: int = 224, prompt_len: int = 232) -> int:
    """Device memory one 30 s window holds while it decodes: its audio keys/values for
    every decoder layer, and per decoder row (beams or best-of samples share the window's
    audio) the self-attention buffers, half again for the copy a shrinking phase gathers,
    and a few float32 rows of logits for the filters."""
    cross = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * itemsize
    self_attention = 2 * dims.n_text_layer * (prompt_len + sample_len) * dims.n_text_state * itemsize * 3 // 2
    logits = 4 * dims.n_vocab * 4
    audio = dims.n_audio_ctx * dims.n_audio_state * itemsize + 3000 * dims.n_mels * 4  # encoder output, mel
    return cross + audio + rows_per_window * (self_attention + logits)


def default_batch_size(device, dims, itemsize: int = 2, rows_per_window: int = 1) -> int:
    """Windows per batch on ``device``: as many as half its free memory holds (:data:`MEMORY_SHARE`,
    :func:`window_bytes`), a power of two up to :data:`MAX_PER_DEVICE`.

    Read after the model is loaded, so the free memory excludes its parameters. Devices that
    report no memory limit (CPUs) get :data:`CPU_PER_DEVICE`: there the cores bound the speed.
    """
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or not stats.get("bytes_limit"):
        return CPU_PER_DEVICE
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    fits = int(free * MEMORY_SHARE) // window_bytes(dims, itemsize, rows_per_window)
    size = 1
    while size * 2 <= min(fits, MAX_PER_DEVICE):
        size *= 2
    return size


def total_batch_size(per_device: int, devices: int) -> int:
    """Rows decoded together: ``per_device`` on each of ``devices``."""
    return per_device * devices
