"""Frozen model dimensions, with OpenAI's field names."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Bounds on every size, far past the Whisper family (large-v3: 128 mels, 1280 wide, 32 layers,
# 20 heads, 51866 tokens, 1500/448 positions), checked before anything is allocated: a
# config.json that claims 10^6 layers is refused at once instead of filling memory.
LIMITS = {
    "n_mels": 512, "n_audio_ctx": 4096, "n_audio_state": 8192, "n_audio_head": 256, "n_audio_layer": 256,
    "n_vocab": 1 << 18, "n_text_ctx": 8192, "n_text_state": 8192, "n_text_head": 256, "n_text_layer": 256,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelDimensions:
    """Sizes of a Whisper model. Hashable, so it can be a static jit argument.

    Raises ValueError on construction when a size is not a whole number from 1 to its bound in
    :data:`LIMITS`, or a width does not split into its heads.
    """

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMITS[field.name]:
                raise ValueError(f"{field.name} must be a whole number from 1 to {LIMITS[field.name]}, not {value!r}")
        for state, head in (("n_audio_state", "n_audio_head"), ("n_text_state", "n_text_head")):
            if getattr(self, state) % getattr(self, head):
                raise ValueError(f"{state} ({getattr(self, state)}) is not a multiple of {head} ({getattr(self, head)})")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelDimensions":
        """Builds dimensions from a Hugging Face ``WhisperConfig`` dictionary.

        Raises:
          ValueError: ``config`` is not a mapping, lacks a field, or a size is out of bounds.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a JSON object, not {type(config).__name__}")
        for hf, ours in _HF_FIELDS.items():  # checked under the file's own names
            if hf not in config:
                raise ValueError(f"missing field {hf!r}")
            value = config[hf]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMITS[ours]:
                raise ValueError(f"{hf} must be a whole number from 1 to {LIMITS[ours]}, not {value!r}")
        return cls(
            n_mels=config["num_mel_bins"],
            n_audio_ctx=config["max_source_positions"],
            n_audio_state=config["d_model"],
            n_audio_head=config["encoder_attention_heads"],
            n_audio_layer=config["encoder_layers"],
            n_vocab=config["vocab_size"],
            n_text_ctx=config["max_target_positions"],
            n_text_state=config["d_model"],
            n_text_head=config["decoder_attention_heads"],
            n_text_layer=config["decoder_layers"],
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_hf_config` (the fields HF needs for these sizes)."""
        assert self.n_audio_state == self.n_text_state, "HF Whisper has one d_model"
        return {
            "model_type": "whisper",
            "num_mel_bins": self.n_mels,
            "max_source_positions": self.n_audio_ctx,
            "d_model": self.n_audio_state,
            "encoder_attention_heads": self.n_audio_head,
            "encoder_layers": self.n_audio_layer,
            "encoder_ffn_dim": 4 * self.n_audio_state,
            "vocab_size": self.n_vocab,
            "max_target_positions": self.n_text_ctx,
            "decoder_attention_heads": self.n_text_head,
            "decoder_layers": self.n_text_layer,
            "decoder_ffn_dim": 4 * self.n_text_state,
        }

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        # 51865 tokens: 99 languages; large-v3's 51866: 100 (Cantonese added).
        return self.n_vocab - 51765 - int(self.is_multilingual)


_HF_FIELDS = {  # HF WhisperConfig field -> ours
    "num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx", "d_model": "n_audio_state",
    "encoder_attention_heads": "n_audio_head", "encoder_layers": "n_audio_layer", "vocab_size": "n_vocab",
    "max_target_positions": "n_text_ctx", "decoder_attention_heads": "n_text_head", "decoder_layers": "n_text_layer",
}  # fmt: skip


def _dims(n_mels, n_vocab, state, heads, layers) -> ModelDimensions:
    return ModelDimensions(n_mels, 1500, state, heads, layers, n_vocab, 448, state, heads, layers)


# The official checkpoints, tiny to large-v3 (turbo keeps large-v3's encoder, 4 decoder layers).
OFFICIAL_DIMS: dict[str, ModelDimensions] = {
    "tiny.en": _dims(80, 51864, 384, 6, 4),
    "tiny": _dims(80, 51865, 384, 6, 4),
    "base.en": _dims(80, 51864, 512, 8, 6),
    "base": _dims(80, 51865, 512, 8, 6),
    "small.en": _dims(80, 51864, 768, 12, 12),
    "small": _dims(80, 51865, 768, 12, 12),
    "medium.en": _dims(80, 51864, 1024, 16, 24),
    "medium": _dims(80, 51865, 1024, 16, 24),
    "large-v2": _dims(80, 51865, 1280, 20, 32),
    "large-v3": _dims(128, 51866, 1280, 20, 32),
    "large-v3-turbo": dataclasses.replace(_dims(128, 51866, 1280, 20, 32), n_text_layer=4),
}
