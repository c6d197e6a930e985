"""lmms-eval runs our checkpoints on any of its tasks, as nanoVLM's own wrapper lets it run nanoVLM's.

    pip install -e '.[eval]'
    lmms-eval --model nanovlm --model_args checkpoint=runs/demo,batch_size=16 --tasks mmstar
    python -m nanovlm.eval.lmms --model nanovlm --model_args checkpoint=runs/demo --tasks mmstar

The package's `lmms_eval.models` entry point registers the model as `nanovlm` (alias
`nanovlm_ray`), replacing lmms-eval's own `nanovlm` (lmms-engine's SigLIP2 + Qwen3 model, another
project); `python -m nanovlm.eval.lmms` registers it the same way and then runs lmms-eval's CLI,
for an environment where the entry point is not installed. model_args: `checkpoint` (required:
anything `nanovlm generate --checkpoint` takes), `batch_size` (16), `device` (auto),
`tokenizer`, `max_new_tokens` (where the task sets none; 50, as nanoVLM's wrapper).

Requests: a simple model gets `(context, generation_kwargs, doc_to_visual, doc_id, task, split)`,
a chat model `(context, doc_to_messages, generation_kwargs, doc_id, task, split)` (lmms-eval's
api/task.py); lmms-eval resolves `nanovlm` to the chat class unless given --force_simple. Both
build the same question: the task's images and text, through `BatchAnswerer` (the image string, the
chat template, batched greedy generation, the task's `until` strings). Requests are batched by
their generation kwargs, in order. Greedy only: a request asking to sample is answered greedily,
with a warning.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Sequence

from nanovlm.eval.answering import BatchAnswerer, Question
from nanovlm.eval.tasks import DEFAULT_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

MODEL_ID = "nanovlm"
ALIASES = ("nanovlm_ray",)


class LmmsRequests:
    """Answers lmms-eval `generate_until` requests (anything with `.args`) with an `BatchAnswerer`;
    needs nothing of lmms-eval itself. `task_dict` is lmms-eval's {task: {split: docs}}."""

    chat = False

    def __init__(self, answerer: BatchAnswerer, batch_size: int = 16, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.answerer, self.batch_size, self.max_new_tokens = answerer, int(batch_size), int(max_new_tokens)
        self.task_dict: dict[str, Any] = {}
        self._warned_sampling = False

    def question(self, request: Any) -> Question:
        """The question of one request: the task's text and images."""
        if self.chat:
            _, doc_to_messages, _, doc_id, task, split = request.args
            return messages_question(doc_to_messages(self.task_dict[task][split][doc_id]))
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return context, list(visuals or [])

    def generation_kwargs(self, request: Any) -> dict[str, Any]:
        return dict(request.args[2 if self.chat else 1] or {})

    def answer_requests(self, requests: Sequence[Any]) -> list[str]:
        """The answers, in the order of `requests`: batches of requests with equal generation kwargs."""
        answers = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(self.generation_kwargs(request), sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            gen_kwargs = self.generation_kwargs(requests[indices[0]])
            self._check_greedy(gen_kwargs)
            until = gen_kwargs.get("until") or ()
            max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self.answerer.answer([self.question(requests[i]) for i in chunk], max_new_tokens,
                                             [until] if isinstance(until, str) else until)
                for i, text in zip(chunk, texts):
                    answers[i] = text
        return answers

    def _check_greedy(self, gen_kwargs: dict[str, Any]) -> None:
        if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature") or 0) > 0 and not self._warned_sampling:
            self._warned_sampling = True
            logger.warning("A task asks for sampling (%s); nanovlm answers greedily.", gen_kwargs)


def messages_question(messages: Sequence[dict]) -> Question:
    """A chat request's user turns -> (their text, their images), in order; system turns and
    non-image media are left out (a single-turn VLM answers one user turn)."""
    from PIL import Image

    texts, images = [], []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
            if part.get("type") == "text":
                texts.append(part.get("text") or "")
            elif part.get("type") == "image":
                url = part.get("url")
                images.append(Image.open(url) if isinstance(url, str) else url)
    return "\n".join(texts), images


def _adapter_classes():
    """The lmms-eval model classes (importing lmms-eval's base class needs lmms-eval installed)."""
    from lmms_eval.api.model import lmms

    class NanoVLMLmms(lmms):
        """`lmms-eval --model nanovlm --force_simple`: requests with doc_to_visual."""
        is_simple = True
        _requests_class = LmmsRequests

        def __init__(self, checkpoint: str, batch_size: int | str = 16, device: str = "auto",
                     tokenizer: str | None = None, max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS, **kwargs):
            super().__init__()
            if kwargs:
                logger.warning("nanovlm ignores model_args %s.", sorted(kwargs))
            self.answerer = BatchAnswerer.from_checkpoint(checkpoint, tokenizer=tokenizer, device=device)
            self.requests = self._requests_class(self.answerer, int(batch_size), int(max_new_tokens))
            self.batch_size_per_gpu = int(batch_size)

        def generate_until(self, requests) -> list[str]:
            self.requests.task_dict = self.task_dict
            return self.requests.answer_requests(requests)

        def loglikelihood(self, requests):
            raise NotImplementedError("nanovlm answers generate_until requests only (no loglikelihood).")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("nanovlm answers single-turn generate_until requests only.")

    class ChatRequests(LmmsRequests):
        chat = True

    class NanoVLMLmmsChat(NanoVLMLmms):
        """`lmms-eval --model nanovlm`: requests with doc_to_messages."""
        is_simple = False
        _requests_class = ChatRequests

    return NanoVLMLmms, NanoVLMLmmsChat


def __getattr__(name: str):
    # the classes exist once lmms-eval is importable: `nanovlm.eval.lmms.NanoVLMLmms` for its registry
    if name in ("NanoVLMLmms", "NanoVLMLmmsChat"):
        simple, chat = _adapter_classes()
        globals().update(NanoVLMLmms=simple, NanoVLMLmmsChat=chat)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manifest():
    """The `lmms_eval.models` entry point: our model under MODEL_ID and ALIASES."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(MODEL_ID, simple_class_path=f"{__name__}.NanoVLMLmms",
                         chat_class_path=f"{__name__}.NanoVLMLmmsChat", aliases=ALIASES)


def register() -> None:
    """Put the model in lmms-eval's registry of this process (what the entry point does at import)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m nanovlm.eval.lmms ARGS`: lmms-eval's CLI with ARGS and this model registered."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    lmms_eval_main()


if __name__ == "__main__":
    main()
