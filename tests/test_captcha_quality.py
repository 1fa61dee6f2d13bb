"""benchmarks/captcha_quality.py: the template-matching baselines and the per-category table, on the validation
set and on the held-out rendering set, with a tiny untrained export (the model's numbers mean nothing here)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.captcha_quality import COVERAGES, METHODS, QualitySamples, confidence_rows, heldout_with_train_factors
from conftest import run_python
from data.captcha import CATEGORIES, RENDER_HELDOUT, RENDER_TRAIN, SyntheticCaptchaDataset, generate_captcha
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


def test_train_factors_change_only_the_named_factor():
    """--train_factors: a held-out sample with its gap style or compression drawn as in training keeps its
    layout, labels and the other held-out factors; with its backgrounds so drawn it keeps its category and size
    and its gap style and compression; with all three factors nothing held out is left."""
    styles, compressions = set(), set()
    for i in range(6):
        seed = (2_000_003, 0, i)
        base = generate_captcha(seed, RENDER_HELDOUT)
        for factor, key in (("gap_style", "gap_style"), ("compression", "compression")):
            s = generate_captcha(seed, heldout_with_train_factors([factor]))
            assert (s["gap"], s["slider"], s["category"], s["shape"]) == (base["gap"], base["slider"], base["category"],
                                                                          base["shape"])
            assert all(s["render"][k] == base["render"][k] for k in {"background", "gap_style", "compression"} - {key})
            (styles if factor == "gap_style" else compressions).add(s["render"][key])
        s = generate_captcha(seed, heldout_with_train_factors(["backgrounds"]))
        assert s["category"] == base["category"] and s["image"].shape == base["image"].shape
        assert s["render"]["background"] in RENDER_TRAIN.uses()["photos"] | RENDER_TRAIN.uses()["procedural"]
        assert (s["render"]["gap_style"], s["render"]["compression"]) == ("bevel", "webp")
    assert "bevel" not in styles and "webp" not in compressions  # the swapped factor drew from the training mix
    assert heldout_with_train_factors(["backgrounds", "gap_style", "compression"]) == RENDER_TRAIN
    assert heldout_with_train_factors([]) == RENDER_HELDOUT


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from models.lite_hrnet import LiteHRNet18FPN

    return make_export(tmp_path_factory.mktemp("quality") / "final", LiteHRNet18FPN, in_chans=4, fpn_channels=16,
                       head_channels=16)


@pytest.mark.parametrize("which", ["val", "heldout", "train"])
def test_quality_table_on_each_set(tmp_path, tiny_export, which):
    n = 6
    extra = {"train": ["--match_weights", "0,0.5"], "heldout": ["--train_factors", "gap_style", "--by", "background"],
             "val": []}[which]
    proc = run_python("benchmarks/captcha_quality.py", "--checkpoint", str(tiny_export), "--set", which,
                      "--val_size", str(n), "--batch_size", "3", "--device", "cpu", "--out", str(tmp_path), *extra)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "captcha_quality.json").read_text())
    assert report["set"] == which
    assert report["seed"] == {"val": 1_000_003, "heldout": 2_000_003, "train": 3_000_017}[which]
    assert report["train_factors"] == (["gap_style"] if which == "heldout" else [])
    assert len(report["tables"]) == (3 if which == "train" else 2)
    if which == "train":
        assert [(r["match_weight"], r["n"]) for r in report["tables"][2]["rows"]] == [(0.0, n), (0.5, n)]
    rows = report["tables"][0]["rows"]
    confidence = report["tables"][1]["rows"]
    assert [(r["coverage"], r["n"]) for r in confidence] == [(100 * c, int(np.ceil(c * n - 1e-9))) for c in COVERAGES]
    overall = rows[-len(METHODS):]  # the "all" rows
    for method in ("model", "two-stage"):  # everything answered: the main table's gap column
        assert confidence[0][f"{method} gap_hit_le_5px"] == overall[METHODS.index(method)]["gap_hit_le_5px"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    assert [(r["method"], r["group"]) for r in rows] == [(m, g) for g in groups for m in METHODS]
    if which == "heldout":  # --by background: the held-out photos and mosaics
        assert report["by"] == "background" and groups[-1] == "all"
        assert set(groups[:-1]) <= set(RENDER_HELDOUT.photos) | {"mosaic"}
    else:
        assert report["by"] == "category" and groups == [*CATEGORIES, "all"]
    by = {(r["method"], r["group"]): r for r in rows}
    assert sum(by[("model", g)]["n"] for g in groups[:-1]) == by[("model", "all")]["n"] == n
    assert sum(by[("two-stage", g)]["square_pieces"] for g in groups[:-1]) == by[("two-stage", "all")]["square_pieces"]
    assert f"square matched instead) in {by[('two-stage', 'all')]['square_pieces']}," in " ".join(report["notes"])
    assert all("square_pieces" not in r for r in rows if r["method"] != "two-stage")
    for method in METHODS:
        assert 0 <= by[(method, "all")]["gap_hit_le_5px"] <= 100
    assert ("held-out" in report["notes"][0]) == (which == "heldout")
    rendering = {"val": "validation samples (seed", "train": "training mix (RENDER_TRAIN) (seed",
                 "heldout": "samples (RENDER_HELDOUT, with gap_style as in RENDER_TRAIN) (seed"}[which]
    assert rendering in report["notes"][0]


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


@pytest.mark.parametrize("flags", [["--set", "test"], ["--match_weights", "0,x"], ["--match_weights", "-1"],
                                   ["--train_factors", "gap_style"], ["--set", "heldout", "--train_factors", "colour"]])
def test_bad_flags_are_refused(tiny_export, flags):
    proc = run_python("benchmarks/captcha_quality.py", "--checkpoint", str(tiny_export), *flags)
    named = [f for f in flags if f.startswith("--")][-1]
    assert proc.returncode == 2 and named in proc.stderr.splitlines()[-1], proc.stderr
