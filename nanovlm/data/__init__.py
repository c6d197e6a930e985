"""Data: tokenizer and image processor, the offline `shapes` dataset, row loading, prompts with
image placeholders and masked labels, left-padding collation. See docs/design.md (Data)."""

from nanovlm.data.collate import VQACollator
from nanovlm.data.datasets import VQADataset, build_datasets, load_rows, normalize_answer
from nanovlm.data.processors import get_image_processor, get_tokenizer
from nanovlm.data.shapes import QUESTION_TYPES, ShapesRows, chance_per_type, shapes_dataset

__all__ = [
    "QUESTION_TYPES", "ShapesRows", "VQACollator", "VQADataset", "build_datasets", "chance_per_type",
    "get_image_processor", "get_tokenizer", "load_rows", "normalize_answer", "shapes_dataset",
]
