"""Silero VAD v6 weights: strict loading from safetensors, and conversion from the ONNX graph.

The package ships ``assets/silero_vad_v6.safetensors`` (MIT, Copyright (c) Silero Team; see
``assets/SILERO_VAD_LICENSE``), made by :func:`convert_onnx` from faster-whisper's
``assets/silero_vad_v6.onnx``. Tensors are stored under their canonical (PyTorch) names and
layouts; the table below maps each of our Flax parameters to them and the layout change, and
loading asserts that every parameter is filled, every shape matches and every tensor is used.
Pickles (Silero's TorchScript ``.jit`` file) are never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from whisperjax_cli.errors import ModelError

WEIGHTS_PATH = Path(__file__).parent / "assets" / "silero_vad_v6.safetensors"

# The network's geometry (vad_model.py builds it from these; here they need neither JAX nor Flax).
SAMPLE_RATE = 16000
CHUNK = 512  # samples per speech probability at 16 kHz
CONTEXT = 64  # samples of the previous chunk read with each chunk
HIDDEN = 128  # LSTM state size (h and c)
FILTER, HOP = 256, 128  # STFT frame length and hop
N_BINS = FILTER // 2 + 1  # 129 frequency bins
# Encoder convolutions: (input channels, output channels, stride); kernel 3, padding 1.
ENCODER_LAYERS = ((N_BINS, 128, 1), (128, 64, 2), (64, 64, 2), (64, 128, 1))

# Layout changes from the canonical tensor to ours.
_LAYOUTS = {
    "copy": lambda w: w,
    "conv": lambda w: w.transpose(2, 1, 0),  # [out, in, width] -> [width, in, out]
    "basis": lambda w: w[:, 0, :].T,  # [258, 1, 256] -> [256, 258]
    "linear": lambda w: w.T,  # [out, in] -> [in, out]
    "head": lambda w: w[:, :, 0].T,  # conv 1x1 [1, 128, 1] -> [128, 1]
}
# (our parameter path, canonical name(s), layout); two names are summed.
PARAMETER_TABLE = (
    ("stft/basis", "encoder.feature_extractor.forward_basis_buffer", "basis"),
    *((f"conv{n}/{ours}", f"encoder.conv_layers.{n}.{theirs}", layout)
      for n in range(len(ENCODER_LAYERS))
      for ours, theirs, layout in (("kernel", "weight", "conv"), ("bias", "bias", "copy"))),
    ("lstm/input_kernel", "decoder.rnn.weight_ih", "linear"),
    ("lstm/recurrent_kernel", "decoder.rnn.weight_hh", "linear"),
    ("lstm/bias", ("decoder.rnn.bias_ih", "decoder.rnn.bias_hh"), "copy"),
    ("head/kernel", "decoder.conv1d.weight", "head"),
    ("head/bias", "decoder.conv1d.bias", "copy"),
)
# ONNX stores LSTM gates as i, o, f, c; PyTorch (and our cell) as i, f, g(=c), o.
_ONNX_TO_TORCH_GATES = (0, 2, 3, 1)


def parameter_shapes() -> dict[str, tuple[int, ...]]:
    """Our parameters' shapes by path (``"conv0/kernel"``), from the geometry above: what
    ``SileroVad().init`` makes (a test traces it), without tracing it (nor importing Flax)
    at every load."""
    shapes = {"stft/basis": (FILTER, 2 * N_BINS)}
    for n, (inputs, outputs, _) in enumerate(ENCODER_LAYERS):
        shapes.update({f"conv{n}/kernel": (3, inputs, outputs), f"conv{n}/bias": (outputs,)})
    shapes.update({"lstm/input_kernel": (ENCODER_LAYERS[-1][1], 4 * HIDDEN), "lstm/recurrent_kernel": (HIDDEN, 4 * HIDDEN),
                   "lstm/bias": (4 * HIDDEN,), "head/kernel": (HIDDEN, 1), "head/bias": (1,)})
    return shapes


def params_from_tensors(tensors: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """Our Flax parameters (a nested dict of float32 arrays) from canonical tensors.

    Raises:
        ModelError: A tensor is missing, unused, or has the wrong shape.
    """
    expected = parameter_shapes()
    used: set[str] = set()
    params: dict[str, Any] = {}
    for path, names, layout in PARAMETER_TABLE:
        names = (names,) if isinstance(names, str) else names
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ModelError(source, f"not Silero VAD v6 weights: no tensor {missing[0]}")
        value = _LAYOUTS[layout](sum(np.asarray(tensors[n], np.float32) for n in names))
        if value.shape != expected[path]:
            raise ModelError(source, f"{names[0]} has shape {value.shape} as {path}, expected {expected[path]}")
        used.update(names)
        module, leaf = path.split("/")
        params.setdefault(module, {})[leaf] = np.ascontiguousarray(value)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ModelError(source, f"unexpected tensor {unused[0]} (not Silero VAD v6 weights?)")
    return params


def load_weights(path: str | Path | None = None) -> dict[str, Any]:
    """Reads Silero VAD v6 weights from a safetensors file (no pickle) as our parameters.

    Args:
        path: A safetensors file of canonical tensors (see :func:`convert_onnx`); default the
            copy shipped in the package.

    Raises:
        ModelError: The file is missing, unreadable, or not these weights.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = WEIGHTS_PATH if path is None else Path(path)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ModelError(str(path), f"cannot read VAD weights: {err}") from None
    return params_from_tensors(tensors, str(path))


def _check_graph(graph, source: str) -> Any:
    """Asserts the 16 kHz Silero v6 structure our model implements; returns the LSTM node.

    A different export (the 8/16 kHz Silero ONNX with ``If`` branches, another padding or
    stride) would load weights the model reads differently, so it fails here instead.
    """
    import onnx

    def attrs(node):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    ops = [n.op_type for n in graph.node]
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    pads = [consts.get(n.input[1]) for n in graph.node if n.op_type == "Pad"]
    convs = [attrs(n).get("strides") for n in graph.node if n.op_type == "Conv"]
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    problems = [
        "If" in ops and "has sample-rate branches (not the 16 kHz graph)",
        len(pads) != 1 and f"has {len(pads)} Pad nodes, expected 1",
        pads and list(np.ravel(pads[0])) != [0, 128, 0, 128] and f"pads {pads[0]}, expected reflect 128 | 128",
        convs != [[128], [1], [2], [2], [1], [1]] and f"convolution strides {convs}",
        len(lstms) != 1 and f"has {len(lstms)} LSTM nodes, expected 1",
        lstms and attrs(lstms[0]).get("hidden_size") != 128 and "LSTM hidden size is not 128",
        lstms and attrs(lstms[0]).get("direction", b"forward") != b"forward" and "LSTM is not forward",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ModelError(source, f"not the Silero VAD v6 16 kHz graph: {problems[0]}")
    return lstms[0]


def onnx_tensors(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """Canonical tensors from the ONNX graph's initializers (the graph is read, not run).

    The LSTM's ``W``, ``R`` and ``B`` are turned back into PyTorch's ``weight_ih``,
    ``weight_hh``, ``bias_ih`` and ``bias_hh`` (gates reordered from ONNX's i, o, f, c).
    """
    import onnx  # conversion only: not a runtime dependency

    model = onnx.load(str(onnx_path))
    lstm = _check_graph(model.graph, str(onnx_path))
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}

    def gates(w):  # [4 * 128, ...] in ONNX order -> PyTorch order
        return np.concatenate([np.split(w, 4)[k] for k in _ONNX_TO_TORCH_GATES])

    w, r, b = (init[name][0] for name in lstm.input[1:4])  # [512, 128], [512, 128], [1024]
    tensors = {name: value for name, value in init.items() if name.startswith(("encoder.", "decoder."))}
    tensors.update({
        "decoder.rnn.weight_ih": gates(w), "decoder.rnn.weight_hh": gates(r),
        "decoder.rnn.bias_ih": gates(b[:512]), "decoder.rnn.bias_hh": gates(b[512:]),
    })
    return tensors


def convert_onnx(onnx_path: str | Path, out_path: str | Path) -> None:
    """Writes faster-whisper's ``silero_vad_v6.onnx`` weights as a safetensors file we load.

    Needs the ``onnx`` package (``pip install onnx``), which only conversion uses. The result
    is checked by loading it back into our parameters.

    Raises:
        ModelError: The graph is not the Silero VAD v6 16 kHz graph.
    """
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(onnx_tensors(onnx_path).items())}
    params_from_tensors(tensors, str(onnx_path))
    metadata = {"model": "Silero VAD v6, 16 kHz", "license": "MIT, Copyright (c) Silero Team",
                "converted_from": Path(onnx_path).name}
    save_file(tensors, str(out_path), metadata=metadata)
