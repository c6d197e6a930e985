"""`nanovlm push`: a checkpoint, or its transformers export, to a Hugging Face Hub model repo.

The folder uploaded is what `nanovlm export` writes (`--format nanovlm`: config, weights,
tokenizer, image processor settings, model card; `transformers`: the Idefics3 directory), staged
in a temporary directory: the training state and the MLflow run record never leave the machine.
The token comes from where huggingface_hub looks: `HF_TOKEN`, else the one `hf auth login` saved.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

from nanovlm.config import ConfigError

logger = logging.getLogger(__name__)

FORMATS = ("nanovlm", "transformers")


def export(checkpoint: str | Path, output: str | Path, export_format: str = "nanovlm",
           tokenizer: Optional[str] = None) -> list[str]:
    """Write `checkpoint` to `output` in `export_format`; return what could not be exported
    exactly (empty for `nanovlm`)."""
    from nanovlm.export.checkpoint_files import copy_model_files, model_directory

    checkpoint = model_directory(checkpoint)
    if export_format == "nanovlm":
        copy_model_files(checkpoint, output, tokenizer)
        return []
    if export_format == "transformers":
        from nanovlm.export.idefics3 import export_transformers
        return export_transformers(checkpoint, output, tokenizer)
    raise ConfigError(f"Unknown export format {export_format!r}; choose one of {', '.join(FORMATS)}.")


def push_checkpoint(checkpoint: str | Path, repo_id: str, *, export_format: str = "nanovlm",
                    tokenizer: Optional[str] = None, private: bool = False,
                    commit_message: Optional[str] = None) -> tuple[str, list[str]]:
    """Export `checkpoint` into a temporary directory and upload it to `repo_id` (created if
    needed). Returns the repo id and what could not be exported exactly."""
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError("No Hugging Face token: set HF_TOKEN, or run `hf auth login`, then push again.")
    with tempfile.TemporaryDirectory(prefix="nanovlm-push-") as tmp:
        folder = Path(tmp) / "model"
        notes = export(checkpoint, folder, export_format, tokenizer)
        message = commit_message or f"Upload nanovlm model ({export_format} format)"
        return push_folder(folder, repo_id, private=private, commit_message=message), notes


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False,
                commit_message: str = "Upload nanovlm model") -> str:
    """Create (or reuse) the model repo `repo_id` and upload `folder` to it; the repo id."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message)
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id
