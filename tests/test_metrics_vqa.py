"""VQA normalisation against the official rules; soft accuracy against the leave-one-out formula by hand."""
from __future__ import annotations

import pytest

from metrics.vqa import exact_match, most_frequent_answer, normalize_answer, vqa_metrics, vqa_soft_accuracy


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only none/zero..ten are mapped
        ("The Red Ball", "red ball"),
        ("a dog and an apple", "dog and apple"),
        ("yes!", "yes"),  # not next to a space: replaced by a space, then split away
        ("t-shirt", "t shirt"),
        ("hello - world", "hello world"),  # next to a space: deleted
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("(left)", "left"),
        ("1,000", "1000"),  # digit,digit: the comma is deleted, the number kept whole
        ("1,000 dogs!", "1000 dogs"),  # with a digit,digit number every punctuation mark is deleted
        ("3.5", "3.5"),
        (".5", ".5"),
        ("yes.", "yes"),
        ("mr. smith", "mr smith"),
        ("dont", "don't"),
        ("It isnt", "it isn't"),
        ("cant", "can't"),
        ("don't", "don't"),  # the apostrophe is not punctuation here
        ("\tTwo\n cats ", "2 cats"),
        ("  the   three   ", "3"),
    ],
)
def test_normalize_answer_official_cases(raw, expected):
    assert normalize_answer(raw) == expected


def by_hand(matches: int, n: int = 10) -> float:
    # i among the matching answers sees matches - 1 others, the rest see all matches.
    return (matches * min(1, (matches - 1) / 3) + (n - matches) * min(1, matches / 3)) / n


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_leave_one_out(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert by_hand(matches) == pytest.approx(expected)
    assert vqa_soft_accuracy("two", answers) == pytest.approx(expected)
    # 2 matches: the 2 matching annotators' subsets give 1/3, the 8 others 2/3: (2/3 + 16/3) / 10.
    if matches == 2:
        assert vqa_soft_accuracy("2", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_gt_answers_get_punctuation_only_when_they_disagree():
    assert vqa_soft_accuracy("t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == 1.0  # both sides "t shirt"
    assert vqa_soft_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0  # unanimous: GT kept as "t-shirt"
    # official quirks: GT punctuation is not stripped afterwards ("yes!" -> "yes "), and
    # unanimous GT answers are not normalised at all, so "Yes!" x10 never matches
    assert vqa_soft_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0
    assert vqa_soft_accuracy("yes", ["Yes!"] * 10) == 0.0
    # GT answers never get the number-word step
    assert vqa_soft_accuracy("two", ["two"] * 4 + ["3"] * 6) == 0.0


def test_single_answer_pitfall_and_exact_match():
    assert vqa_soft_accuracy("cat", ["cat"]) == 0.0
    assert exact_match("The cat.", "cat")
    assert not exact_match("cats", "cat")
    m = vqa_metrics(["cat", "dog"], [["cat"], ["cat"]])
    assert m["accuracy"] == m["exact_match"] == 50.0


def test_metrics_soft_with_ten_answers_and_per_type_keys():
    preds = ["2", "red", "yes", "no"]
    answers = [["2"] * 2 + ["3"] * 8, ["red"] * 10, ["yes"] * 10, ["yes"] * 10]
    types = ["count", "color", "yes/no", "yes/no"]
    m = vqa_metrics(preds, answers, types, majority_answer="yes")
    assert m["accuracy"] == pytest.approx(100 * (0.6 + 1 + 1 + 0) / 4)
    assert m["exact_match"] == pytest.approx(50.0)  # "2" is not the majority "3"
    assert m["majority_baseline"] == pytest.approx(50.0)
    assert m["accuracy/count"] == pytest.approx(60.0)
    assert m["exact_match/count"] == 0.0
    assert m["accuracy/yes/no"] == m["exact_match/yes/no"] == 50.0
    assert m["majority_baseline/yes/no"] == 100.0
    assert m["majority_baseline/color"] == 0.0
    assert m["count/yes/no"] == 2.0 and m["count/color"] == 1.0
    assert all(isinstance(v, float) for v in m.values())
    assert set(vqa_metrics(preds, answers)) == {"accuracy", "exact_match"}


def test_mixed_answer_counts_fall_back_to_exact_match_against_majority():
    m = vqa_metrics(["red", "blue"], [["red"] * 2 + ["blue"] * 8, ["blue", "Blue", "red"]])
    assert m["accuracy"] == m["exact_match"] == 50.0
    assert most_frequent_answer(["a dog", "cat", "The dog"]) == "dog"
    assert most_frequent_answer(["cat", "dog"]) == "cat"  # ties: the earliest


def test_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        vqa_metrics([], [])
    with pytest.raises(ValueError, match="lengths differ"):
        vqa_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_metrics(["a"], ["a"])  # a string instead of a list of answers
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_soft_accuracy("a", [])
