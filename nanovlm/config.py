"""The two dataclasses that hold every setting: `VLMConfig` (the model) and `TrainConfig` (the run).

One serialisation path serves checkpoints, Ray workers, Tune, MLflow and the CLI:
`to_dict()` / `from_dict()` / `to_json()` / `from_json()`, and `key=value` overrides
(`apply_overrides`). Field names of `VLMConfig` are the ones the published nanoVLM
checkpoints use in their `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fields that older or newer nanoVLM versions wrote into config.json and that do not change
# the architecture we build. Loading a checkpoint ignores them with a warning.
LEGACY_HARMLESS_FIELDS = frozenset({
    "lm_eos_token_id",          # the EOS id now comes from the tokenizer
    "lm_use_tokens",            # we always return vocabulary logits
    "mp_use_cls",
    "vit_architecture",
    "lm_architecture",
    "vlm_extra_token_amount",
    "hf_revision",
})


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or describes a model that cannot be built."""


_C = typing.TypeVar("_C", bound="_Serialised")


class _Serialised:
    """The one serialisation path both configs share: dicts, JSON files and checked replacement."""

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any], *, strict: bool = True) -> _C:
        return _from_dict(cls, data, strict=strict)

    def to_json(self, path: str | Path | None = None) -> str:
        return _to_json(self, path)

    @classmethod
    def from_json(cls: type[_C], path_or_text: str | Path, *, strict: bool = True) -> _C:
        return cls.from_dict(_read_json(path_or_text), strict=strict)

    def replace(self: _C, **changes: Any) -> _C:
        return _replace(self, changes)


@dataclass
class VLMConfig(_Serialised):
    # --- vision transformer (SigLIP) ---
    vit_hidden_dim: int = 768
    vit_inter_dim: int = 3072
    vit_patch_size: int = 16
    vit_img_size: int = 224
    vit_n_heads: int = 12
    vit_dropout: float = 0.0
    vit_n_blocks: int = 12
    vit_ln_eps: float = 1e-6
    vit_cls_flag: bool = False
    vit_model_type: str = "google/siglip-base-patch16-224"

    # --- language model (Llama / SmolLM2) ---
    lm_hidden_dim: int = 576
    lm_inter_dim: int = 1536
    lm_rms_eps: float = 1e-5
    lm_re_base: float = 100000
    lm_max_position_embeddings: int = 8192
    lm_base_vocab_size: int = 49152
    extra_token_amount: int = 1       # rows added to the vocabulary for vlm_extra_tokens
    lm_vocab_size: int = 49153        # lm_base_vocab_size + extra_token_amount (or more)
    lm_n_heads: int = 9
    lm_n_kv_heads: int = 3
    lm_dropout: float = 0.0
    lm_n_blocks: int = 30
    lm_attn_scaling: float = 1.0
    lm_max_length: int = 1024         # longest training sequence, image tokens included
    lm_tie_weights: bool = True
    lm_model_type: str = "HuggingFaceTB/SmolLM2-135M"
    lm_tokenizer: str = "HuggingFaceTB/cosmo2-tokenizer"
    lm_chat_template: str = CHATML_TEMPLATE

    # --- modality projector ---
    mp_pixel_shuffle_factor: int = 2
    mp_image_token_length: int = 49   # (vit_img_size / vit_patch_size / mp_pixel_shuffle_factor) ** 2

    # --- the image pipeline (docs/data.md); nanoVLM's names. Images are resized so that both
    # sides are multiples of vit_img_size and the long side is at most max_img_size, then cut
    # into vit_img_size tiles: splitting is on when max_img_size > vit_img_size.
    max_img_size: Optional[int] = None   # None -> vit_img_size (one tile per image, no splitting)
    resize_to_max_side_len: bool = False # True: the long side always becomes max_img_size (up-scaling too)
    vit_img_mean: float = 0.0            # pixels fed to the ViT: (x / 255 - mean) / std, every channel.
    vit_img_std: float = 1.0             # 0 / 1: nanoVLM's [0, 1]; 0.5 / 0.5: SigLIP's own [-1, 1]

    # --- the joined model ---
    vlm_extra_tokens: dict[str, str] = field(default_factory=lambda: {"image_token": "<|image|>"})
    vlm_image_token_id: Optional[int] = None  # None -> lm_base_vocab_size + position of 'image_token'
    vlm_load_backbone_weights: bool = True
    vlm_checkpoint_path: str = "checkpoints/nanoVLM-222M"
    hf_repo_name: str = "nanoVLM-222M"

    def __post_init__(self) -> None:
        if self.max_img_size is None:
            self.max_img_size = self.vit_img_size

    # ---------------------------------------------------------------- derived sizes
    @property
    def splits_images(self) -> bool:
        """Whether images are cut into several vit_img_size tiles (nanoVLM's image splitting)."""
        return self.max_img_size > self.vit_img_size

    @property
    def max_grid_side(self) -> int:
        """The most tiles along one side of an image: max_img_size / vit_img_size."""
        return self.max_img_size // self.vit_img_size

    @property
    def vit_grid_size(self) -> int:
        """Patches per image side."""
        return self.vit_img_size // self.vit_patch_size

    @property
    def vit_num_patches(self) -> int:
        return self.vit_grid_size ** 2

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder: explicit, or the first row after the base vocabulary
        plus the position of 'image_token' among vlm_extra_tokens (how get_tokenizer adds them)."""
        if self.vlm_image_token_id is not None:
            return self.vlm_image_token_id
        return self.lm_base_vocab_size + list(self.vlm_extra_tokens).index("image_token")

    def expected_image_token_length(self) -> int:
        """Image tokens the projector emits per image: (grid / s)^2."""
        return (self.vit_grid_size // self.mp_pixel_shuffle_factor) ** 2

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "VLMConfig":
        """A named preset (see `PRESETS`), with optional field overrides."""
        return preset(name, **overrides)[0]

    def validate(self) -> "VLMConfig":
        """Raise `ConfigError` for a model that cannot be built; return self otherwise."""
        _check_types(self)
        errors: list[str] = []
        positive = [
            "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads",
            "vit_n_blocks", "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads",
            "lm_n_blocks", "lm_base_vocab_size", "lm_vocab_size", "lm_max_length",
            "lm_max_position_embeddings", "mp_pixel_shuffle_factor", "mp_image_token_length",
            "vit_ln_eps", "lm_rms_eps", "lm_re_base", "lm_attn_scaling", "max_img_size", "vit_img_std",
        ]
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                errors.append(f"{name}={value} must be positive.")
        if self.extra_token_amount < 0:
            errors.append(f"extra_token_amount={self.extra_token_amount} must be >= 0.")
        for name in ("vit_dropout", "lm_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                errors.append(f"{name}={value} must be in [0, 1).")
        if errors:
            raise ConfigError("Invalid VLMConfig:\n  " + "\n  ".join(errors))

        errors += _indivisible(self, "vit_hidden_dim", "vit_n_heads")
        lm_heads = _indivisible(self, "lm_hidden_dim", "lm_n_heads")
        errors += lm_heads
        if not lm_heads and self.lm_head_dim % 2:
            errors.append(
                f"lm_hidden_dim / lm_n_heads = {self.lm_head_dim} is odd; RoPE rotates pairs of "
                "features, so the head dim must be even. Change lm_hidden_dim or lm_n_heads.")
        errors += _indivisible(self, "lm_n_heads", "lm_n_kv_heads", " (grouped-query attention)")
        patches = _indivisible(self, "vit_img_size", "vit_patch_size")
        errors += patches
        if not patches:   # the grid checks need a whole number of patches
            if self.vit_grid_size % self.mp_pixel_shuffle_factor:
                errors.append(
                    f"the patch grid is {self.vit_grid_size}x{self.vit_grid_size} (vit_img_size / vit_patch_size) "
                    f"and mp_pixel_shuffle_factor={self.mp_pixel_shuffle_factor} does not divide it; "
                    f"pick mp_pixel_shuffle_factor from {_divisors(self.vit_grid_size)}.")
            elif self.mp_image_token_length != self.expected_image_token_length():
                errors.append(
                    f"mp_image_token_length={self.mp_image_token_length} but a "
                    f"{self.vit_grid_size}x{self.vit_grid_size} patch grid shuffled by "
                    f"mp_pixel_shuffle_factor={self.mp_pixel_shuffle_factor} gives "
                    f"{self.expected_image_token_length()} image tokens; set "
                    f"mp_image_token_length={self.expected_image_token_length()}.")
        # With an explicit vlm_image_token_id (e.g. an imported SmolVLM) the tokens already
        # exist in the base vocabulary, so no rows need to be added.
        if self.vlm_image_token_id is None and self.extra_token_amount < len(self.vlm_extra_tokens):
            errors.append(
                f"extra_token_amount={self.extra_token_amount} is smaller than the "
                f"{len(self.vlm_extra_tokens)} vlm_extra_tokens; set extra_token_amount="
                f"{len(self.vlm_extra_tokens)}.")
        if self.lm_vocab_size < self.lm_base_vocab_size + self.extra_token_amount:
            errors.append(
                f"lm_vocab_size={self.lm_vocab_size} is smaller than lm_base_vocab_size + "
                f"extra_token_amount = {self.lm_base_vocab_size} + {self.extra_token_amount}; set "
                f"lm_vocab_size={self.lm_base_vocab_size + self.extra_token_amount}.")
        if "image_token" not in self.vlm_extra_tokens:
            errors.append("vlm_extra_tokens has no 'image_token' entry; add e.g. "
                          "{'image_token': '<|image|>'}.")
        errors += self._image_split_errors()
        if self.vlm_image_token_id is not None and not 0 <= self.vlm_image_token_id < self.lm_vocab_size:
            errors.append(f"vlm_image_token_id={self.vlm_image_token_id} is outside the vocabulary "
                          f"[0, lm_vocab_size={self.lm_vocab_size}).")
        largest_image = self.mp_image_token_length
        if self.splits_images:  # a full grid, its global view, one row/column token per tile
            largest_image = (self.max_grid_side ** 2 + 1) * (self.mp_image_token_length + 1)
        if largest_image + 1 > self.lm_max_length:
            errors.append(
                f"lm_max_length={self.lm_max_length} cannot hold one image (mp_image_token_length="
                f"{self.mp_image_token_length}, max_img_size={self.max_img_size}: up to {largest_image} "
                "tokens) and a token; raise lm_max_length.")
        if self.lm_max_length > self.lm_max_position_embeddings:
            errors.append(
                f"lm_max_length={self.lm_max_length} exceeds lm_max_position_embeddings="
                f"{self.lm_max_position_embeddings}.")
        if errors:
            raise ConfigError("Invalid VLMConfig:\n  " + "\n  ".join(errors))
        return self

    def _image_split_errors(self) -> list[str]:
        if self.max_img_size <= 0 or self.vit_img_size <= 0:
            return []  # reported as non-positive sizes
        if self.max_img_size < self.vit_img_size or self.max_img_size % self.vit_img_size:
            return [f"max_img_size={self.max_img_size} must be a multiple of vit_img_size={self.vit_img_size} "
                    f"(equal to it: one tile per image; e.g. {4 * self.vit_img_size}: up to 4x4 tiles)."]
        if not self.splits_images:
            return []
        side = self.max_grid_side
        missing = [name for name in image_split_tokens(side)  # the global token is optional (older nanoVLM)
                   if name != "global_image_token" and name not in self.vlm_extra_tokens]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            return [f"max_img_size={self.max_img_size} cuts images into up to {side}x{side} tiles of "
                    f"vit_img_size={self.vit_img_size}, but vlm_extra_tokens lacks {shown}; add "
                    f"nanovlm.config.image_split_tokens({side}) (nanoVLM has global_image_token and r1c1..r8c8)."]
        return []


def image_split_tokens(max_grid_side: int = 8) -> dict[str, str]:
    """nanoVLM's special tokens for split images: the global view's token and one per tile
    position, `r{i}c{j}` -> `<row_i_col_j>` (1-based, i, j <= max_grid_side)."""
    tokens = {"global_image_token": "<|global_image|>"}
    for i in range(1, max_grid_side + 1):
        for j in range(1, max_grid_side + 1):
            tokens[f"r{i}c{j}"] = f"<row_{i}_col_{j}>"
    return tokens


def nanovlm_extra_tokens() -> dict[str, str]:
    """`vlm_extra_tokens` of the current nanoVLM: the image token, the global view's token and
    the `r{i}c{j}` tokens of grids up to 8x8 (66 tokens, in nanoVLM's order)."""
    return {"image_token": "<|image|>", **image_split_tokens(8)}


@dataclass
class TrainConfig(_Serialised):
    # --- optimisation (nanoVLM names where they exist) ---
    lr_mp: float = 5e-3
    lr_vision_backbone: float = 5e-5      # 0 freezes the ViT
    lr_language_backbone: float = 5e-5    # 0 freezes the LM
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.05            # fraction of max_training_steps spent warming up linearly
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    batch_size: int = 16                  # per worker, per micro-step
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_training_steps: int = 5000
    seed: int = 0
    dtype: str = "auto"                   # "auto" (bf16 autocast on CUDA, fp32 on CPU), "float32", "bfloat16"
    compile: bool = False
    device: str = "auto"                  # "auto", "cpu", "cuda"

    # --- data ---
    train_dataset_path: str = "shapes"    # "shapes", local files/dirs or Hub ids; several, comma separated, mix (docs/data.md)
    train_dataset_name: str = "all"       # Hub config / subset names, comma separated (one entry's own: "repo[a,b]")
    train_dataset_weights: Optional[str] = None  # mixture weights, one per train_dataset_path entry; None: by rows
    stream_dataset: Optional[bool] = None # read each worker's rows as batches need them; None: auto (docs/data.md)
    val_ratio: float = 0.025              # for datasets without a validation split
    data_cutoff_idx: Optional[int] = None # use only the first N training rows
    shapes_max_objects: int = 1
    shapes_question_types: str = "all"    # comma separated subset of the shapes question types
    shapes_train_size: int = 100000
    shapes_eval_size: int = 512
    shapes_seed: int = 1234
    max_images_per_example: int = 4       # rows with more images are skipped (and counted)
    # FineVision's per-turn ratings (1..5), nanoVLM's filters: a turn rated lower is dropped (1 keeps all)
    relevance_min_rating: int = 1
    image_correspondence_min_rating: int = 1
    visual_dependency_min_rating: int = 1
    formatting_min_rating: int = 1
    tokenizer_path: Optional[str] = None  # overrides VLMConfig.lm_tokenizer (e.g. a locally trained one)
    dataloader_workers: int = 0

    # --- packing (docs/data.md, Packing) ---
    packing: bool = True                  # whole samples packed into rows, each attending only to itself
    max_sample_length: Optional[int] = None  # tokens per packed row; None -> VLMConfig.lm_max_length
    max_images_per_knapsack: int = 18     # images per packed row (images, not their tiles)

    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 250
    eval_samples: int = 256               # validation samples for loss and answer accuracy
    log_interval: int = 10
    system_metrics_interval: float = 10.0  # seconds between CPU/memory/GPU samples in the MLflow run; 0: none
    checkpoint_interval: int = 500
    max_new_tokens_eval: int = 8
    eval_tasks: str = ""                  # benchmarks at each evaluation: "mmstar" or "mmstar:300,textvqa" (docs/eval.md)
    eval_tasks_limit: Optional[int] = 200 # questions per task at each evaluation, unless the task gives :N; None: all
    eval_tasks_datasets: dict[str, str] = field(default_factory=dict)  # task -> local copy or Hub id ("shapes": mmstar)
    output_dir: str = "runs/latest"
    resume_from_vlm_checkpoint: Optional[str] = None  # a VLM checkpoint dir to start from
    peak_flops: Optional[float] = None    # FLOP/s for MFU; None -> measured matmul peak of the device

    # --- Ray Train ---
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    worker_resources: str = ""            # custom Ray resources per worker, "name=amount,...", e.g. "node_slot=1"
    report_interval: int = 10             # steps between metric reports to Ray (one is skipped while one waits)
    checkpoints_to_keep: int = 2
    max_failures: int = 0
    storage_path: Optional[str] = None    # Ray Train storage; default under ~/.nanovlm/ray_results
    experiment_name: str = "nanovlm"      # MLflow experiment
    register_model: Optional[str] = None  # MLflow registry name for the run's final model (a sweep: its best trial's)

    def validate(self) -> "TrainConfig":
        _check_types(self)
        errors: list[str] = []
        for name in ("batch_size", "gradient_accumulation_steps", "max_training_steps", "eval_interval",
                     "eval_samples", "log_interval", "checkpoint_interval", "num_workers",
                     "report_interval", "checkpoints_to_keep", "shapes_max_objects", "max_images_per_example",
                     "shapes_train_size", "shapes_eval_size", "max_new_tokens_eval"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be positive.")
        for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone", "weight_decay",
                     "max_grad_norm", "max_failures", "dataloader_workers"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("warmup_ratio", "min_lr_ratio", "val_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1].")
        if self.cpus_per_worker <= 0:
            errors.append(f"cpus_per_worker={self.cpus_per_worker} must be positive.")
        try:
            self.custom_worker_resources()
        except ValueError as exc:
            errors.append(str(exc))
        if self.dtype not in ("auto", "float32", "bfloat16"):
            errors.append(f"dtype={self.dtype!r} must be one of 'auto', 'float32', 'bfloat16'.")
        if self.device not in ("auto", "cpu", "cuda"):
            errors.append(f"device={self.device!r} must be one of 'auto', 'cpu', 'cuda'.")
        if self.max_sample_length is not None and self.max_sample_length <= 0:
            errors.append(f"max_sample_length={self.max_sample_length} must be positive (or None for lm_max_length).")
        if self.max_images_per_knapsack <= 0:
            errors.append(f"max_images_per_knapsack={self.max_images_per_knapsack} must be positive.")
        if self.peak_flops is not None and self.peak_flops <= 0:
            errors.append(f"peak_flops={self.peak_flops} must be positive (or None to measure it).")
        if self.system_metrics_interval < 0:
            errors.append(f"system_metrics_interval={self.system_metrics_interval} must be >= 0 (0 turns it off).")
        errors += _dataset_errors(self)
        if self.lr_mp == self.lr_vision_backbone == self.lr_language_backbone == 0:
            errors.append("lr_mp, lr_vision_backbone and lr_language_backbone are all 0: nothing would train.")
        errors += _eval_task_errors(self)
        if errors:
            raise ConfigError("Invalid TrainConfig:\n  " + "\n  ".join(errors))
        return self

    def custom_worker_resources(self) -> dict[str, float]:
        """`worker_resources` "node_slot=1,fast_disk=0.5" -> {"node_slot": 1.0, "fast_disk": 0.5}: what each
        Ray Train worker needs besides its CPUs and GPU (`ray start --resources` gives nodes such resources)."""
        resources: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.worker_resources.split(","))):
            name, _, amount = item.partition("=")
            try:
                value = float(amount)
            except ValueError:
                value = -1.0
            if not name.strip() or value <= 0 or name.strip() in ("CPU", "GPU", "memory"):
                raise ValueError(f"worker_resources={self.worker_resources!r}: {item!r} is not NAME=AMOUNT with a "
                                 "positive amount and a custom name (CPUs and GPUs have cpus_per_worker and use_gpu), "
                                 "e.g. worker_resources=node_slot=1.")
            resources[name.strip()] = value
        return resources


def _eval_task_errors(train: TrainConfig) -> list[str]:
    """What is wrong with the eval_tasks fields (unknown tasks, a bad limit), as messages."""
    if train.eval_tasks_limit is not None and train.eval_tasks_limit <= 0:
        return [f"eval_tasks_limit={train.eval_tasks_limit} must be positive (or None for every question)."]
    if not train.eval_tasks.strip():
        return [f"eval_tasks_datasets={train.eval_tasks_datasets} is set but eval_tasks is empty; name the tasks "
                "in eval_tasks."] if train.eval_tasks_datasets else []
    from nanovlm.eval.tasks import parse_task_list   # the task names live with the tasks

    try:
        names = {task.name for task, _ in parse_task_list(train.eval_tasks, what="eval_tasks")}
    except ConfigError as exc:
        return [str(exc)]
    unused = sorted(set(train.eval_tasks_datasets) - names)
    return [f"eval_tasks_datasets names {unused}, which eval_tasks={train.eval_tasks!r} does not run."] if unused else []


class DatasetEntry(typing.NamedTuple):
    """One dataset of `train_dataset_path`: its path or Hub id, its own Hub subsets ("repo[a,b]";
    None: `train_dataset_name`'s) and its weight in the mixture (None: by its rows)."""
    path: str
    subsets: Optional[tuple[str, ...]]
    weight: Optional[float]


def dataset_entries(path: str, weights: Optional[str] = None) -> list[DatasetEntry]:
    """`train_dataset_path` and `train_dataset_weights` as entries: "a.parquet,org/repo[x,y]" and
    "0.7,0.3". `ConfigError` naming the field and the problem."""
    parts, depth, current = [], 0, ""
    for char in path:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ConfigError(f"train_dataset_path={path!r}: unbalanced brackets; write an entry's subsets as repo[a,b].")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ConfigError(f"train_dataset_path={path!r}: unbalanced brackets; write an entry's subsets as repo[a,b].")
    entries = []
    for part in (p.strip() for p in parts + [current]):
        subsets = None
        if part.endswith("]"):
            part, _, inner = part[:-1].partition("[")
            subsets = tuple(s.strip() for s in inner.split(",") if s.strip()) or None
            part = part.strip()
        if not part:
            raise ConfigError(f"train_dataset_path={path!r} has an empty entry; separate datasets by single commas.")
        entries.append((part, subsets))
    values: list[Optional[float]] = [None] * len(entries)
    if weights is not None:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(f"train_dataset_weights={weights!r} must be numbers separated by commas.") from None
        if len(values) != len(entries) or not all(0 < w < float("inf") for w in values):
            raise ConfigError(f"train_dataset_weights={weights!r} must hold one positive weight per entry of "
                              f"train_dataset_path ({len(entries)}: {[p for p, _ in entries]}).")
    return [DatasetEntry(p, s, w) for (p, s), w in zip(entries, values)]


def _dataset_errors(train: "TrainConfig") -> list[str]:
    errors = []
    try:
        entries = dataset_entries(train.train_dataset_path, train.train_dataset_weights)
    except ConfigError as exc:
        return [str(exc)]
    if "shapes" in [e.path for e in entries] and len(entries) > 1:
        errors.append(f"train_dataset_path={train.train_dataset_path!r}: 'shapes' is generated in memory and "
                      "cannot be part of a mixture; mix files or Hub datasets.")
    if entries[0].path == "shapes" and train.stream_dataset:
        errors.append("stream_dataset=True needs files or a Hub dataset; 'shapes' is generated in memory (use "
                      "stream_dataset=None or False).")
    for name in ("relevance", "image_correspondence", "visual_dependency", "formatting"):
        value = getattr(train, f"{name}_min_rating")
        if not 0 <= value <= 5:
            errors.append(f"{name}_min_rating={value} must be in [0, 5] (FineVision rates 1 to 5; 1 keeps every turn).")
    return errors


# ==================================================================== presets

def _tiny() -> tuple[VLMConfig, TrainConfig]:
    # ~1.35M parameters: 48 px images (one tile, no splitting, pixels in [-1, 1]), 6x6 patch
    # grid, 9 image tokens. The demo settings:
    # colour and shape questions about one object, 3000 steps of batch 32 at lr 7e-4 (~8
    # steps/s on 2 idle CPU cores, so ~6-7 min). Measured (benchmarks/learn_shapes.py): colour
    # is learned in ~200 steps, shape later; 48 px learns shape fastest per second (at 32 px the
    # shapes are too small to tell apart, at 64 px steps cost 1.4x more for the same progress
    # per step), and 7e-4 beat 1e-3/1.5e-3 on shape. Uses a BPE tokenizer trained locally on
    # the shapes text (tokenizer_path=None -> trained and cached on first use). Pads instead of
    # packing: its samples are all about one length, and its records count batches of samples.
    vlm = VLMConfig(
        vit_hidden_dim=128, vit_inter_dim=512, vit_patch_size=8, vit_img_size=48, vit_n_heads=4,
        vit_n_blocks=3, vit_model_type="", vit_cls_flag=False,
        lm_hidden_dim=128, lm_inter_dim=384, lm_n_heads=4, lm_n_kv_heads=2, lm_n_blocks=3,
        lm_base_vocab_size=512, extra_token_amount=1, lm_vocab_size=513, lm_max_length=128,
        lm_max_position_embeddings=512, lm_re_base=10000, lm_model_type="", lm_tokenizer="shapes-bpe-512",
        mp_pixel_shuffle_factor=2, mp_image_token_length=9, vit_img_mean=0.5, vit_img_std=0.5,
        vlm_load_backbone_weights=False, vlm_checkpoint_path="checkpoints/nanoVLM-tiny",
        hf_repo_name="nanoVLM-tiny",
    )
    train = TrainConfig(
        lr_mp=7e-4, lr_vision_backbone=7e-4, lr_language_backbone=7e-4, weight_decay=0.01,
        batch_size=32, max_training_steps=3000, eval_interval=500, eval_samples=256,
        checkpoint_interval=500, log_interval=50, shapes_max_objects=1, shapes_question_types="colour,shape",
        output_dir="runs/tiny", packing=False,
    )
    return vlm, train


def _nanovlm_222m() -> tuple[VLMConfig, TrainConfig]:
    return VLMConfig(), TrainConfig()


def _nanovlm_460m() -> tuple[VLMConfig, TrainConfig]:
    # The current nanoVLM defaults: SigLIP2-B/16-512 and SmolLM2-360M-Instruct, images split into
    # up to 4x4 tiles of 512 px (long side resized to 2048) plus a global view, 64 tokens a tile.
    tokens = nanovlm_extra_tokens()
    vlm = VLMConfig(
        vit_img_size=512, vit_model_type="google/siglip2-base-patch16-512",
        lm_hidden_dim=960, lm_inter_dim=2560, lm_n_heads=15, lm_n_kv_heads=5, lm_n_blocks=32,
        lm_model_type="HuggingFaceTB/SmolLM2-360M-Instruct", lm_tokenizer="HuggingFaceTB/SmolLM2-360M-Instruct",
        lm_max_length=4096, mp_pixel_shuffle_factor=4, mp_image_token_length=64,
        max_img_size=2048, resize_to_max_side_len=True,
        vlm_extra_tokens=tokens, extra_token_amount=len(tokens), lm_vocab_size=49152 + len(tokens),
        vlm_checkpoint_path="checkpoints/nanoVLM-460M", hf_repo_name="nanoVLM-460M",
    )
    return vlm, TrainConfig()


PRESETS: dict[str, typing.Callable[[], tuple[VLMConfig, TrainConfig]]] = {
    "tiny": _tiny,
    "nanovlm-222m": _nanovlm_222m,
    "nanovlm-460m": _nanovlm_460m,
}


def preset(name: str, **overrides: Any) -> tuple[VLMConfig, TrainConfig]:
    """Fresh `(VLMConfig, TrainConfig)` of a named preset, with field overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}{_suggestion(name, PRESETS)}. Valid presets: {sorted(PRESETS)}.")
    vlm, train = PRESETS[name]()
    if overrides:
        vlm, train = apply_overrides(vlm, train, overrides)
    return vlm, train


# ==================================================================== overrides

def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def owner_of(name: str) -> type:
    """Which dataclass owns a field name; `ConfigError` with a suggestion if neither does."""
    if name in _FIELDS[VLMConfig]:
        return VLMConfig
    if name in _FIELDS[TrainConfig]:
        return TrainConfig
    every = list(_FIELDS[VLMConfig]) + list(_FIELDS[TrainConfig])
    raise ConfigError(f"Unknown config field {name!r}{_suggestion(name, every)}. "
                      "Run `nanovlm config --preset tiny` to list every field.")


def parse_override(text: str) -> tuple[str, Any]:
    """`"lm_n_blocks=4"` -> `("lm_n_blocks", 4)`, the value parsed by the field's type."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form field=value (e.g. lm_n_blocks=4).")
    name, raw = text.split("=", 1)
    name = name.strip()
    if name.startswith(("vlm.", "train.")):  # dotted form: vlm.lm_n_blocks=4
        name = name.split(".", 1)[1]
    cls = owner_of(name)
    return name, parse_value(cls, name, raw.strip())


def parse_overrides(items: typing.Iterable[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not items:
        return {}
    if isinstance(items, dict):
        for name in items:
            owner_of(name)
        return dict(items)
    return dict(parse_override(item) for item in items)


def apply_overrides(vlm: VLMConfig, train: TrainConfig,
                    overrides: typing.Iterable[str] | dict[str, Any] | None) -> tuple[VLMConfig, TrainConfig]:
    """Return new configs with `overrides` (strings `field=value` or a dict) applied.

    Derived sizes follow their inputs unless overridden themselves: changing the image size,
    patch size or shuffle factor recomputes `mp_image_token_length`; changing `vit_img_size`
    moves `max_img_size` with it when it was equal (no splitting); changing `vlm_extra_tokens`
    recomputes `extra_token_amount` (when it was their number); changing the base vocab or
    `extra_token_amount` recomputes `lm_vocab_size` (when it was exactly their sum).
    """
    values = parse_overrides(overrides)
    vlm_changes = {k: v for k, v in values.items() if owner_of(k) is VLMConfig}
    train_changes = {k: v for k, v in values.items() if owner_of(k) is TrainConfig}
    new_vlm = vlm.replace(**vlm_changes)
    image_inputs = {"vit_img_size", "vit_patch_size", "mp_pixel_shuffle_factor"}
    if image_inputs & vlm_changes.keys() and "mp_image_token_length" not in vlm_changes:
        if _safe_token_length(new_vlm) is not None and vlm.mp_image_token_length == _safe_token_length(vlm):
            new_vlm.mp_image_token_length = _safe_token_length(new_vlm)
    if "vit_img_size" in vlm_changes and "max_img_size" not in vlm_changes and vlm.max_img_size == vlm.vit_img_size:
        new_vlm.max_img_size = new_vlm.vit_img_size
    if ("vlm_extra_tokens" in vlm_changes and "extra_token_amount" not in vlm_changes
            and vlm.extra_token_amount == len(vlm.vlm_extra_tokens)):
        new_vlm.extra_token_amount = len(new_vlm.vlm_extra_tokens)
    vocab_inputs = {"lm_base_vocab_size", "extra_token_amount", "vlm_extra_tokens"}
    if vocab_inputs & vlm_changes.keys() and "lm_vocab_size" not in vlm_changes:
        if vlm.lm_vocab_size == vlm.lm_base_vocab_size + vlm.extra_token_amount:
            new_vlm.lm_vocab_size = new_vlm.lm_base_vocab_size + new_vlm.extra_token_amount
    return new_vlm, train.replace(**train_changes)


def _safe_token_length(cfg: VLMConfig) -> int | None:
    if cfg.vit_patch_size <= 0 or cfg.mp_pixel_shuffle_factor <= 0 or cfg.vit_img_size % cfg.vit_patch_size:
        return None
    if cfg.vit_grid_size % cfg.mp_pixel_shuffle_factor:
        return None
    return cfg.expected_image_token_length()


def configs_to_dict(vlm: VLMConfig, train: TrainConfig) -> dict[str, dict[str, Any]]:
    """The plain-dict form sent to Ray workers and stored with runs."""
    return {"vlm": vlm.to_dict(), "train": train.to_dict()}


def configs_from_dict(data: dict[str, Any]) -> tuple[VLMConfig, TrainConfig]:
    if not isinstance(data, dict):
        raise ConfigError(f"A config must be a JSON object with 'vlm' and 'train' sections (what `nanovlm config` "
                          f"prints), got {json_kind(data)}.")
    for key in ("vlm", "train"):
        if key not in data:
            raise ConfigError(f"Config dict has no {key!r} section; expected keys 'vlm' and 'train'.")
    extra = set(data) - {"vlm", "train"}
    if extra:
        raise ConfigError(f"Config dict has unknown sections {sorted(extra)}; expected 'vlm' and 'train'.")
    return VLMConfig.from_dict(data["vlm"]), TrainConfig.from_dict(data["train"])


# ==================================================================== internals

_FIELDS: dict[type, dict[str, Any]] = {}


def _register(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    _FIELDS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_register(VLMConfig)
_register(TrainConfig)


def _to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: _copy_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _copy_value(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def _to_json(cfg: Any, path: str | Path | None) -> str:
    text = json.dumps(_to_dict(cfg), indent=2, sort_keys=False)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


def _read_json(path_or_text: str | Path) -> dict[str, Any]:
    text = str(path_or_text)
    if text.lstrip().startswith("{"):
        return json.loads(text)
    data = read_json_file(path_or_text)
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path_or_text} holds {json_kind(data)}, not a JSON object of config fields.")
    return data


def read_json_file(path: str | Path, what: str = "Config file") -> Any:
    """The JSON value in the file at `path`; `ConfigError` naming the file (and, for a syntax
    error, its line and column) when it is missing, unreadable or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} {'is a directory' if path.is_dir() else 'does not exist'}; "
                          "give a JSON file.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno}, "
                          f"column {exc.colno}; fix the file or write it again.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file, so not JSON; give a JSON file.") from None


def json_kind(value: Any) -> str:
    """How a JSON value reads in a message: 'a number (42)', 'a list', ..."""
    for types_, kind in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"),
                         (dict, "an object")):
        if isinstance(value, types_):
            return kind + (f" ({value!r})" if isinstance(value, (bool, int, float)) else "")
    return "null"


def _from_dict(cls: type, data: dict[str, Any], *, strict: bool) -> Any:
    """Build `cls` from a dict. strict=True (user input): any unknown field is an error.
    strict=False (a checkpoint's config.json): known-harmless legacy fields are dropped with
    a warning; other unknown fields are still errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be built from a dict, got {type(data).__name__}.")
    fields = _FIELDS[cls]
    kwargs: dict[str, Any] = {}
    if cls is VLMConfig and "vlm_image_token_id" in data and "vit_img_mean" not in data and "vit_img_std" not in data:
        # Written by nanovlm-ray before the image pipeline followed nanoVLM: its processor fed
        # SigLIP's (x - 0.5) / 0.5. nanoVLM's own config.json never has vlm_image_token_id.
        kwargs.update(vit_img_mean=0.5, vit_img_std=0.5)
    for name, value in data.items():
        if name not in fields:
            if not strict and name in LEGACY_HARMLESS_FIELDS:
                logger.warning("Ignoring %s field %r=%r written by another nanoVLM version.",
                               cls.__name__, name, value)
                continue
            raise ConfigError(f"Unknown {cls.__name__} field {name!r}{_suggestion(name, fields)}.")
        kwargs[name] = _coerce(cls, name, value)
    return cls(**kwargs)


def _replace(cfg: Any, changes: dict[str, Any]) -> Any:
    cls = type(cfg)
    for name, value in changes.items():
        if name not in _FIELDS[cls]:
            raise ConfigError(f"Unknown {cls.__name__} field {name!r}{_suggestion(name, _FIELDS[cls])}.")
        changes[name] = _coerce(cls, name, value)
    return dataclasses.replace(cfg, **changes)


def _check_types(cfg: Any) -> None:
    for name in _FIELDS[type(cfg)]:
        _coerce(type(cfg), name, getattr(cfg, name))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Check `value` against the field's annotation; ints are accepted for float fields."""
    tp = _FIELDS[cls][name]
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{cls.__name__}.{name} must be {_type_name(tp)}, got None.")
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            return int(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    expected = "dict[str, str]" if origin is dict else _type_name(tp)
    if optional:
        expected += " or None"
    raise ConfigError(f"{cls.__name__}.{name} must be {expected}, got {value!r} ({type(value).__name__}).")


def parse_value(cls: type, name: str, raw: str) -> Any:
    """Parse a command-line string into the field's type."""
    tp = _FIELDS[cls][name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    try:
        if origin is dict:
            value: Any = json.loads(raw)
        elif tp is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                value = True
            elif lowered in ("false", "0", "no", "off"):
                value = False
            else:
                raise ValueError
        elif tp is int:
            value = int(raw)
        elif tp is float:
            value = float(raw)
        else:
            value = raw
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"{cls.__name__}.{name}={raw!r} is not a valid {_type_name(tp)}.") from None
    return _coerce(cls, name, value)


def _suggestion(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _indivisible(cfg: Any, whole: str, part: str, why: str = "") -> list[str]:
    """[] when field `part` divides field `whole`, else the one error naming both and the valid values."""
    w, p = getattr(cfg, whole), getattr(cfg, part)
    if w % p == 0:
        return []
    return [f"{whole}={w} is not divisible by {part}={p}{why}; pick {part} from {_divisors(w)}."]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
