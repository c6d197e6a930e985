"""lmms-eval runs our checkpoints (nanovlm.eval.lmms): its registry resolves `nanovlm` to our
classes, and its request objects (`Instance`s built as its tasks build them, with its MMStar
task's own doc_to_visual / doc_to_text / process_results / aggregation) get the answers
`nanovlm eval` gives, scored the same. Offline: the documents are shapes questions in MMStar's
schema, lmms-eval's Hub loading is not used."""

import pytest
import torch

from nanovlm.config import preset
from nanovlm.eval.answering import BatchAnswerer
from nanovlm.eval.benchmark_data import shapes_mmstar_rows
from nanovlm.eval.runner import run_task
from nanovlm.eval.tasks import TASKS
from nanovlm.models import VisionLanguageModel

lmms_eval = pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance  # noqa: E402


def _task_utils_without_the_task_registry():
    """lmms-eval's MMStar task functions. `lmms_eval.tasks/__init__` builds the whole task registry,
    which needs lmms-eval's full dependency set (accelerate, evaluate, sacrebleu, ...); the task's
    utils.py needs none of it, so the package is entered as a plain namespace."""
    import sys
    import types
    from pathlib import Path

    if "lmms_eval.tasks" not in sys.modules:
        package = types.ModuleType("lmms_eval.tasks")
        package.__path__ = [str(Path(lmms_eval.__file__).parent / "tasks")]
        sys.modules["lmms_eval.tasks"] = package
    from lmms_eval.tasks.mmstar import utils
    return utils


mmstar = _task_utils_without_the_task_registry()

from nanovlm.eval import lmms  # noqa: E402

POST_PROMPT = {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly"}
GEN_KWARGS = {"max_new_tokens": 6, "until": ["\n\n"], "do_sample": False}  # what a task's YAML passes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    vlm, _ = preset("tiny", vit_img_size=32, vit_hidden_dim=32, vit_inter_dim=64, vit_n_heads=2, vit_n_blocks=1,
                    lm_hidden_dim=32, lm_inter_dim=64, lm_n_heads=2, lm_n_kv_heads=1, lm_n_blocks=1,
                    mp_image_token_length=4)
    torch.manual_seed(0)
    model = VisionLanguageModel(vlm, load_backbone=False)
    with torch.no_grad():   # varied answers: larger weights than the init's
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("ck") / "model"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def docs():
    return shapes_mmstar_rows(12, question_types="colour,shape", img_size=32)


def _simple_requests(docs):
    return [Instance("generate_until", (mmstar.mmstar_doc_to_text(doc, POST_PROMPT), dict(GEN_KWARGS),
                                        mmstar.mmstar_doc_to_visual, i, "mmstar", "val"),
                     idx=0, metadata={"task": "mmstar", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


def _chat_requests(docs):
    def doc_to_messages(doc):   # what lmms-eval's ConfigurableMessagesTask builds from the same task
        content = [{"type": "image", "url": image} for image in mmstar.mmstar_doc_to_visual(doc)]
        return [{"role": "user", "content": content + [{"type": "text",
                                                         "text": mmstar.mmstar_doc_to_text(doc, POST_PROMPT)}]}]
    return [Instance("generate_until", ("", doc_to_messages, dict(GEN_KWARGS), i, "mmstar", "val"),
                     idx=0, metadata={"task": "mmstar", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


def _lmms_eval_scores(docs, answers):
    """lmms-eval's own MMStar scoring of `answers`: overall and by category."""
    results = [mmstar.mmstar_process_results(doc, [answer]) for doc, answer in zip(docs, answers)]
    by_category = {}
    for result in results:
        for key, value in result.items():
            by_category.setdefault(key, []).append(value)
    return {key: mmstar.mmstar_aggregate_results(values) for key, values in by_category.items()}


def test_lmms_eval_resolves_nanovlm_to_the_adapter():
    from lmms_eval.models import get_model

    lmms.register()
    assert get_model("nanovlm") is lmms.NanoVLMLmmsChat
    assert get_model("nanovlm", force_simple=True) is lmms.NanoVLMLmms
    assert get_model("nanovlm_ray") is lmms.NanoVLMLmmsChat


@pytest.mark.parametrize("kind", ["simple", "chat"])
def test_lmms_eval_requests_get_the_answers_and_scores_of_nanovlm_eval(checkpoint, docs, kind):
    cls, requests = (lmms.NanoVLMLmms, _simple_requests(docs)) if kind == "simple" else \
        (lmms.NanoVLMLmmsChat, _chat_requests(docs))
    model = cls(checkpoint=checkpoint, batch_size="5", device="cpu")
    model.task_dict = {"mmstar": {"val": docs}}
    answers = model.generate_until(requests)

    ours, predictions = run_task(BatchAnswerer.from_checkpoint(checkpoint, device="cpu"), TASKS["mmstar"], docs,
                                 batch_size=1, max_new_tokens=GEN_KWARGS["max_new_tokens"])
    assert answers == [p["output"] for p in predictions]
    assert len(set(answers)) > 1
    scores = _lmms_eval_scores(docs, answers)
    # lmms-eval reports percentages
    assert scores["average"] == pytest.approx(100 * ours["accuracy"])
    assert {k: v for k, v in scores.items() if k != "average"} == pytest.approx(
        {k: 100 * v for k, v in ours["by_category"].items()})


def test_a_request_asking_to_sample_is_answered_greedily_with_a_warning(checkpoint, docs, caplog):
    model = lmms.NanoVLMLmms(checkpoint=checkpoint, device="cpu")
    model.task_dict = {"mmstar": {"val": docs}}
    requests = _simple_requests(docs[:2])
    greedy = model.generate_until(requests)
    for request in requests:
        request.arguments[1].update(do_sample=True, temperature=0.7)
    with caplog.at_level("WARNING"):
        assert model.generate_until(requests) == greedy
    assert "answers greedily" in caplog.text


ANSWERS = ["A", "b", "(C)", "The answer is D.", "I think B. No, the answer is C", "C: a circle", "B) green",
           "D is right", "Options A and B", "none", "", "A. red", "answer: (B)", "I choose D", "c.", "The best option is A",
           "ABCD", "Bravo", "It is C", "between A, B"]
VQA_ANSWERS = ["Two Dogs.", "the Coca-Cola", "3.5", "it's 10,000!", "yes", "a b c", "Dont know", "one,two",
               "x-ray / MRI", "none of them", "(left)", "U.S.A.", "5 o'clock"]


def test_our_letter_parser_agrees_with_lmms_eval():
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    from nanovlm.eval.metrics import mcq_letter

    assert [mcq_letter(a) for a in ANSWERS] == [extract_mcq_answer(a, ["A", "B", "C", "D"]) or "" for a in ANSWERS]


def test_our_vqa_normalisation_agrees_with_lmms_eval():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    from nanovlm.eval.evalai import normalize_vqa_answer

    processor = EvalAIAnswerProcessor()
    assert [normalize_vqa_answer(a) for a in VQA_ANSWERS] == [processor(a) for a in VQA_ANSWERS]
