"""The nanoVLM model: `ViT` -> `ModalityProjector` -> `LanguageModel`, joined in `VisionLanguageModel`;
`generation` decodes with it."""

from nanovlm.models.checkpoint import CheckpointError
from nanovlm.models.generation import KVCache, StaticKVCache, sample_next_token
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.modality_projector import ModalityProjector, pixel_shuffle
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.models.vision_transformer import ViT

__all__ = ["CheckpointError", "KVCache", "LanguageModel", "ModalityProjector", "StaticKVCache", "ViT",
           "VisionLanguageModel", "pixel_shuffle", "sample_next_token"]
