"""benchmarks/captcha_quality.py: the template-matching baselines and the per-category table, on the validation
set and on the held-out rendering set, with a tiny untrained export (the model's numbers mean nothing here)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.captcha_quality import COVERAGES, METHODS, QualitySamples, confidence_rows
from conftest import run_python
from data.captcha import CATEGORIES, RENDER_HELDOUT, SyntheticCaptchaDataset, generate_captcha
from models.captcha_match import match_gap
from test_predict import make_export

TM_ARGS = SimpleNamespace(row_window=None, strip=0.3, tophat_px=7, rim_level=40)


def test_template_matching_with_the_true_piece_finds_the_gap():
    """TM-oracle: Canny-edge matching of the true piece lands on the gap label on most validation samples."""
    errors = []
    for i in range(10):
        s = generate_captcha((1_000_003, 0, i))
        errors.append(np.abs(np.subtract(match_gap(s["image"], s["slider_box"], s["piece_alpha"], None), s["gap"])).max())
    assert sum(e <= 2 for e in errors) >= 7, errors


def test_heldout_samples_are_the_training_scripts_held_out_set():
    heldout, val = QualitySamples(3, 2_000_003, TM_ARGS, RENDER_HELDOUT), QualitySamples(3, 2_000_003, TM_ARGS)
    reference = SyntheticCaptchaDataset(3, seed=2_000_003, fresh_each_epoch=False, render=RENDER_HELDOUT)[1]
    mine = heldout[1]
    assert torch.equal(mine["image"], reference["image"]) and torch.equal(mine["gap"], reference["gap"])
    # the same confusion category, another rendering
    assert val[1]["category"] == mine["category"] and not torch.equal(val[1]["image"], mine["image"])


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from models.lite_hrnet import LiteHRNet18FPN

    return make_export(tmp_path_factory.mktemp("quality") / "final", LiteHRNet18FPN, in_chans=4, fpn_channels=16,
                       head_channels=16)


@pytest.mark.parametrize("which", ["val", "heldout", "train"])
def test_quality_table_on_each_set(tmp_path, tiny_export, which):
    n = 6
    sweep = ["--match_weights", "0,0.5"] if which == "train" else []
    proc = run_python("benchmarks/captcha_quality.py", "--checkpoint", str(tiny_export), "--set", which,
                      "--val_size", str(n), "--batch_size", "3", "--device", "cpu", "--out", str(tmp_path), *sweep)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "captcha_quality.json").read_text())
    assert report["set"] == which
    assert report["seed"] == {"val": 1_000_003, "heldout": 2_000_003, "train": 3_000_017}[which]
    assert len(report["tables"]) == (3 if sweep else 2)
    if sweep:
        assert [(r["match_weight"], r["n"]) for r in report["tables"][2]["rows"]] == [(0.0, n), (0.5, n)]
    rows = report["tables"][0]["rows"]
    confidence = report["tables"][1]["rows"]
    assert [(r["coverage"], r["n"]) for r in confidence] == [(100 * c, int(np.ceil(c * n))) for c in COVERAGES]
    for method in ("model", "two-stage"):  # everything answered: the main table's gap column
        assert confidence[0][f"{method} gap_hit_le_5px"] == rows[-len(METHODS) + METHODS.index(method)]["gap_hit_le_5px"]
    assert [(r["method"], r["category"]) for r in rows] == [(m, c) for c in (*CATEGORIES, "all") for m in METHODS]
    by = {(r["method"], r["category"]): r for r in rows}
    assert sum(by[("model", c)]["n"] for c in CATEGORIES) == by[("model", "all")]["n"] == n
    for method in METHODS:
        assert 0 <= by[(method, "all")]["gap_hit_le_5px"] <= 100
    assert ("held-out" in report["notes"][0]) == (which == "heldout")


def test_confidence_rows_keep_the_most_confident_answers():
    score = np.array([0.9, 0.1, 0.5, 0.8, 0.5])
    errors = {"model": np.array([1.0, 30.0, 4.0, 3.0, 6.0]), "two-stage": np.array([0.5, 1.0, 9.0, 1.5, 2.5])}
    rows = confidence_rows(score, errors, coverages=(1.0, 0.8, 0.6, 0.4))
    assert [(r["coverage"], r["n"], r["min_gap_score"]) for r in rows] == [(100, 5, 0.1), (80, 4, 0.5), (60, 3, 0.5),
                                                                           (40, 2, 0.8)]
    # kept at 60 %: samples 0, 3 and the first of the tied 0.5s (index 2)
    assert rows[2]["model gap_hit_le_5px"] == 100 and rows[2]["two-stage gap_hit_le_5px"] == pytest.approx(200 / 3)
    assert rows[0]["model gap_hit_le_5px"] == 60 and rows[0]["two-stage gap_hit_le_2px"] == 60
    assert rows[1]["model gap_hit_le_5px"] == 75 and rows[3]["model gap_hit_le_2px"] == 50


@pytest.mark.parametrize("flags", [["--set", "test"], ["--match_weights", "0,x"], ["--match_weights", "-1"]])
def test_bad_flags_are_refused(tiny_export, flags):
    proc = run_python("benchmarks/captcha_quality.py", "--checkpoint", str(tiny_export), *flags)
    assert proc.returncode == 2 and flags[0] in proc.stderr.splitlines()[-1], proc.stderr
