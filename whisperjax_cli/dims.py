"""Frozen model dimensions, with OpenAI's field names."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ModelDimensions:
    """Sizes of a Whisper model. Hashable, so it can be a static jit argument."""

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

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelDimensions":
        """Builds dimensions from a Hugging Face ``WhisperConfig`` dictionary."""
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
