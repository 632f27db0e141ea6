"""The hallucination variant: its data carries the prior (and held-out data breaks it), on-policy pairs reject the
model's own hallucinated answers, the hallucination / POPE scoring, and its job files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from vlm_core.spec import parse_job
from vlm_operator.planner import resolve_stage
from vlm_quickstart import prior
from vlm_quickstart.components import build_tokenizer, vocabulary
from vlm_quickstart.hallucination import HallucinationRecipe, job_documents, variant_checks
from vlm_quickstart.shapes import read_shards, shard_paths
from vlm_quickstart.vocab import COLOURS, SHAPES
from vlm_trainer.samples import SampleEncoder


def _on_prior_share(samples) -> float:
    return sum(prior.on_prior(s.colour, s.shape) for s in samples) / len(samples)


def test_training_samples_pair_each_colour_with_its_shape_at_the_set_rate_heldout_breaks_it():
    train = prior.make_prior_samples("train", 2000, seed=0, pairing=prior.TRAIN_PAIRING)
    assert abs(_on_prior_share(train) - prior.TRAIN_PAIRING) < 0.02
    for colour in COLOURS:  # per colour, not only on average
        mine = [s for s in train if s.colour == colour]
        assert abs(_on_prior_share(mine) - prior.TRAIN_PAIRING) < 0.05
        # the rare pairings exist, each of the two other shapes
        assert {s.shape for s in mine} == set(SHAPES)
    heldout = prior.make_prior_samples("heldout", 1200, seed=0, pairing=prior.UNIFORM)
    assert abs(_on_prior_share(heldout) - 1 / 3) < 0.04  # uniform: the prior no longer predicts the shape
    combos = Counter((s.colour, s.shape) for s in heldout)
    assert len(combos) == 12 and min(combos.values()) >= 60
    assert {s.key for s in heldout}.isdisjoint(s.key for s in train)


def test_stage0_documents_carry_the_prior_and_every_word_is_in_the_variants_vocabulary():
    docs = prior.text_documents(2000, seed=1, pairing=prior.TRAIN_PAIRING)
    opening = [d.split(" . ")[0].split()[-2:] for d in docs]  # "... a <colour> <shape>"
    assert abs(sum(prior.on_prior(c, s) for c, s in opening) / len(opening) - prior.TRAIN_PAIRING) < 0.02
    assert any(" yes </s>" in d for d in docs) and any(" no </s>" in d for d in docs)
    tok = build_tokenizer(extra_words=prior.EXTRA_WORDS)
    unk = tok.unk_token_id
    assert all(unk not in tok(d, add_special_tokens=False).input_ids for d in docs[:500])
    # the default vocabulary keeps every id; the variant's words come last
    assert vocabulary(prior.EXTRA_WORDS)[: len(vocabulary())] == vocabulary()
    assert vocabulary(prior.EXTRA_WORDS)[len(vocabulary()) :] == list(prior.EXTRA_WORDS)


def test_conversations_answer_right_and_probe_with_adversarial_negatives(tmp_path):
    paths = prior.write_prior_shards(str(tmp_path), "train", 200, seed=2, pairing=prior.TRAIN_PAIRING, per_shard=100)
    again = prior.write_prior_shards(str(tmp_path / "b"), "train", 200, seed=2, pairing=prior.TRAIN_PAIRING, per_shard=100)
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]  # deterministic
    probes = 0
    for _, _, meta in read_shards(shard_paths(paths, "conversation")):
        conv = meta["conversations"]
        for user, answer in zip(conv[::2], conv[1::2], strict=True):
            q = user["content"].replace("<image>\n", "").replace("<image>", "")
            if q.startswith("is there a "):
                probes += 1
                probed = q.split()[3]
                assert answer["content"] == ("yes" if probed == meta["shape"] else "no")
                if answer["content"] == "no" and not prior.on_prior(meta["colour"], meta["shape"]):
                    assert probed == prior.PRIOR_SHAPE[meta["colour"]]  # POPE's adversarial negative
    assert probes >= 40


def test_an_onpolicy_hallucinated_answer_becomes_rejected_against_the_models_own_right_answer():
    q = prior.Question("shape", "what shape is it ?", "red", "square")
    pairs = prior.onpolicy_pairs(q, ["circle", "square", "circle", "triangle"])
    assert pairs == [
        {"prompt": "<image>\nwhat shape is it ?", "chosen": "square", "rejected": "circle"},
        {"prompt": "<image>\nwhat shape is it ?", "chosen": "square", "rejected": "triangle"},
    ]
    # no right answer among the model's: the reference is chosen
    cap = prior.Question("caption", None, "red", "square")
    assert prior.onpolicy_pairs(cap, ["a red circle", "a red circle"]) == [
        {"prompt": "<image>", "chosen": "a red square", "rejected": "a red circle"}
    ]
    # all right (or empty): nothing to prefer
    assert prior.onpolicy_pairs(cap, ["a red square", "a red square", ""]) == []
    # a probe answered yes for the absent prior shape is rejected against "no"
    probe = prior.Question("probe_no", "is there a circle ?", "red", "square", probed="circle")
    assert probe.reference == "no"
    assert prior.onpolicy_pairs(probe, ["yes", "yes"]) == [
        {"prompt": "<image>\nis there a circle ?", "chosen": "no", "rejected": "yes"}
    ]


def test_hallucination_names_what_is_not_in_the_image():
    cap = prior.Question("caption", None, "red", "square")
    assert prior.hallucinated(cap, "a red circle") and not prior.correct(cap, "a red circle")
    assert prior.hallucinated(cap, "a blue square")
    assert not prior.hallucinated(cap, "a red") and not prior.correct(cap, "a red")  # incomplete, not hallucinated
    assert prior.correct(cap, "a red square") and not prior.hallucinated(cap, "a red square")
    shape = prior.Question("shape", "what shape is it ?", "red", "square")
    assert prior.hallucinated(shape, "circle") and prior.correct(shape, "square")
    no = prior.Question("probe_no", "is there a circle ?", "red", "square", probed="circle")
    yes = prior.Question("probe_yes", "is there a square ?", "red", "square", probed="square")
    assert prior.hallucinated(no, "yes") and not prior.hallucinated(no, "no")
    assert not prior.hallucinated(yes, "no")  # a miss, not a hallucination
    assert prior.yes_no("no .") == "no" and prior.yes_no("yes") == "yes" and prior.yes_no("it is not") == "no"


def test_questions_ask_every_kind_with_the_adversarial_absent_shape():
    rng = np.random.default_rng(0)
    qs = prior.questions_for(rng, "red", "square", 0)
    assert [q.kind for q in qs] == list(prior.KINDS)
    assert qs[4].probed == "square" and qs[5].probed == "circle"  # the prior's shape, absent here
    assert [q.reference for q in qs] == ["a red square", "a red square", "red", "square", "yes", "no"]
    on = prior.questions_for(rng, "red", "circle", 1)
    assert on[5].probed in ("square", "triangle")


def test_pope_scores_and_rates_split_by_the_prior():
    # 4 present (yes expected), 4 absent: said yes to 3 present and to 2 absent
    answers = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no"]
    truth = [True, True, True, True, False, False, False, False]
    s = prior.pope_scores(answers, truth)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == pytest.approx(3 / 4)
    assert s["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35) and s["yes_ratio"] == pytest.approx(5 / 8)
    assert s["accuracy"] == pytest.approx(5 / 8) and s["false_yes_rate"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    kept = prior.questions_for(rng, "red", "circle", 0)  # keeps the prior
    broken = prior.questions_for(rng, "red", "square", 1)  # breaks it
    judged = [(q, q.reference) for q in kept] + [(q, "circle" if q.kind == "shape" else q.reference) for q in broken]
    r = prior.rates(judged)
    assert r["answers_generated"] == 8  # captions (bare, prompted), colour, shape per image; probes apart
    assert r["hallucination_rate"] == pytest.approx(1 / 8)
    assert r["hallucination_rate_prior_kept"] == 0 and r["hallucination_rate_prior_broken"] == pytest.approx(1 / 4)
    assert r["shape_answer_accuracy"] == pytest.approx(0.5) and r["answer_accuracy"] == pytest.approx(0.75)
    assert r["pope"]["accuracy"] == 1.0


def test_job_files_share_align_and_instruct_so_the_dpo_file_runs_dpo_only(tmp_path):
    recipe = HallucinationRecipe()
    docs = job_documents(str(tmp_path), seed=3, recipe=recipe)
    base, dpo_job = parse_job(docs["instruct.yaml"]), parse_job(docs["dpo.yaml"])
    assert base.name == dpo_job.name == "hallucination"
    assert [s.name for s in base.spec.stages] == ["align", "instruct"]
    assert [s.name for s in dpo_job.spec.stages] == ["align", "instruct", "dpo"]
    # identical settings: the planner finds align and instruct committed and starts at dpo
    assert [s.model_dump() for s in dpo_job.spec.stages[:2]] == [s.model_dump() for s in base.spec.stages]
    assert dpo_job.spec.model == base.spec.model and dpo_job.spec.storage == base.spec.storage
    align, instruct, dpo = dpo_job.spec.stages
    assert all("/data/train-caption-" in s for s in align.data.shards)
    assert all("/data/heldout-" in s for s in align.data.eval_shards + instruct.data.eval_shards)
    assert dpo.data.format == "preference" and dpo.data.shards == [f"file://{tmp_path}/data/pairs-preference-00000.tar"]
    assert dpo.data.eval_shards == [f"file://{tmp_path}/data/pairseval-preference-00000.tar"]
    assert dpo.max_steps == recipe.dpo_steps and dpo.dpo.beta == pytest.approx(recipe.dpo_beta)


def test_checks_take_the_best_alignment_stage_against_instruct():
    def row(stage, rate, acc, ppl, aligned):
        return {"stage": stage, "hallucination_rate": rate, "answer_accuracy": acc, "text_perplexity": ppl,
                "aligned": aligned, "hallucination_cut": 1 - rate / 0.2}

    rows = [row("instruct", 0.2, 0.8, 1.1, False), row("dpo", 0.08, 0.85, 1.2, True), row("grpo", 0.15, 0.9, 1.1, True)]
    c = variant_checks(1.0, rows)
    assert c["instruct_hallucination_rate_min"]["met"]
    assert c["best_hallucination_cut_min"]["value"] == pytest.approx(0.6) and c["best_hallucination_cut_min"]["met"]
    assert c["best_answer_accuracy_kept"]["value"] == pytest.approx(0.05)
    assert c["best_perplexity_ratio_max"]["value"] == pytest.approx(1.2) and "(dpo)" in c["best_perplexity_ratio_max"]["measures"]
    # a bigger cut that loses the language model (ppl over the bound) is not the one the checks take
    c = variant_checks(1.0, [*rows, row("ppo", 0.02, 0.9, 1.4, True)])
    assert "(dpo)" in c["best_hallucination_cut_min"]["measures"] and c["best_perplexity_ratio_max"]["met"]
    c = variant_checks(1.0, [rows[0], row("ppo", 0.02, 0.9, 1.4, True)])
    assert not c["best_perplexity_ratio_max"]["met"] and "(ppo)" in c["best_perplexity_ratio_max"]["measures"]
    low = variant_checks(1.0, [row("instruct", 0.05, 0.8, 1.1, False)])
    assert not low["instruct_hallucination_rate_min"]["met"] and low["best_hallucination_cut_min"]["value"] is None


class _Processor:
    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, tokenizer.chat_template


def test_pair_records_encode_in_the_dpo_stages_preference_format(tmp_path):
    """The trainer's own encoder reads an on-policy pair: the rejected answer is the model's, labels on answers only."""
    from vlm_quickstart.components import build_image_processor

    tok = build_tokenizer(extra_words=prior.EXTRA_WORDS)
    enc = SampleEncoder(_Processor(tok, build_image_processor()), image_token_count=16, max_length=96)
    (sample,) = prior.make_prior_samples("pool", 1, seed=0, pairing=prior.UNIFORM)
    q = prior.Question("probe_no", "is there a circle ?", sample.colour, sample.shape, probed="circle")
    if sample.shape == "circle":
        q = prior.Question("probe_no", "is there a square ?", sample.colour, sample.shape, probed="square")
    (pair,) = prior.onpolicy_pairs(q, ["yes"])
    rec = {**pair, "kind": q.kind, "colour": q.colour, "shape": q.shape}
    out = enc.encode({"__key__": "k", "png": sample.png, "json": json.dumps(rec).encode()}, "preference")
    assert tok.decode([t for t in out.chosen.labels if t != -100]).split() == ["no", "</s>"]
    assert tok.decode([t for t in out.rejected.labels if t != -100]).split() == ["yes", "</s>"]


def test_reward_ppo_and_grpo_files_start_from_instruct_and_name_their_reward(tmp_path):
    docs = job_documents(str(tmp_path), seed=3, recipe=HallucinationRecipe())
    reward, ppo, grpo = (parse_job(docs[f]) for f in ("reward.yaml", "ppo.yaml", "grpo.yaml"))
    assert [s.name for s in reward.spec.stages] == ["align", "instruct", "reward"]
    assert reward.spec.stages[2].data.shards == [f"file://{tmp_path}/data/pairs-preference-00000.tar"]
    for job, algorithm, before in ((ppo, "ppo", ["align", "instruct", "reward"]), (grpo, "grpo", ["align", "instruct"])):
        assert [s.name for s in job.spec.stages] == [*before, algorithm]
        rl = job.spec.stages[-1]
        assert rl.rl.algorithm == algorithm and rl.data.format == "conversation"
        assert rl.data.shards == [f"file://{tmp_path}/data/rlprompts-conversation-00000.tar"]
        # the planner starts the rl stage from instruct's final/ (a reward stage is no policy)
        config = resolve_stage(job, len(job.spec.stages) - 1)
        assert config.init_from is not None and config.init_from.endswith("/instruct/final")
    # PPO is scored by the reward stage's model (the one reward.yaml commits: same stage, same settings); GRPO by
    # the exact-match verifier
    assert ppo.spec.stages[2] == reward.spec.stages[2]
    ppo_config = resolve_stage(ppo, 3)
    assert ppo_config.stage.rl.reward.model is not None and ppo_config.stage.rl.reward.model.endswith("/reward/final")
    assert grpo.spec.stages[2].rl.reward.verifier == "exact"


def test_rl_prompts_end_with_the_reference_answer():
    q = prior.Question("probe_no", "is there a circle ?", "red", "square", probed="circle")
    rec = prior.rl_prompt_record(q)
    assert rec["conversations"] == [{"role": "user", "content": "<image>\nis there a circle ?"},
                                    {"role": "assistant", "content": "no"}]
