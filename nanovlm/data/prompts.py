"""Turn a conversation (nanoVLM `texts` turns + the tile grids of its images) into token ids and labels.

The chat template renders the conversation; the image string (`get_image_string`: the global
and tile tokens, `mp_image_token_length` image tokens per tile) opens the first user turn, as in
nanoVLM; image tokens already in the text are removed (as nanoVLM does). The rendered text is cut
into segments at each assistant answer and each segment is tokenized on its own, so that
`prompt_ids` (everything before the last answer: what `generate` is given at evaluation) is
exactly a prefix of `input_ids`. Labels keep the answer tokens and the special token that
closes the answer (`<|im_end|>` in ChatML) and are -100 everywhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from nanovlm.data.processors import Grid, get_image_string

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]       # unshifted: labels[t] is input_ids[t] where trained, else -100
    prompt_ids: tuple[int, ...]   # input_ids before the last assistant answer
    answer: str                   # the last assistant answer


class ConversationEncoder:
    def __init__(self, tokenizer, image_token_length: int, cache_size: int = 65536):
        if not getattr(tokenizer, "image_token", None):
            raise ValueError("The tokenizer has no image_token; load it with get_tokenizer(..., "
                             "extra_special_tokens={'image_token': '<|image|>'}).")
        if tokenizer.chat_template is None:
            raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has no chat template; pass "
                             "VLMConfig.lm_chat_template to get_tokenizer.")
        self.tokenizer = tokenizer
        self.image_token_length = image_token_length
        # Answers end with the template's end-of-turn token, an added (special) token.
        self._closing_ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.cache_size = cache_size
        self.encode = lru_cache(maxsize=cache_size)(self._encode)

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) and Ray pickle datasets
        state = dict(self.__dict__)
        del state["encode"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.encode = lru_cache(maxsize=self.cache_size)(self._encode)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, user: str, grids: Sequence[Grid]) -> tuple[int, ...]:
        """Ids of a one-turn prompt about images of `grids`, ready for generation: what
        `nanovlm generate` feeds the model (a prefix of the training ids of the same turn)."""
        messages = [{"role": "user", "content": self._opening(self._plain(user), tuple(grids))}]
        return tuple(self._ids(self._render(messages, add_generation_prompt=True)))

    def _opening(self, user: str, grids: tuple[Grid, ...]) -> str:
        """The first user turn: the image string, then the text."""
        return get_image_string(self.tokenizer, grids, self.image_token_length) + user

    def _plain(self, text: str) -> str:
        """`text` without image tokens: only the image string may hold them."""
        if self.tokenizer.image_token in text:
            logger.warning("Removed image tokens %r found in the text of a turn.", self.tokenizer.image_token)
            text = text.replace(self.tokenizer.image_token, "")
        return text

    def _encode(self, turns: tuple[tuple[str, str], ...], grids: tuple[Grid, ...]) -> EncodedConversation:
        """`turns`: ((user, assistant), ...), at least one; the images of `grids` open the first turn."""
        if not turns:
            raise ValueError("A conversation needs at least one (user, assistant) turn.")
        turns = tuple((self._plain(user), self._plain(assistant)) for user, assistant in turns)
        messages: list[dict] = []
        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        prompt_ids: list[int] = []
        for k, (user, assistant) in enumerate(turns):
            messages.append({"role": "user", "content": self._opening(user, grids) if k == 0 else user})
            with_prompt = self._render(messages, add_generation_prompt=True)
            prompt_part = self._suffix(rendered, with_prompt)
            ids = self._ids(prompt_part)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
            prompt_ids = list(input_ids)

            messages.append({"role": "assistant", "content": assistant})
            rendered = self._render(messages, add_generation_prompt=False)
            answer_part = self._suffix(with_prompt, rendered)
            ids, answer_labels = self._label_answer(answer_part, assistant)
            input_ids += ids
            labels += answer_labels
        return EncodedConversation(tuple(input_ids), tuple(labels), tuple(prompt_ids), turns[-1][1])

    def _suffix(self, prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise ValueError("The chat template does not render a conversation as a prefix of its "
                             "continuation; nanovlm needs a template like ChatML (VLMConfig.lm_chat_template).")
        return text[len(prefix):]

    def _label_answer(self, segment: str, answer: str) -> tuple[list[int], list[int]]:
        """Ids of an assistant segment (answer + end-of-turn + template glue) and their labels:
        the tokens that overlap the answer text, then the special token right after it."""
        start = segment.find(answer)
        if start < 0:
            raise ValueError(f"The chat template changed the assistant text {answer!r}; cannot find it to label.")
        end = start + len(answer)
        encoding = self.tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        last = -1
        for i, (token_start, token_end) in enumerate(encoding["offset_mapping"]):
            if token_start < end and token_end > start:
                labels[i] = ids[i]
                last = i
        if last + 1 < len(ids) and ids[last + 1] in self._closing_ids:
            labels[last + 1] = ids[last + 1]
        return ids, labels
