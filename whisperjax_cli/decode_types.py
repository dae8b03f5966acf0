"""What a decode program takes and returns: the pytrees at the boundary of the compiled programs.

They live apart from :mod:`whisperjax_cli.decoding` and import only JAX, because a program
kept on disk (:mod:`whisperjax_cli.programs`) names them in its signature: reading one back
must not wait for Flax and the model to be imported.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from whisperjax_cli.programs import exportable

Array = jax.Array


def pytree_dataclass(cls: type) -> type:
    """A frozen dataclass whose fields are all pytree children, with ``replace(**changes)``:
    the decode loops' states (Flax's ``struct.dataclass`` without importing Flax, which a run
    whose programs are all read back from disk never needs)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@exportable
@pytree_dataclass
class DecodeInputs:
    """Everything a decode program takes that is not static: one pytree per call.

    The rows are ``batch = audio * group``: ``group`` consecutive rows per audio (best-of
    samples) share its encoder output and prompt.
    """

    audio: Array  # encoder output [audio, n_audio_ctx, state]
    prompt: Array  # int32 [batch, prompt_len], left-padded, ends with the sot sequence
    pad: Array  # int32 [batch]: left-padding slots per row
    sot_index: Array  # int32 scalar: the slot of start-of-transcript (no-speech probability)
    suppress_mask: Array  # bool [vocab]: never sampled
    begin_mask: Array  # bool [vocab]: not sampled first (blank, end-of-text)
    temperature: Array  # float32 scalar (read when sampling)
    key: Array  # PRNG key (read when sampling)
    hold: Optional[Array] = None  # int32 [batch]: see hold_end_of_text (batched mode), or None


@exportable
@pytree_dataclass
class DecodeOutput:
    tokens: Array  # int32 [batch, sample_len]: sampled tokens, end-of-text then padding
    sum_logprobs: Array  # float32 [batch]
    no_speech_prob: Array  # float32 [batch]
    looped: Optional[Array] = None  # bool [batch], when the loop stops looping rows
    cross: Optional[tuple] = None  # Whisper.cross_kv of the audio rows, with LoopConfig.keep_cross
