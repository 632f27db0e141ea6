"""The field's standard metrics on (prediction, references) pairs: pure Python, no torch.

Each metric is the reference scorer's rule, and a test holds it equal to that scorer on the same predictions:

- `vqa`: VQAv2 accuracy (Antol et al. 2015, as lmms-eval 0.7.3's vqav2 task scores it): the prediction and the
  human answers are normalised (`normalize_answer`: punctuation, lower case, number words to digits, articles
  dropped, contractions restored); a sample scores the mean over its answers of
  min(1, matches among the *other* answers / 3). Needs the ten human answers (json `answers`).
- `exact_match`: 1 when the normalised prediction equals one normalised reference.
- `relaxed`: ChartQA's relaxed accuracy: a number within 5% of a numeric reference, else a case-insensitive
  exact match.
- `multiple_choice`: the option letter read from the answer ("B", "(B)", "B. red", "the answer is B"), else the
  one option whose text the answer names; right when it is the reference's letter.
- `pope`: the yes/no probe of POPE (Li et al. 2023): accuracy, precision, recall, F1 with "yes" as positive, as
  lmms-eval's pope task aggregates them (an answer is its lower-cased, stripped text), plus the yes-ratio of the
  answers (POPE's bias indicator: the share answered "yes") and the share of references that are "yes".
- `caption`: CIDEr-D and BLEU-4 by pycocoevalcap's own scorers (`Cider`, `Bleu(4)`), on captions tokenised like
  its PTBTokenizer (lower case, PTB punctuation tokens dropped) without the Java it needs.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# --- VQAv2 answer normalisation (the official evaluation's steps) ---------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> the contraction ('dont' -> "don't"), as the VQA evaluation restores them: single
    contractions from their plain spelling, double ones from either half-apostrophe spelling ("couldnt've",
    "couldn'tve"). (The official table's capitalised keys, "Im" and "Ive", never match a lower-cased answer.)"""
    single = (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
        "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
        "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
        "there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've "
        "when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
        "you'd you'll you're you've"
    ).split()
    double = (
        "couldn't've hadn't've he'd've it'd've mightn't've shouldn't've she'd've somebody'd've someone'd've "
        "something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've"
    ).split()
    table = {f.replace("'", ""): f for f in single}
    for f in double:
        head, tail = f.split("'", 1)
        table[head + tail] = f  # "couldnt've"
        table[f[::-1].replace("'", "", 1)[::-1]] = f  # "couldn'tve"
    for f, spellings in (("'ow's'at", ("ow's'at", "'ows'at", "'ow'sat")), ("y'all'll", ("yall'll", "y'allll")),
                         ("y'all'd've", ("yall'd've", "y'alld've", "y'all'dve"))):
        table.update(dict.fromkeys(spellings, f))
    return table


_CONTRACTIONS = _contractions()


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The VQAv2 evaluation's normalisation of an answer ('Two dogs.' -> '2 dogs', 'dont' -> "don't"): whitespace,
    punctuation, then lower case, number words to digits, articles dropped and contractions restored."""
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its human answers (usually ten), both normalised as lmms-eval's
    vqav2 task does (always; the original script skipped it where the ten answers agree)."""
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(1 for a in others if a == pred) / 3))
    return statistics.mean(scores)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed correctness: numbers within 5% (relative) of the target, else exact (case-insensitive)."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, references: Sequence[str]) -> float:
    return float(any(relaxed_correct(prediction.strip(), r.strip()) for r in references))


# --- multiple choice ------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_IN_QUESTION = re.compile(r"(?m)^\s*\(?([A-Z])[.):]\s+(.+?)\s*$")
_DECLARED = re.compile(r"(?i)\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?(?![A-Za-z])")
_LEADING = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\].:]?(?=\s|$)")


def options_in(question: str) -> list[str]:
    """The options a question lists one per line ('A. red' / '(B) blue'), in letter order."""
    found = _OPTION_IN_QUESTION.findall(question)
    return [text for _, text in found] if [letter for letter, _ in found] == list(_LETTERS[: len(found)]) else []


def choice_letter(prediction: str, options: Sequence[str]) -> str:
    """The option letter an answer picks, '' when it picks none or is ambiguous.

    A leading label ('B', '(B)', 'B.', 'B) red') or a declaration ('the answer is B') wins; else the one option
    whose normalised text the answer contains."""
    letters = _LETTERS[: max(len(options), 1)] if options else _LETTERS[:8]
    text = prediction.strip()
    m = _LEADING.match(text)
    if m and m.group(1).upper() in letters and (m.group(1).isupper() or len(text) == 1):
        return m.group(1).upper()
    d = _DECLARED.search(text)
    if d and d.group(1) in letters:
        return d.group(1)
    said = f" {normalize_answer(text)} "
    named = [letters[i] for i, o in enumerate(options) if o.strip() and f" {normalize_answer(o)} " in said]
    return named[0] if len(named) == 1 else ""


def reference_letter(reference: str, options: Sequence[str]) -> str:
    """The reference's letter: the reference itself ('B', '(B)') or the option it spells out."""
    letter = choice_letter(reference, options)
    if letter:
        return letter
    norm = normalize_answer(reference)
    return next((_LETTERS[i] for i, o in enumerate(options) if normalize_answer(o) == norm), "")


def multiple_choice_accuracy(prediction: str, references: Sequence[str], options: Sequence[str]) -> float:
    picked = choice_letter(prediction, options)
    return float(bool(picked) and any(picked == reference_letter(r, options) for r in references))


# --- POPE -----------------------------------------------------------------------------------------------------


def pope_label(text: str) -> str:
    """An answer as POPE counts it (lmms-eval's pope task): its lower-cased, stripped text."""
    return text.lower().strip()


def pope_scores(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """(prediction, reference yes/no) pairs -> accuracy, precision, recall, F1, yes-ratio (of the answers)."""
    tp = fp = fn = correct = yes = gt_yes = n = 0
    for pred, ref in pairs:
        p, g = pope_label(pred), pope_label(ref)
        n += 1
        correct += p == g
        yes += p == "yes"
        gt_yes += g == "yes"
        tp += g == "yes" and p == "yes"
        fp += g == "no" and p == "yes"
        fn += g == "yes" and p == "no"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"pope_accuracy": correct / n if n else 0.0, "pope_precision": precision, "pope_recall": recall,
            "pope_f1": f1, "pope_yes_ratio": yes / n if n else 0.0, "pope_reference_yes_share": gt_yes / n if n else 0.0}


# --- captions (pycocoevalcap's scorers) -----------------------------------------------------------------------

# The tokens pycocoevalcap's PTBTokenizer drops after Stanford's PTB tokenizer has split them off (it lower-cases
# first, so the bracket tokens stay, as "-lrb-"), and the brackets' PTB names.
_PTB_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_PTB_TOKEN = re.compile(r"(?:\b[a-z]\.){2,}|\d+(?::\d+)+|\.\.\.|--|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*(?=n't\b)|\w+(?:[-.]\w+)*|[^\s\w]")


def ptb_tokenize(text: str) -> str:
    """A caption as pycocoevalcap's PTBTokenizer leaves it, in Python (no Java): lower case, clitics split ("is
    n't", "it 's"), brackets named, punctuation and quote tokens removed."""
    tokens = (_PTB_BRACKETS.get(t, t) for t in _PTB_TOKEN.findall(text.replace("\n", " ").lower()))
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION)


def caption_scores(items: Sequence[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """CIDEr(-D) and BLEU-4 of (prediction, reference captions) pairs, by pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not items:
        return {}
    res = {i: [ptb_tokenize(p)] for i, (p, _) in enumerate(items)}
    gts = {i: [ptb_tokenize(r) for r in refs] or [""] for i, (_, refs) in enumerate(items)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"caption_bleu4": float(bleu[3]), "caption_cider": float(cider)}


# --- one sample, the whole set --------------------------------------------------------------------------------

PER_SAMPLE = {"vqa": "vqa_accuracy", "exact_match": "exact_match", "relaxed": "relaxed_accuracy",
              "multiple_choice": "multiple_choice_accuracy"}


@dataclass
class Scored:
    """One sample's prediction with what each metric made of it (a line of predictions.jsonl)."""

    key: str
    prediction: str
    references: list[str]
    metrics: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)
    prompt: str = ""

    def line(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "prompt": self.prompt, "prediction": self.prediction,
                               "references": self.references, "metrics": self.metrics, "scores": self.scores}
        if self.options:
            doc["options"] = self.options
        return doc


def score_sample(s: Scored) -> Scored:
    """Fill `s.scores` with the per-sample metrics that apply (POPE and captions are scored over the set)."""
    for m in s.metrics:
        if m == "vqa":
            s.scores["vqa_accuracy"] = vqa_accuracy(s.prediction, s.references)
        elif m == "exact_match":
            s.scores["exact_match"] = exact_match(s.prediction, s.references)
        elif m == "relaxed":
            s.scores["relaxed_accuracy"] = relaxed_accuracy(s.prediction, s.references)
        elif m == "multiple_choice":
            s.scores["multiple_choice_accuracy"] = multiple_choice_accuracy(s.prediction, s.references, s.options)
        elif m == "pope":
            s.scores["pope_correct"] = float(pope_label(s.prediction) == pope_label(s.references[0]))
    return s


def aggregate(samples: Sequence[Scored]) -> dict[str, Any]:
    """The set's metrics: each per-sample metric's mean, POPE's and the caption scores over their samples, and
    the number of samples each metric covered (`samples_<metric>`)."""
    out: dict[str, Any] = {"samples": len(samples)}
    for metric, name in PER_SAMPLE.items():
        values = [s.scores[name] for s in samples if metric in s.metrics]
        if values:
            out[name] = sum(values) / len(values)
            out[f"samples_{metric}"] = len(values)
    pope = [(s.prediction, s.references[0]) for s in samples if "pope" in s.metrics]
    if pope:
        out.update(pope_scores(pope))
        out["samples_pope"] = len(pope)
    caps = [(s.prediction, s.references) for s in samples if "caption" in s.metrics]
    if caps:
        out.update(caption_scores(caps))
        out["samples_caption"] = len(caps)
    return out


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a status line and the gauges show: every float metric (not the sample counts or times)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, float) and k != "wall_seconds"}
