"""Silero VAD v6 (16 kHz) in Flax Linen: STFT front end, convolutional encoder, LSTM, head.

Silero VAD (MIT, Copyright (c) Silero Team) gives one speech probability per 512-sample
chunk (32 ms at 16 kHz). Each chunk is read with the 64 samples before it (its *context*), so
the model sees 576 samples: an STFT (256-sample Hann frames, hop 128, as a convolution with a
fixed basis), its magnitude, four 1-D convolutions with ReLU, an LSTM cell whose state ``(h, c)``
carries from chunk to chunk, and a 1x1 convolution with a sigmoid.

Everything before the LSTM depends on one chunk only, so it is computed for every chunk of a
block at once (a few large matmuls); only the LSTM's recurrent product runs in a
``lax.scan``. The graph this follows is faster-whisper's ``assets/silero_vad_v6.onnx`` (the
16 kHz model, no 8 kHz branch): ``Pad(reflect, 128 | 128)`` -> ``Conv(stride 128)`` -> drop
the first frame -> ``sqrt(re^2 + im^2)`` -> 4 x (``Conv(k=3, pad 1)`` + ReLU) with strides
1, 2, 2, 1 -> ``LSTM`` (ONNX gate order i, o, f, c) -> ReLU -> ``Conv(1x1)`` -> sigmoid.
Weights and the geometry (chunk, context, sizes): vad_weights.py; driving it over files, and the
stored program that runs a block: vad.py, which imports this module only to trace it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from whisperjax_cli.vad_weights import CHUNK, CONTEXT, ENCODER_LAYERS, FILTER, HIDDEN, HOP, N_BINS

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products on every device (TPUs default to bf16 passes)


def _matmul(x: Array, w: Array) -> Array:
    return jnp.matmul(x, w, precision=_HIGHEST)


class StftMagnitude(nn.Module):
    """|STFT| of a 576-sample chunk: 4 frames x 129 bins, one matmul with Silero's basis.

    The ONNX graph pads 128 samples each side by reflection, convolves with stride 128 and
    drops the first frame, so the frames kept start at 0, 128, 256 and 384 of the chunk and
    only the last one reads padding: 64 reflected samples, ``x[574], x[573], ..., x[511]``.
    """

    @nn.compact
    def __call__(self, chunks: Array) -> Array:
        basis = self.param("basis", nn.initializers.zeros, (FILTER, 2 * N_BINS))  # [256, re 129 | im 129]
        width = chunks.shape[-1]
        tail = chunks[..., width - 2: width - 2 - CONTEXT: -1]  # right reflection, edge sample excluded
        extended = jnp.concatenate([chunks, tail], axis=-1)  # [..., 640]
        blocks = extended.reshape(*extended.shape[:-1], -1, HOP)  # [..., 5, 128]
        frames = jnp.concatenate([blocks[..., :-1, :], blocks[..., 1:, :]], axis=-1)  # [..., 4, 256]
        spectrum = _matmul(frames, basis)  # [..., 4, 258]
        return jnp.sqrt(spectrum[..., :N_BINS] ** 2 + spectrum[..., N_BINS:] ** 2)  # [..., 4, 129]


class Conv1d(nn.Module):
    """Kernel-3, padding-1 convolution over a short time axis, as one matmul (im2col).

    The time axes here are 4, 2 and 1 steps long, so unfolding the three taps into the
    channel axis turns each layer into a single GEMM over all chunks of a block.
    """

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [..., time, channels]
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.zeros, (3, channels, self.features))  # [width, in, out]
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        steps = (x.shape[-2] - 1) // self.stride + 1
        padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (0, 0)])  # [..., time + 2, channels]
        span = self.stride * (steps - 1) + 1
        taps = [padded[..., k: k + span: self.stride, :] for k in range(3)]
        columns = jnp.concatenate(taps, axis=-1)  # [..., steps, 3 * channels]
        return _matmul(columns, kernel.reshape(3 * channels, self.features)) + bias


class Lstm(nn.Module):
    """An LSTM cell run over the chunk axis; gate order i, f, g, o (PyTorch's).

    The input product ``x @ W_i + b`` is one matmul over every chunk; the scan carries only
    the recurrent product ``h @ W_h`` and the gate arithmetic.
    """

    @nn.compact
    def __call__(self, x: Array, state: tuple[Array, Array]) -> tuple[Array, tuple[Array, Array]]:
        input_kernel = self.param("input_kernel", nn.initializers.zeros, (HIDDEN, 4 * HIDDEN))
        recurrent_kernel = self.param("recurrent_kernel", nn.initializers.zeros, (HIDDEN, 4 * HIDDEN))
        bias = self.param("bias", nn.initializers.zeros, (4 * HIDDEN,))  # b_ih + b_hh
        gates_in = _matmul(x, input_kernel) + bias  # [batch, chunks, 512]

        def step(carry, gates_x):
            h, c = carry
            gates = gates_x + _matmul(h, recurrent_kernel)  # [batch, 512]
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        state, hs = jax.lax.scan(step, state, jnp.swapaxes(gates_in, 0, 1))  # hs: [chunks, batch, 128]
        return jnp.swapaxes(hs, 0, 1), state  # [batch, chunks, 128]


class SileroVad(nn.Module):
    """Speech probabilities of consecutive chunks of a batch of streams, the LSTM state carried."""

    @nn.compact
    def __call__(self, stream: Array, state: tuple[Array, Array]) -> tuple[Array, tuple[Array, Array]]:
        """Runs the model over ``chunks`` consecutive chunks of each row.

        Args:
            stream: ``[batch, chunks * 512 + 64]`` samples: the 64 before the first chunk
                (zeros at the start of a file), then the chunks.
            state: ``(h, c)``, each ``[batch, 128]``: zeros at the start of a file, else the
                state returned for the block before.

        Returns:
            ``[batch, chunks]`` speech probabilities, and the state after the last chunk.
        """
        batch, chunks = stream.shape[0], (stream.shape[1] - CONTEXT) // CHUNK
        body = stream[:, : chunks * CHUNK].reshape(batch, chunks, CHUNK)  # [batch, chunks, 512]
        ahead = jnp.pad(stream[:, CHUNK:], [(0, 0), (0, CHUNK - CONTEXT)])  # [batch, chunks * 512]
        ahead = ahead.reshape(batch, chunks, CHUNK)[..., :CONTEXT]  # [batch, chunks, 64]
        windows = jnp.concatenate([body, ahead], axis=-1)  # [batch, chunks, 576]: context + chunk
        x = StftMagnitude(name="stft")(windows)  # [batch, chunks, 4, 129]
        for n, (_, features, stride) in enumerate(ENCODER_LAYERS):
            x = nn.relu(Conv1d(features, stride, name=f"conv{n}")(x))
        x = x[..., 0, :]  # [batch, chunks, 128]: the time axis is down to one step
        hs, state = Lstm(name="lstm")(x, state)
        logits = nn.Dense(1, name="head", precision=_HIGHEST)(nn.relu(hs))  # [batch, chunks, 1]
        return jax.nn.sigmoid(logits[..., 0]), state

