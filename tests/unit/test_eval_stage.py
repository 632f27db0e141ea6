"""The eval stage kind: its metrics (pure functions, checked by hand and against lmms-eval's and pycocoevalcap's
own scorers on the same predictions), its schema and planner handoff, and how its numbers reach the status."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from typing import Any

import pytest
from vlm_core import kinds
from vlm_core.spec import SpecError, parse_job
from vlm_operator import observe, planner
from vlm_operator.status_model import StageStatus
from vlm_trainer.evaluation import scoring
from vlm_trainer.evaluation.generate import make_item

pytestmark = pytest.mark.unit


# --- metrics by hand ------------------------------------------------------------------------------------------


def test_vqa_normalisation_follows_the_official_steps():
    n = scoring.normalize_answer
    assert n("Two dogs.") == "2 dogs"
    assert n("The red circle!") == "red circle"
    assert n("dont") == "don't" and n("Yes, it is") == "yes it is"
    assert n("3.5") == "3.5" and n("1,000") == "1000"


def test_vqa_accuracy_is_min_1_matches_over_3_averaged_over_leave_one_out():
    ten = ["2"] * 3 + ["3"] * 7
    # 3 matching answers: the 3 subsets without one of them see 2 (2/3), the 7 others 3 (1)
    assert scoring.vqa_accuracy("two", ten) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert scoring.vqa_accuracy("3", ten) == pytest.approx(1.0)
    # 2 matching answers of 10: the 2 subsets without one of them see 1 match (1/3), the 8 others 2 (2/3)
    assert scoring.vqa_accuracy("2", ["2", "2"] + ["x"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert scoring.vqa_accuracy("4", ten) == 0.0


def test_exact_match_relaxed_and_multiple_choice():
    assert scoring.exact_match("A red circle.", ["red circle"]) == 1.0
    assert scoring.exact_match("red", ["blue"]) == 0.0
    assert scoring.relaxed_accuracy("10.4", ["10"]) == 1.0 and scoring.relaxed_accuracy("10.6", ["10"]) == 0.0
    assert scoring.relaxed_accuracy("Paris", ["paris"]) == 1.0 and scoring.relaxed_accuracy("50%", ["0.5"]) == 1.0
    options = ["red", "green", "blue"]
    for answer in ("B", "(B)", "B. green", "The answer is B", "green"):
        assert scoring.multiple_choice_accuracy(answer, ["B"], options) == 1.0, answer
    assert scoring.multiple_choice_accuracy("red or green", ["B"], options) == 0.0  # two options: no pick
    assert scoring.multiple_choice_accuracy("C", ["blue"], options) == 1.0  # the reference spelled out
    assert scoring.options_in("which colour ?\nA. red\nB. green") == ["red", "green"]


def test_pope_counts_yes_as_positive():
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("Yes", "yes"), ("maybe", "yes")]
    s = scoring.pope_scores(pairs)
    # tp 2, fp 1, fn 1 ("maybe" is neither yes nor no: not a false negative, as lmms-eval counts it)
    assert s["pope_precision"] == pytest.approx(2 / 3) and s["pope_recall"] == pytest.approx(2 / 3)
    assert s["pope_f1"] == pytest.approx(2 / 3) and s["pope_accuracy"] == pytest.approx(3 / 6)
    assert s["pope_yes_ratio"] == pytest.approx(3 / 6) and s["pope_reference_yes_share"] == pytest.approx(4 / 6)


# What pycocoevalcap's own PTBTokenizer (Stanford CoreNLP, Java) returned for these captions, run once on this
# machine (pycocoevalcap 1.2, OpenJDK): the trainer's images have no Java, so the Python tokenizer must match it.
PTB_JAVA = {
    "A well-known man, riding a 3.5 m horse.": "a well-known man riding a 3.5 m horse",
    "The dog's bone; can't you see?": "the dog 's bone ca n't you see",
    "A cat... sitting on 100% cotton!": "a cat sitting on 100 % cotton",
    'She said "hi" -- then left.': "she said hi then left",
    "Two people at the U.S. border": "two people at the u.s. border",
    "I'm sure they're here: it's 5:30 pm": "i 'm sure they 're here it 's 5:30 pm",
    "A [small] {blue} e-mail icon": "a -lsb- small -rsb- -lcb- blue -rcb- e-mail icon",
    "It's a \"red\" (bright) circle; isn't it?": "it 's a red -lrb- bright -rrb- circle is n't it",
}


def test_captions_are_tokenised_as_pycocoevalcaps_ptb_tokenizer_does():
    for text, java in PTB_JAVA.items():
        assert scoring.ptb_tokenize(text) == java, text


def test_caption_scores_are_pycocoevalcaps_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    items = [("A man riding a brown horse on the beach.", ["a man rides a brown horse on a beach", "a rider on a horse"]),
             ("Two dogs play with a red ball.", ["two dogs playing with a red ball in the grass"]),
             ("A plate of food.", ["a plate with rice and vegetables", "food on a white plate"])]
    got = scoring.caption_scores(items)
    res = {i: [scoring.ptb_tokenize(p)] for i, (p, _) in enumerate(items)}
    gts = {i: [scoring.ptb_tokenize(r) for r in refs] for i, (_, refs) in enumerate(items)}
    assert got["caption_bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert got["caption_cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    same = scoring.caption_scores([(r[0], r) for _, r in items])
    assert same["caption_bleu4"] > 0.99 and same["caption_cider"] > got["caption_cider"] > 0


def test_aggregate_scores_each_sample_by_its_metrics():
    def s(metrics, pred, refs, options=()):
        return scoring.score_sample(scoring.Scored("k", pred, list(refs), list(metrics), options=list(options)))

    out = scoring.aggregate([
        s(["exact_match"], "red", ["red"]), s(["exact_match"], "red", ["blue"]),
        s(["pope"], "yes", ["yes"]), s(["pope"], "yes", ["no"]),
        s(["multiple_choice"], "A", ["A"], ["x", "y"]),
        s(["vqa", "exact_match"], "2", ["2"] * 10),
    ])
    assert out["samples"] == 6 and out["samples_exact_match"] == 3
    assert out["exact_match"] == pytest.approx(2 / 3) and out["vqa_accuracy"] == 1.0
    assert out["multiple_choice_accuracy"] == 1.0 and out["pope_precision"] == 0.5 and out["samples_pope"] == 2


# --- parity with the reference scorers (lmms-eval's own functions on the same predictions) ----------------------

def lmms_scorer(module: str) -> Any:
    """lmms-eval's own scoring module `lmms_eval.tasks.<module>` (lmms-eval==0.7.3, installed with --no-deps: its
    requirements pin a CUDA torchvision and dozens of packages the scorers do not use). The package's
    `lmms_eval/tasks/__init__.py` loads the whole task registry and those dependencies, so it is bypassed: the
    `lmms_eval.tasks` package is registered by its folder, and only the scoring files run."""
    import importlib
    import importlib.util
    import os
    import sys
    import types

    if "lmms_eval.tasks" not in sys.modules:
        spec = importlib.util.find_spec("lmms_eval")
        assert spec is not None and spec.submodule_search_locations, "lmms-eval==0.7.3 is not installed"
        tasks = types.ModuleType("lmms_eval.tasks")
        tasks.__path__ = [os.path.join(list(spec.submodule_search_locations)[0], "tasks")]
        sys.modules["lmms_eval.tasks"] = tasks
    return importlib.import_module(f"lmms_eval.tasks.{module}")


VQA_CASES = [
    ("two", ["2"] * 3 + ["3"] * 7),
    ("2", ["2", "2"] + ["two dogs"] * 8),
    ("Two dogs.", ["2 dogs"] * 4 + ["dogs"] * 6),
    ("dont know", ["don't know"] * 10),
    ("yes", ["yes"] * 10),
    ("The cat", ["cat", "a cat", "the cat", "kitty", "cat", "cat", "cats", "cat", "feline", "cat"]),
    ("red circle!", ["red circle"] * 2 + ["red"] * 8),
    ("1,000", ["1000"] * 3 + ["1,000"] * 7),
    ("ten", ["10"] * 10),
    ("no", ["yes"] * 10),
]
POPE_CASES = [("yes", "yes"), ("Yes", "yes"), ("no", "yes"), ("no", "no"), ("yes", "no"), ("yes.", "yes"),
              ("maybe", "no"), ("No", "no"), ("yes", "yes"), ("no", "yes")]


def test_vqa_accuracy_equals_lmms_evals_vqav2_scorer():
    vqav2_process_results = lmms_scorer("vqav2.utils").vqav2_process_results

    for i, (pred, answers) in enumerate(VQA_CASES):
        doc = {"question_id": i, "answers": [{"answer": a, "answer_id": j} for j, a in enumerate(answers)]}
        ref = vqav2_process_results(copy.deepcopy(doc), [pred])["exact_match"]
        assert scoring.vqa_accuracy(pred, answers) == pytest.approx(ref), (pred, answers)


def test_pope_equals_lmms_evals_pope_scorer():
    pope = lmms_scorer("pope.utils")

    results = [pope.pope_process_results({"question_id": i, "answer": gt}, [pred])
               for i, (pred, gt) in enumerate(POPE_CASES)]
    ours = scoring.pope_scores(POPE_CASES)
    for name, agg, key in (("accuracy", pope.pope_aggregate_accuracy, "pope_accuracy"),
                           ("precision", pope.pope_aggregate_precision, "pope_precision"),
                           ("recall", pope.pope_aggregate_recall, "pope_recall"),
                           ("f1_score", pope.pope_aggregate_f1_score, "pope_f1"),
                           # lmms-eval's "yes_ratio" is the share of yes among the references
                           ("yes_ratio", pope.pope_aggregate_yes_ratio, "pope_reference_yes_share")):
        assert ours[key] == pytest.approx(agg([r[f"pope_{name}"] for r in results])), name


MC_CASES = [("A", "A"), ("B", "A"), ("(C)", "C"), ("D. blue", "D"), ("The answer is B", "B"), ("C", "B"),
            ("(A)", "A"), ("answer: D", "D")]


def test_multiple_choice_equals_lmms_evals_choice_extraction():
    extract_mcq_answer = lmms_scorer("_task_utils.mcq_extract").extract_mcq_answer

    options = ["red", "green", "blue", "yellow"]
    for pred, gold in MC_CASES:
        theirs = float(extract_mcq_answer(pred, list("ABCD")) == gold)
        assert scoring.multiple_choice_accuracy(pred, [gold], options) == theirs, pred


# --- the stage in the schema and the planner -----------------------------------------------------------------


def job(stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "training.vlm.dev/v1alpha1", "kind": "VLMTrainingJob", "metadata": {"name": "j"},
            "spec": {"model": {"visionEncoder": "file:///m/v", "languageModel": "file:///m/l"},
                     "storage": {"uri": "file:///tmp/store"}, "stages": stages}}


def align(name: str = "align") -> dict[str, Any]:
    return {"name": name, "type": "align", "maxSteps": 2, "data": {"shards": ["a.tar"], "format": "caption"}}


def ev(name: str = "eval", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "eval", "data": {"shards": ["h.tar"], "format": "conversation"}, **extra}


def test_the_row_reads_a_model_trains_nothing_and_owns_eval():
    row = kinds.kind("eval")
    assert row.output == "report" and not row.trains and row.reads_model and row.own_fields == ("eval",)
    assert "eval" in kinds.MODEL_TYPES and "eval" not in kinds.TRAINING_TYPES + kinds.DATA_TYPES


def test_an_eval_stage_needs_no_steps_and_gets_default_settings():
    stage = parse_job(job([align(), ev()])).spec.stages[1]
    assert stage.eval is not None and stage.eval.metrics == ["exact_match"] and stage.eval.max_new_tokens == 16


def test_bad_eval_settings_name_the_field_and_what_is_accepted():
    with pytest.raises(SpecError) as err:
        parse_job(job([ev(eval={"metrics": ["bleu"]})]))
    assert "eval.metrics" in str(err.value) and "vqa" in str(err.value)
    with pytest.raises(SpecError, match="eval: only valid for type eval"):
        parse_job(job([{**align(), "eval": {}}]))
    with pytest.raises(SpecError, match="data.format"):
        parse_job(job([ev(data={"shards": ["h.tar"], "format": "preference"})]))


def test_eval_reads_the_previous_training_stage_and_hands_no_weights_on():
    j = parse_job(job([align("a"), ev("e1"), {**align("b"), "type": "instruct"}, ev("e2"),
                       ev("e3", eval={"model": "s3://other/job/x/final"})]))
    configs = planner.resolve_stages(j)
    assert configs[1].init_from == "file:///tmp/store/j/a/final"
    assert configs[1].stage.data.shards == ["file:///tmp/store/h.tar"]
    assert configs[2].init_from == "file:///tmp/store/j/a/final"  # not e1's final/: eval holds no weights
    assert configs[3].init_from == "file:///tmp/store/j/b/final"
    assert configs[4].init_from == "s3://other/job/x/final"


def test_the_crd_lets_an_eval_stage_go_without_steps():
    from vlm_operator.crd import _training_rules

    rule = next(r["rule"] for r in _training_rules() if "maxSteps" in r["rule"])
    assert "self.type in ['eval']" in rule


# --- its numbers in the status ----------------------------------------------------------------------------


def test_the_manifests_eval_reaches_the_stage_status_and_the_succeeded_message():
    manifest = {"eval": {"exact_match": 0.75, "pope_f1": 0.5, "samples": 8, "bad": "x"}}
    assert observe.stage_report("eval", manifest) == {"exact_match": 0.75, "pope_f1": 0.5, "samples": 8.0}
    assert observe.stage_report("align", manifest) is None
    stages = [StageStatus(name="align", type="align", phase="Succeeded"),
              StageStatus(name="eval", type="eval", phase="Succeeded", metrics={"exact_match": 0.75})]
    j = parse_job(job([align(), ev()]))
    phase, message = observe.job_phase_and_message(j, stages, planner.Done())
    assert phase == "Succeeded" and message == "all 2 stage(s) succeeded; eval: eval exact_match 0.750"


def test_a_stage_status_keeps_its_metrics_once_read():
    j = parse_job(job([align(), ev()]))
    o = planner.StageObservation("Succeeded", committed=True, report={"exact_match": 1.0})
    first = observe.stage_status(j, 1, observe.parse_status(None), o, planner.Done(), [], "now")
    assert first.metrics == {"exact_match": 1.0}
    prev = observe.parse_status({"stages": [{"name": "align", "type": "align"}, observe.dump_status(
        observe.JobStatus(stages=[first]))["stages"][0]]})
    later = observe.stage_status(j, 1, prev, planner.StageObservation("Succeeded", committed=True), planner.Done(),
                                 [], "now")
    assert later.metrics == {"exact_match": 1.0}


# --- what a held-out sample asks -----------------------------------------------------------------------------


def _raw(doc: dict[str, Any], key: str = "s0") -> dict[str, Any]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "json": json.dumps(doc).encode()}


def test_a_sample_is_its_prompt_its_last_answer_and_its_task():
    conv = [{"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "which one ?\nA. red\nB. blue"}, {"from": "gpt", "value": "A"}]
    item = make_item(_raw({"conversations": conv, "task": "multiple_choice"}), 0, "conversation", ["exact_match"])
    assert [m["role"] for m in item.prompt] == ["user", "assistant", "user"]
    assert item.scored.references == ["A"] and item.scored.metrics == ["multiple_choice"]
    assert item.scored.options == ["red", "blue"]
    vqa = make_item(_raw({"conversations": conv[:2], "answers": [{"answer": "red"}] * 10}), 1, "conversation",
                    ["vqa", "exact_match"])
    assert vqa.scored.references == ["red"] * 10 and vqa.scored.metrics == ["vqa", "exact_match"]
    cap = make_item(_raw({"caption": "a red square"}), 2, "caption", ["caption"])
    assert cap.prompt == [{"role": "user", "content": "<image>"}] and cap.scored.references == ["a red square"]
    from vlm_trainer.samples import SampleError

    with pytest.raises(SampleError, match="json task 'bleu' is not a metric; accepted: vqa"):
        make_item(_raw({"conversations": conv[:2], "task": "bleu"}), 3, "conversation", ["exact_match"])


def test_batches_are_formed_over_the_whole_set_so_ranks_do_not_change_them(tmp_path):
    from vlm_trainer.evaluation.generate import my_batches

    path = tmp_path / "h.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(7):
            raw = _raw({"conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]},
                       f"s{i}")
            for ext in ("png", "json"):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(raw[ext])
                tar.addfile(info, io.BytesIO(raw[ext]))

    def batches(rank: int, world: int) -> list[list[int]]:
        return [[it.index for it in b] for b in my_batches([f"file://{path}"], fmt="conversation", metrics=["exact_match"],
                                                           batch_size=3, max_samples=None, rank=rank, world=world, bad=[])]

    assert batches(0, 1) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(0, 2) == [[0, 1, 2], [6]] and batches(1, 2) == [[3, 4, 5]]


# --- evaluation by generation on a training stage -----------------------------------------------------------


def test_a_training_stage_may_evaluate_by_generation_with_whole_parameters_only():
    evaluation = {"shards": ["h.tar"], "everySteps": 5}
    j = parse_job(job([{**align(), "evaluation": evaluation}]))
    config = planner.resolve_stage(j, 0)
    assert config.stage.evaluation.shards == ["file:///tmp/store/h.tar"] and config.stage.evaluation.every_steps == 5
    with pytest.raises(SpecError, match="evaluation: generates with the model being trained, so it needs strategy "
                                        "ddp or zero2"):
        parse_job(job([{**align(), "strategy": "fsdp", "evaluation": evaluation}]))
    with pytest.raises(SpecError, match="evaluation: an eval stage is itself an evaluation"):
        parse_job(job([ev(evaluation=evaluation)]))


def test_evaluation_settings_do_not_count_in_the_fingerprint():
    from vlm_core import fingerprint

    plain = planner.resolve_stage(parse_job(job([align()])), 0)
    evaluated = planner.resolve_stage(parse_job(job([{**align(), "evaluation": {"shards": ["h.tar"]}}])), 0)
    assert fingerprint.settings(plain) == fingerprint.settings(evaluated)
