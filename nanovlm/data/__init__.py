"""Data: tokenizer and the image pipeline (tiles, image string), the offline `shapes` dataset, row
loading, prompts with masked labels, left-padding collation. See docs/design.md (Data), docs/data.md."""

from nanovlm.data.collate import VQACollator
from nanovlm.data.datasets import VQADataset, build_datasets, load_rows, normalize_answer
from nanovlm.data.processors import get_image_processor, get_image_string, get_tokenizer, image_processor_for
from nanovlm.data.shapes import QUESTION_TYPES, ShapesRows, chance_per_type, shapes_dataset

__all__ = [
    "QUESTION_TYPES", "ShapesRows", "VQACollator", "VQADataset", "build_datasets", "chance_per_type",
    "get_image_processor", "get_image_string", "get_tokenizer", "image_processor_for", "load_rows",
    "normalize_answer", "shapes_dataset",
]
