"""Train a small byte-level BPE tokenizer offline and save it as a normal HF tokenizer directory.

`train_bpe_tokenizer(texts, vocab_size, out_dir)` writes a directory that
`AutoTokenizer.from_pretrained(out_dir)` (and so `get_tokenizer(out_dir, ...)`) loads.
`vocab_size` counts everything in the base vocabulary: the 256 byte symbols, the merges and
the special tokens. If the corpus runs out of merges before `vocab_size` (small synthetic
corpora do), the vocabulary is filled with `<|reserved_i|>` tokens so its length is exactly
`vocab_size`: the VLM's own tokens (`<|image|>`) must land at `lm_base_vocab_size`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# ChatML tokens, with the ids cosmo2/SmolLM2 give them (0, 1, 2).
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir`, return the HF tokenizer.

    Deterministic for the same texts in the same order. Special tokens take the lowest ids
    (in the order given); EOS is the end of an assistant turn (`<|im_end|>` for ChatML).
    """
    special_tokens = list(special_tokens)
    for name, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if token not in special_tokens:
            raise ValueError(f"{name}={token!r} is not among special_tokens={special_tokens}; add it there.")
    min_size = len(special_tokens) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte symbols and "
                         f"{len(special_tokens)} special tokens; use vocab_size >= {min_size}.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    missing = vocab_size - tokenizer.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        logger.info("BPE corpus ran out of merges; filling %d slots with <|reserved_i|> tokens.", missing)
        tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf_tokenizer.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_dir))
    logger.info("Saved a %d-token byte-level BPE tokenizer to %s.", vocab_size, out_dir)
    return hf_tokenizer


def train_tokenizer_on_rows(rows: Iterable[dict], vocab_size: int, out_dir: str | Path,
                            **kwargs) -> PreTrainedTokenizerFast:
    """Train on the text of nanoVLM-schema rows (`texts`: [{user, assistant}]) plus the ChatML
    role names, so the prompt scaffolding gets its own merges."""
    def corpus() -> Iterable[str]:
        yield "user\nassistant\nsystem\n"
        for row in rows:
            for turn in row.get("texts") or []:
                yield f"user\n{turn.get('user', '')}\nassistant\n{turn.get('assistant', '')}\n"

    return train_bpe_tokenizer(corpus(), vocab_size, out_dir, **kwargs)

