"""The nanoVLM model: `ViT` -> `ModalityProjector` -> `LanguageModel`, joined in `VisionLanguageModel`."""

from nanovlm.models.checkpoint import CheckpointError
from nanovlm.models.language_model import KVCache, LanguageModel
from nanovlm.models.modality_projector import ModalityProjector, pixel_shuffle
from nanovlm.models.vision_language_model import VisionLanguageModel, sample_next_token
from nanovlm.models.vision_transformer import ViT

__all__ = ["CheckpointError", "KVCache", "LanguageModel", "ModalityProjector", "ViT", "VisionLanguageModel",
           "pixel_shuffle", "sample_next_token"]
