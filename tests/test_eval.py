"""Batched answers for evaluation (nanovlm.eval.answering): a batch of questions with different
prompt lengths and image counts, left-padded into one greedy `generate` call, gets the answers
each question gets alone, including rows that stop at the end-of-turn token before the others."""

import pytest
import torch
from PIL import Image

from nanovlm.config import preset
from nanovlm.eval.answering import BatchAnswerer
from nanovlm.models import VisionLanguageModel

MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    vlm, _ = preset("tiny", vit_img_size=32, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
                    lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=2)
    torch.manual_seed(0)
    m = VisionLanguageModel(vlm, load_backbone=False).eval()
    with torch.no_grad():
        # sharp, varied logits: no near-ties for greedy choices and answers that depend on the prompt
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        m.decoder.token_embedding.weight.normal_(0.0, 1.0)
    return m


def _image(seed, size=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


QUESTIONS = [
    ("What colour is the shape?", [_image(1)]),
    ("Is there a large red circle in the top left corner of the picture?", [_image(2)]),
    ("Which two shapes are shown?", [_image(3), _image(4, (40, 24))]),
    ("Describe it.", []),
    ("How many?\nOptions: A: 1, B: 2", [_image(5)]),
]


def _one_by_one(answerer, questions):
    return [answerer.answer([q], MAX_NEW)[0] for q in questions]


def test_batched_greedy_answers_equal_batch_one_answers(model, tokenizer):
    answerer = BatchAnswerer(model, tokenizer, device="cpu")
    lengths = [len(answerer.prompt(text, images)[0]) for text, images in QUESTIONS]
    assert len(set(lengths)) == len(QUESTIONS)              # every row padded by a different amount
    alone = _one_by_one(answerer, QUESTIONS)
    assert len(set(alone)) > 1 and all(alone)                # answers that depend on the question
    assert answerer.answer(QUESTIONS, MAX_NEW) == alone
    assert answerer.answer(QUESTIONS[::-1], MAX_NEW) == alone[::-1]


def test_a_row_that_stops_early_leaves_the_others_unchanged(model, tokenizer):
    # Make a token that the first answer emits mid-way the end of turn: that row stops there,
    # the others go on; each answer still equals the question's answer alone.
    free = BatchAnswerer(model, tokenizer, device="cpu")
    ids = free.prompt(*QUESTIONS[0])[0]
    out = model.generate(torch.tensor([ids]), [free.prompt(*QUESTIONS[0])[1]], max_new_tokens=MAX_NEW,
                         greedy=True)[0].tolist()
    stop = out[len(out) // 2]
    stopping = BatchAnswerer(model, tokenizer, device="cpu", stop_token_id=stop)
    alone = _one_by_one(stopping, QUESTIONS)
    assert alone[0] == tokenizer.decode(out[:out.index(stop)], skip_special_tokens=True).strip()
    assert any(len(a) > len(alone[0]) for a in alone[1:])   # others go on past the first row's stop
    assert stopping.answer(QUESTIONS, MAX_NEW) == alone


def test_until_strings_cut_an_answer_as_lmms_eval_does(model, tokenizer):
    answerer = BatchAnswerer(model, tokenizer, device="cpu")
    full = answerer.answer(QUESTIONS[:1], MAX_NEW)[0]
    cut = full[len(full) // 2:len(full) // 2 + 2]
    assert answerer.answer(QUESTIONS[:1], MAX_NEW, until=[cut])[0] == full.split(cut)[0].strip()
