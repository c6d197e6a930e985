"""The tokenizer and processor of an Idefics3 export, and what Idefics3's processor cannot
reproduce of nanovlm's image pipeline (docs/export.md, "What cannot be exported").

Idefics3's processor (transformers' `Idefics3Processor`, `Idefics3ImageProcessorPil`) names its
tokens itself: `<image>`, `<global-img>`, `<fake_token_around_image>`, `<end_of_utterance>`,
`<row_i_col_j>`. The exported tokenizer is ours, id for id, with our image token renamed
`<image>` and our global image token `<global-img>`; the others are added after our vocabulary
(the model gets mean rows for them, idefics3.py).

What maps exactly: pixel range (`image_mean`/`image_std`), resampling (bicubic), and for a model
with one tile per image (`max_img_size == vit_img_size`), the whole pixel pipeline: the image
squashed to one tile, `x / 255`, normalised. What does not: the image string (Idefics3 wraps
images in `<fake_token_around_image>`, ends tile rows with newlines, puts the global view last)
and, for split images, the resize and the global view (`processor_differences`).
"""

from __future__ import annotations

import json
from typing import Any

from nanovlm.config import VLMConfig

IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
FILLER = "<|nanovlm_unused_{}|>"   # ids the model has a row for but the tokenizer no token

# Prepended to our chat template: turns a message whose content is a list of parts
# ({"type": "image"} / {"type": "text", "text": ...}, what transformers' processors take) into
# one string, each image as `<image>`, which Idefics3's processor then expands.
LIST_CONTENT_PREFIX = (
    "{%- set converted = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set converted.messages = converted.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = converted.messages -%}"
)

TRANSFORMERS_USAGE = """\
With transformers alone (no nanovlm):

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("<this directory>", backend="pil")   # PIL: nanovlm's pixels
model = AutoModelForImageTextToText.from_pretrained("<this directory>")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[Image.open("photo.png")], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

The processor's prompt is Idefics3's, not the one this model was trained on (see Limitations).
EXACT_PROMPT"""
EXACT_PROMPT = """\
The prompt it was trained on: its image string in the text, the tokenizer and the image processor
called apart:

```python
text = processor.tokenizer.apply_chat_template(
    [{"role": "user", "content": IMAGE_STRING + "What is in the image?"}], tokenize=False, add_generation_prompt=True)
input_ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
pixel_values = processor.image_processor([Image.open("photo.png")], return_tensors="pt").pixel_values
out = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=32, do_sample=False)
```"""
SPLIT_PROMPT = """\
This model cuts images into tiles: its trained prompt and pixels come from nanovlm's own image
pipeline (`nanovlm.data.processors`: `image_processor_for`, `get_image_string`; docs/data.md)."""


def export_tokenizer(tokenizer: Any, cfg: VLMConfig):
    """Our tokenizer as the export's: the same ids, our image (and global image) token renamed
    as Idefics3 names them, filler tokens up to `lm_vocab_size`, then the tokens Idefics3's
    processor needs that are missing; the chat template also takes lists of image/text parts."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from nanovlm.export.idefics3 import ExportError

    vocab = tokenizer.get_vocab()
    renames = {cfg.vlm_extra_tokens["image_token"]: IMAGE_TOKEN}
    if "global_image_token" in cfg.vlm_extra_tokens:
        renames[cfg.vlm_extra_tokens["global_image_token"]] = GLOBAL_IMAGE_TOKEN
    renames = {old: new for old, new in renames.items() if old != new and new not in vocab}
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    for added in data["added_tokens"]:
        added["content"] = renames.get(added["content"], added["content"])
    exported = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), clean_up_tokenization_spaces=False,
        **{name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
           if getattr(tokenizer, name, None) is not None})
    if len(exported) > cfg.lm_vocab_size:
        raise ExportError(f"The tokenizer has {len(exported)} tokens but the model only lm_vocab_size="
                          f"{cfg.lm_vocab_size} rows; export with the tokenizer the model was trained with (--tokenizer).")
    fillers = [FILLER.format(i) for i in range(len(exported), cfg.lm_vocab_size)]
    needed = [t for t in (GLOBAL_IMAGE_TOKEN, FAKE_IMAGE_TOKEN, END_OF_UTTERANCE) if t not in exported.get_vocab()]
    exported.add_tokens([AddedToken(t, special=True, normalized=False) for t in fillers + needed], special_tokens=True)
    exported.chat_template = LIST_CONTENT_PREFIX + cfg.lm_chat_template
    if exported.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_id:
        raise ExportError(f"The exported tokenizer's {IMAGE_TOKEN} has id {exported.convert_tokens_to_ids(IMAGE_TOKEN)}, "
                          f"the model's image token id is {cfg.image_token_id}.")
    return exported


def image_processor_kwargs(cfg: VLMConfig) -> dict[str, Any]:
    """`Idefics3ImageProcessorPil` settings closest to `image_processor_for(cfg)`: exact for one
    tile per image; for split images, see `processor_differences`."""
    from transformers.image_utils import PILImageResampling

    return dict(
        do_convert_rgb=True, do_resize=cfg.splits_images, size={"longest_edge": cfg.max_img_size},
        resample=PILImageResampling.BICUBIC, do_image_splitting=cfg.splits_images,
        max_image_size={"longest_edge": cfg.vit_img_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[cfg.vit_img_mean] * 3, image_std=[cfg.vit_img_std] * 3, do_pad=True)


def build_processor(tokenizer: Any, cfg: VLMConfig):
    """An `Idefics3Processor` over the exported tokenizer (from `export_tokenizer`)."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    return Idefics3Processor(Idefics3ImageProcessorPil(**image_processor_kwargs(cfg)), tokenizer,
                             image_seq_len=cfg.mp_image_token_length, chat_template=tokenizer.chat_template)


def set_generation_defaults(hf_model: Any, tokenizer: Any) -> None:
    """Stop at the chat template's end of turn, as `nanovlm generate` does; pad with the pad token."""
    from nanovlm.inference import stop_token

    hf_model.generation_config.eos_token_id = stop_token(tokenizer)
    hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
    hf_model.generation_config.bos_token_id = None


def image_string(cfg: VLMConfig) -> str:
    """The exported tokens nanovlm writes for an image of one tile (what a one-tile model was trained on)."""
    return _image_string_prefix(cfg) + IMAGE_TOKEN * cfg.mp_image_token_length


def transformers_usage(cfg: VLMConfig) -> str:
    """`TRANSFORMERS_USAGE` with this model's trained prompt: for one tile per image, its image
    string in the text and the tokenizer and image processor called apart."""
    if cfg.splits_images:
        return TRANSFORMERS_USAGE.replace("EXACT_PROMPT", SPLIT_PROMPT)
    prefix = _image_string_prefix(cfg)
    expression = (f'"{prefix}" + ' if prefix else "") + f'"{IMAGE_TOKEN}" * {cfg.mp_image_token_length}'
    return TRANSFORMERS_USAGE.replace("EXACT_PROMPT", EXACT_PROMPT.replace("IMAGE_STRING", expression))


def _image_string_prefix(cfg: VLMConfig) -> str:
    if "global_image_token" in cfg.vlm_extra_tokens:
        return GLOBAL_IMAGE_TOKEN
    return "<row_1_col_1>" if "r1c1" in cfg.vlm_extra_tokens else ""


def processor_differences(cfg: VLMConfig) -> list[str]:
    """What Idefics3's processor does differently from nanovlm's pipeline for this model, one
    sentence each (the export's warnings and its model card's Limitations)."""
    ours = f"`{IMAGE_TOKEN}` x {cfg.mp_image_token_length}"
    notes = [
        f"Prompt: Idefics3's processor writes an image as `{FAKE_IMAGE_TOKEN}` `{GLOBAL_IMAGE_TOKEN}` {ours} "
        f"`{FAKE_IMAGE_TOKEN}` (and split images as `{FAKE_IMAGE_TOKEN}` `<row_i_col_j>` {ours} per tile, a newline "
        "after each row of tiles, then the global view); nanovlm's image string, which this model was trained on, "
        f"is `{image_string(cfg)}` for one tile and has no `{FAKE_IMAGE_TOKEN}`. Tokens the processor needs and the "
        "model never saw were added with mean embeddings. How to load shows the trained prompt.",
        "Pixels: nanovlm's with transformers' PIL image processor (`AutoProcessor.from_pretrained(..., "
        "backend=\"pil\")`, the default without torchvision >= 0.27); the torchvision one resizes differently.",
        "Several images: nanovlm writes `<image: i>` before each image of a prompt with several images; "
        "Idefics3's processor does not.",
    ]
    if cfg.splits_images:
        resize = ("up-scales" if cfg.resize_to_max_side_len else "never up-scales; Idefics3 also up-scales")
        notes.append(
            "Image splitting: Idefics3's processor resizes the long side to max_img_size="
            f"{cfg.max_img_size} (short side truncated to an even number), then again to tile multiples; nanovlm "
            f"resizes once, straight to tile multiples, and {resize} small images. Its global view comes last "
            "(nanovlm: first) and is a PIL bicubic resize of the 8-bit image (nanovlm: bilinear with antialiasing "
            "of the float image). Split tiles equal nanovlm's only where the first resize already lands on tile "
            "multiples; global views never do.")
        if "global_image_token" not in cfg.vlm_extra_tokens:
            notes.append("Global view: this model has none; Idefics3's processor adds one to every split image.")
    if cfg.vit_img_mean == 0.0:
        notes.append("A tile that is all 0.0 after normalisation (an all-black tile with pixels in [0, 1]) is taken "
                     "for padding by Idefics3's model and dropped, so its image tokens find no features.")
    return notes
