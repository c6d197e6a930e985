"""Test-wide settings: no network, and every cache/store under a per-session temp dir so tests
never touch the user's ~/.nanovlm or ~/.cache."""

import os
import tempfile

_ROOT = tempfile.mkdtemp(prefix="nanovlm-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["NANOVLM_HOME"] = os.path.join(_ROOT, "home")
os.environ["NANOVLM_CACHE"] = os.path.join(_ROOT, "cache")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_ROOT, "hf_datasets")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


import pytest  # noqa: E402  (after the environment above, which imports must see)


@pytest.fixture(scope="module")
def tiny_cfg():
    """The `tiny` preset's VLMConfig."""
    from nanovlm.config import preset
    return preset("tiny")[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    """The tiny preset's tokenizer (the shapes BPE, trained into the session's cache on first use)."""
    from nanovlm.data.processors import get_tokenizer
    return get_tokenizer(tiny_cfg.lm_tokenizer, tiny_cfg.vlm_extra_tokens, tiny_cfg.lm_chat_template)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite MLflow store for the module (creating its tables takes seconds); its URI."""
    from nanovlm import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking.check_tracking_store(uri)
    return uri
