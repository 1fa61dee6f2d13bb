"""VQA metrics: answer normalisation, the official soft accuracy, exact match, per-type summary.

Follows the VQA evaluation rules (GT-Vision-Lab ``vqaEval.py``, reference/vqa.md §3.4):
an answer is normalised by whitespace clean-up, punctuation handling and number/article/
contraction handling; a prediction scores ``min(1, #humans that agree / 3)``, averaged over
the ten leave-one-annotator-out subsets. Percentages (x100) in ``vqa_metrics``; the
per-question functions return fractions or booleans.
"""
from __future__ import annotations

import re
from collections import Counter

# Deleted when next to a space (or when the answer holds a digit,digit number), else
# replaced by a space. The apostrophe is not in the list, so "don't" survives.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern is meant as "a period not inside a number", but its look-behind is
# written as a look-ahead, so it removes every period not followed by a digit ("5." -> "5",
# "3.5" and ".5" kept). We reproduce the behaviour, not the intent.
PERIOD = re.compile(r"\.(?!\d)")

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# Words are lowercased before this lookup, so only lowercase keys can ever apply (the official
# table's capitalised entries such as "Im" are dead and left out). Like the official table it
# also rewrites a few real words ("hed", "shed", "wed").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldnt've": "couldn't've", "couldn'tve": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock",
    "oughtnt": "oughtn't", "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "werent": "weren't",
    "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Punctuation step of the official evaluation (decisions look at the input text, not the
    partly processed one, as the official code does)."""
    has_number_comma = THOUSANDS_COMMA.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if has_number_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop articles, restore contractions; single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """Full official normalisation, e.g. "The Two dogs!" -> "2 dogs", "1,000" -> "1000"."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_soft_accuracy(pred: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction, in [0, 1].

    mean over i of min(1, #{j != i : answers[j] == pred} / 3): each of the n "leave one
    annotator out" subsets credits the prediction fully once 3 of the others gave it. With 10
    answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    As in the official code the prediction is fully normalised, but the GT answers only get
    whitespace clean-up, plus ``process_punctuation`` when they disagree (GT files are expected
    to hold normalised answers already, as VQA v2's do). So ten copies of "Yes!" never match,
    and neither does "yes!" among disagreeing answers (it becomes "yes " with a trailing space).

    Pitfall: with a single GT answer the only subset is empty and the score is always 0 (the
    simpler min(#matches / 3, 1) would cap at 1/3). For single-answer data use
    ``exact_match``; the synthetic generator stores 10 copies so that soft == exact.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"vqa_soft_accuracy needs a non-empty list of GT answers, got {answers!r}")
    pred = normalize_answer(pred)
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(g == pred for g in gts)
    # Leaving out answer i removes one match exactly when answers[i] itself matches.
    per_subset = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(per_subset) / len(per_subset)


def exact_match(pred: str, answer: str) -> bool:
    """True when both strings are equal after ``normalize_answer``."""
    return normalize_answer(pred) == normalize_answer(answer)


def most_frequent_answer(answers: list[str]) -> str:
    """Most frequent normalised answer (ties: the earliest). Also gives a training set's majority answer."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"most_frequent_answer needs a non-empty list of answers, got {answers!r}")
    return Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]


def vqa_metrics(
    preds: list[str],
    answers: list[list[str]],
    question_types: list[str] | None = None,
    majority_answer: str | None = None,
) -> dict[str, float]:
    """Dataset-level VQA metrics, all percentages.

    - ``exact_match``: normalised prediction == normalised most frequent GT answer of the question
      (for single-answer data, that answer).
    - ``accuracy``: the official soft accuracy (``vqa_soft_accuracy``) when every question has >= 10
      GT answers; otherwise the same number as ``exact_match`` (the soft score is meaningless with
      fewer answers, see the pitfall there).
    - ``majority_baseline`` (only when ``majority_answer`` is given, e.g. ``most_frequent_answer`` of
      the training answers): ``exact_match`` of always answering it.
    - With ``question_types``: ``accuracy/<type>``, ``exact_match/<type>``, ``count/<type>`` and, when
      ``majority_answer`` is given, ``majority_baseline/<type>``.
    """
    n = len(preds)
    if n == 0:
        raise ValueError("vqa_metrics got no predictions: the evaluation set is empty")
    if len(answers) != n:
        raise ValueError(f"preds and answers lengths differ: {n} vs {len(answers)}")
    if question_types is not None and len(question_types) != n:
        raise ValueError(f"preds and question_types lengths differ: {n} vs {len(question_types)}")
    for i, gts in enumerate(answers):
        if isinstance(gts, str) or len(gts) == 0:
            raise ValueError(f"answers[{i}] must be a non-empty list of strings, got {gts!r}")

    references = [most_frequent_answer(gts) for gts in answers]
    exact = [100.0 * (normalize_answer(p) == r) for p, r in zip(preds, references)]
    use_soft = all(len(gts) >= 10 for gts in answers)
    accuracy = [100.0 * vqa_soft_accuracy(p, gts) for p, gts in zip(preds, answers)] if use_soft else exact
    baseline = None
    if majority_answer is not None:
        majority = normalize_answer(majority_answer)
        baseline = [100.0 * (majority == r) for r in references]

    def summarise(idx: list[int], suffix: str) -> dict[str, float]:
        out = {
            f"accuracy{suffix}": sum(accuracy[i] for i in idx) / len(idx),
            f"exact_match{suffix}": sum(exact[i] for i in idx) / len(idx),
        }
        if baseline is not None:
            out[f"majority_baseline{suffix}"] = sum(baseline[i] for i in idx) / len(idx)
        return out

    metrics = summarise(list(range(n)), "")
    if question_types is not None:
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(question_types):
            groups.setdefault(str(t), []).append(i)
        for t in sorted(groups):
            metrics.update(summarise(groups[t], f"/{t}"))
            metrics[f"count/{t}"] = float(len(groups[t]))
    return metrics
