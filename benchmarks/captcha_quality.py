"""Localisation quality per confusion category (or background): a trained run against classic template matching.

    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> [--val_size 300] [--out bench_out]
    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> --set heldout [--out bench_out]
    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> --set train --match_weights 0,0.25,0.5,1,2,4
    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> --set heldout --train_factors gap_style
    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> --set heldout --by background

All four methods see the fixed synthetic validation set of the run (sample i is
generate_captcha((val_seed, 0, i)), exactly the samples train_captcha.py validated on), or with
--set heldout its held-out rendering set (generate_captcha((heldout_seed, 0, i), RENDER_HELDOUT), the
val_heldout/* samples), or with --set train a tuning set in the training mix (generate_captcha((3000017, 0, i),
RENDER_TRAIN): neither validation, held-out nor training samples; the two-stage weight was chosen on it and on
the validation rendering of the same seed, before the held-out set was scored):

- model:     the run's EMA weights (plain weights if the export has none), decoded as in training
             (the peak, the centre of a flat top, the offsets there).
- two-stage: the model's slider, the piece found there (its rim, else a square) matched along the image,
             the gap where edge match + MATCH_WEIGHT x the model's gap probability peaks, and the slider
             at a found ring's centroid (models/captcha_match.two_stage; predict_captcha.py's default).
- TM-oracle: classic edge template matching (reference/captcha.md 10.1, the behaviour of
             ddddocr.slide_match) with the TRUE slider piece as the template; the slider
             position is given, not predicted, so only its gap columns mean anything.
- TM-blind:  the same matching, but the slider is first found from the image alone (its light
             rim, by a white top-hat in the left strip); gap and slider are both predicted.

Template matching works in source-image pixels; its predictions are mapped to the 512x256
canvas (x * scale + pad) so every method is scored by metrics/captcha.py in the same canvas px.
With --set heldout, --train_factors draws some of the ways the held-out rendering differs from the training
mix (backgrounds, gap_style, compression) as in training instead, to see which of them costs the accuracy.
A second table keeps only the answers the model is most sure of (its gap heatmap peak, the gap_score of
predict_captcha.py), as a caller that asks for a new CAPTCHA when unsure would.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from benchmarks.common import float_list, positive, print_header, report, table
from data.captcha import (CATEGORIES, RENDER_HELDOUT, RENDER_TRAIN, RenderConfig, SyntheticCaptchaDataset,
                          generate_captcha, letterbox, to_input_tensor)
from data.captcha.render import PROCEDURAL
from metrics.captcha import captcha_metrics, decode_on, point_errors
from models.captcha_match import FALLBACK_BOX, MATCH_WEIGHT, SEARCH_MARGIN, centroid, find_slider, match_gap, two_stage
from training.config import fail
from training.export import load_export_or_exit

METHODS = ("model", "two-stage", "TM-oracle", "TM-blind")
TUNING_SEED = 3_000_017  # --set train
COLUMNS = ["method", "group", "n", "hit_le_1px", "hit_le_2px", "hit_le_5px", "mae_px", "gap_mae",
           "gap_hit_le_2px", "gap_hit_le_5px", "slide_mae_px", "square_pieces"]
COVERAGES = (1.0, 0.95, 0.9, 0.8)  # shares of the samples answered in the confidence table
# --train_factors: the RenderConfig fields of each way the held-out rendering differs from the training mix
FACTORS = {"backgrounds": ("photos", "procedural_probs"), "gap_style": ("gap_style_probs",),
           "compression": ("jpeg_prob", "jpeg_quality", "webp_prob", "webp_quality")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="run directory, best/ or final/ folder, or .safetensors file; default: the newest run "
                        "under runs/captcha/ with an export")
    p.add_argument("--set", default="val", choices=("val", "heldout", "train"),
                   help="the validation set (original rendering), the held-out rendering set (RENDER_HELDOUT) or a "
                        "tuning set in the training mix (RENDER_TRAIN, seed 3000017)")
    p.add_argument("--val_size", type=int, default=300, help="samples (the quick preset validates on 300 of each set)")
    p.add_argument("--val_seed", type=int, default=None,
                   help="seed of the set; default: the run's args.yaml (val_seed 1000003, heldout_seed 2000003), "
                        "3000017 for --set train")
    p.add_argument("--match_weights", default=None,
                   help="comma-separated weights of the model's gap probability in the two-stage solver: an extra "
                        "table of the gap per weight (the main table uses MATCH_WEIGHT)")
    p.add_argument("--train_factors", default=None,
                   help="with --set heldout: comma-separated factors (" + ", ".join(FACTORS) + ") drawn as in the "
                        "training mix instead, the others held out; which of them costs the accuracy")
    p.add_argument("--by", default="category", choices=("category", "background"),
                   help="rows per confusion category, or per background (photo name or procedural kind)")
    p.add_argument("--batch_size", type=int, default=16, help="model batch")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader workers that generate samples and run template matching")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--strip", type=float, default=0.3, help="TM-blind looks for the slider in x < strip * width")
    p.add_argument("--tophat_px", type=int, default=7, help="TM-blind white top-hat diameter, px (wider than the rim)")
    p.add_argument("--rim_level", type=int, default=40, help="TM-blind: top-hat grey levels that count as rim")
    p.add_argument("--row_window", type=int, default=None,
                   help="if set, both TM methods only search gap rows within +-N source px of the slider's top "
                        "(gap_y == slider_y in this generator; off by default, as in ddddocr)")
    p.add_argument("--out", default=None, help="folder for captcha_quality.md/.json")
    args = p.parse_args()
    if args.checkpoint is None:
        args.checkpoint = str(newest_run(ROOT / "runs" / "captcha"))
    positive("--val_size", args.val_size)
    positive("--batch_size", args.batch_size)
    positive("--num_workers", args.num_workers, 0)
    positive("--tophat_px", args.tophat_px, 3)
    if not 0 < args.strip <= 1:
        fail(f"--strip must be in (0, 1], got {args.strip}")
    # each weight once: the sweep keys its predictions by weight
    weights = float_list(args.match_weights, "--match_weights") if args.match_weights else []
    args.match_weights = list(dict.fromkeys(weights))
    factors = [f.strip() for f in args.train_factors.split(",")] if args.train_factors else []
    unknown = [f for f in factors if f not in FACTORS]
    if unknown or (factors and args.set != "heldout"):
        fail(f"--train_factors takes a comma-separated subset of {', '.join(FACTORS)} with --set heldout, "
             f"got {args.train_factors!r} with --set {args.set}"
             + (f" (unknown: {', '.join(repr(f) for f in unknown)})" if unknown else ""))
    args.train_factors = list(dict.fromkeys(factors))
    return args


def heldout_with_train_factors(factors: list[str]) -> RenderConfig:
    """RENDER_HELDOUT with the named factors' fields taken from RENDER_TRAIN. Gap style and compression are drawn
    from child streams of their own, so swapping them keeps each sample's layout, labels and other factors;
    the built-in backgrounds come from the sample's main stream, so swapping them keeps its category and image
    size but draws a new layout."""
    return dataclasses.replace(RENDER_HELDOUT, **{f: getattr(RENDER_TRAIN, f) for g in factors for f in FACTORS[g]})


def newest_run(runs: Path) -> Path:
    """The run directory under runs/ whose best/ or final/ export was written last (make bench after make demo)."""
    exports = [p for p in runs.glob("*/*/model.safetensors") if p.parent.name in ("best", "final")]
    if not exports:
        fail(f"--checkpoint not given and no run with best/ or final/ under {runs}; train one first "
             "(train_captcha.py) or pass --checkpoint RUN_DIR")
    return max(exports, key=lambda p: p.stat().st_mtime).parent.parent


class QualitySamples(Dataset):
    """Validation sample i as the model sees it, plus both template-matching predictions.

    Generating once per sample and running template matching here (in DataLoader workers)
    keeps the methods on identical images; main() checks sample 0 against
    SyntheticCaptchaDataset so the inputs are provably the ones training validated on.
    """

    def __init__(self, size: int, seed: int, args, render: RenderConfig = RenderConfig()):
        self.size, self.seed, self.args, self.render = size, seed, args, render

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        s = generate_captcha((self.seed, 0, int(i)), self.render)
        image = s["image"]
        canvas, mask, scale, (pad_x, pad_y) = letterbox(image)
        to_canvas = lambda p: (p[0] * scale + pad_x, p[1] * scale + pad_y)

        oracle_gap = match_gap(image, s["slider_box"], s["piece_alpha"], self.args.row_window)
        found = find_slider(image, self.args.strip, self.args.tophat_px, self.args.rim_level)
        if found is None:  # scored as a miss: the strip's centre and the search area's centre
            h, w = image.shape[:2]
            blind_slider, blind_gap = (self.args.strip * w / 2, h / 2), (w * (1 + self.args.strip) / 2, h / 2)
        else:
            box, alpha = found
            cx, cy = centroid(alpha)
            blind_slider = (box[0] + cx, box[1] + cy)
            blind_gap = match_gap(image, box, alpha, self.args.row_window)

        point = lambda p: torch.tensor(to_canvas(p), dtype=torch.float32)
        return {"image": to_input_tensor(canvas, mask), "gap": point(s["gap"]), "slider": point(s["slider"]),
                "category": torch.tensor(CATEGORIES.index(s["category"])),
                "tm_oracle": torch.stack([point(oracle_gap), point(s["slider"])]),
                "tm_blind": torch.stack([point(blind_gap), point(blind_slider)]),
                "blind_found": torch.tensor(found is not None), "source": image, "geometry": (scale, (pad_x, pad_y)),
                "background": s["render"]["background"]}


LISTS = ("source", "geometry", "background")  # collated as plain lists


def collate(items: list[dict]) -> dict:
    """default_collate, except source images (of any size), their letterbox geometry and background names
    stay lists."""
    batch = default_collate([{k: v for k, v in item.items() if k not in LISTS} for item in items])
    return dict(batch, **{k: [item[k] for item in items] for k in LISTS})


def check_same_samples(ours: QualitySamples, seed: int) -> None:
    reference = SyntheticCaptchaDataset(ours.size, seed=seed, fresh_each_epoch=False, render=ours.render)[0]
    mine = ours[0]
    same = torch.equal(mine["image"], reference["image"]) and all(
        torch.equal(mine[k], reference[k]) for k in ("gap", "slider", "category"))
    if not same:
        raise RuntimeError("benchmark inputs differ from SyntheticCaptchaDataset: the data.captcha package changed how "
                           "samples are packed; update QualitySamples.__getitem__ to match")


def table_rows(preds: dict[str, np.ndarray], true: np.ndarray, group: np.ndarray, names: list[str],
               squares: np.ndarray) -> list[dict]:
    """One row per method and group (each of ``names``, then "all"); group: (N,) the group name of each sample;
    squares: (N,) bool, where the two-stage solver matched a square (no rim ring found), counted in its rows."""
    rows = []
    groups = [(name, group == name) for name in names] + [("all", np.ones(len(group), bool))]
    for name, sel in groups:
        for method in METHODS:
            row = {"method": method, "group": name, "n": int(sel.sum())}
            if sel.any():
                m = captcha_metrics(preds[method][sel], true[sel])
                gap = point_errors(preds[method][sel], true[sel])["gap"]
                row.update({k: m[k] for k in ("hit_le_1px", "hit_le_2px", "hit_le_5px", "mae_px", "gap_mae",
                                              "slide_mae_px")})
                row.update(gap_hit_le_2px=float(100 * (gap <= 2).mean()), gap_hit_le_5px=float(100 * (gap <= 5).mean()))
            if method == "two-stage":
                row["square_pieces"] = int(squares[sel].sum())
            rows.append(row)
    return rows


def confidence_rows(score: np.ndarray, gap_errors: dict[str, np.ndarray], coverages=COVERAGES) -> list[dict]:
    """Refuse the least confident answers (a caller would ask for a new CAPTCHA): for each coverage c, the
    ceil(c * N) samples of highest ``score`` (the network's gap peak) are kept -> one row per coverage with the
    lowest kept score and each method's gap_hit_le_{2,5}px on the kept samples. gap_errors: method -> (N,)."""
    order = np.argsort(-score, kind="stable")
    rows = []
    for c in coverages:
        keep = order[:int(np.ceil(c * len(score) - 1e-9))]
        row = {"coverage": 100 * c, "n": len(keep), "min_gap_score": float(score[keep].min())}
        for method, err in gap_errors.items():
            row[f"{method} gap_hit_le_2px"] = float(100 * (err[keep] <= 2).mean())
            row[f"{method} gap_hit_le_5px"] = float(100 * (err[keep] <= 5).mean())
        rows.append(row)
    return rows


@torch.no_grad()
def main():
    args = parse_args()
    device = torch.device(args.device)
    export = load_export_or_exit(args.checkpoint, device)
    model, weights, train_args = export.model, export.weights, export.args
    info = print_header("CAPTCHA localisation quality: model vs template matching")
    default_seed = {"val": int(train_args.get("val_seed", 1_000_003)),
                    "heldout": int(train_args.get("heldout_seed", 2_000_003)), "train": TUNING_SEED}[args.set]
    seed = args.val_seed if args.val_seed is not None else default_seed
    what, rendering = {"val": ("validation samples", ""), "heldout": ("held-out rendering samples", "RENDER_HELDOUT"),
                       "train": ("tuning samples in the training mix", "RENDER_TRAIN")}[args.set]
    if args.train_factors:
        rendering += f", with {' and '.join(args.train_factors)} as in RENDER_TRAIN"
    if rendering:
        what += f" ({rendering})"
    print(f"weights {weights}; {args.val_size} {what} of seed {seed}", flush=True)

    render = {"val": RenderConfig(), "heldout": heldout_with_train_factors(args.train_factors),
              "train": RENDER_TRAIN}[args.set]
    samples = QualitySamples(args.val_size, seed, args, render)
    check_same_samples(samples, seed)
    loader = DataLoader(samples, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False,
                        collate_fn=collate)
    collected = {"true": [], "category": [], "background": [], "blind_found": [], "box_piece": [], "no_piece": [],
                 "gap_score": [], **{m: [] for m in METHODS}, **{f"w{w}": [] for w in args.match_weights}}
    for batch in loader:
        image = batch["image"].to(device)
        outputs = model(image)
        points, scores = decode_on(outputs, image)
        points = points.cpu()
        collected["model"].append(points)
        collected["gap_score"].append(scores[:, 0].cpu())
        fused, kinds = two_stage(outputs, image, points, batch["source"], batch["geometry"])
        collected["two-stage"].append(fused)
        collected["box_piece"].append(torch.tensor([kind == "box" for kind in kinds]))
        collected["no_piece"].append(torch.tensor([kind == "none" for kind in kinds]))
        for w in args.match_weights:
            collected[f"w{w}"].append(two_stage(outputs, image, points, batch["source"], batch["geometry"], w)[0])
        collected["TM-oracle"].append(batch["tm_oracle"])
        collected["TM-blind"].append(batch["tm_blind"])
        collected["true"].append(torch.stack([batch["gap"], batch["slider"]], dim=1))
        collected["category"].append(batch["category"])
        collected["background"].append(batch["background"])
        collected["blind_found"].append(batch["blind_found"])
        print(f"  {sum(len(c) for c in collected['true'])}/{args.val_size} samples", end="\r", flush=True)
    print()
    arrays = {k: np.concatenate(v) if k == "background" else torch.cat(v).numpy() for k, v in collected.items()}
    if args.by == "category":
        group, names = np.array(CATEGORIES)[arrays["category"]], list(CATEGORIES)
    else:
        group = arrays["background"]
        order = [*render.photos, *PROCEDURAL, "user"]
        names = sorted(set(group), key=lambda b: (order.index(b) if b in order else len(order), b))
    rows = table_rows({m: arrays[m] for m in METHODS}, arrays["true"], group, names, arrays["box_piece"])

    missed = int((~arrays["blind_found"]).sum())
    boxes, kept = int(arrays["box_piece"].sum()), int(arrays["no_piece"].sum())
    notes = [
        f"{args.val_size} fixed {what} (seed {seed}); errors in 512x256 canvas px; "
        f"model = `{weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights}`.",
        "Combined columns (gap + slider): hit_le_1px, hit_le_2px, hit_le_5px, mae_px = per-sample "
        "(gap_err + slider_err) / 2 with err = mean(|dx|, |dy|). Gap-only columns: gap_mae, gap_hit_le_2px, "
        "gap_hit_le_5px. slide_mae_px = |(gx - sx)_pred - (gx - sx)_true|.",
        f"two-stage: gap = argmax of edge match + {MATCH_WEIGHT} x model gap probability, piece found by its rim "
        f"near the model's slider, the slider moved to a found ring's centroid; no rim ring found (a {FALLBACK_BOX} px "
        f"square matched instead) in {boxes}, the model's points kept in {kept} of {args.val_size} samples.",
        "TM-oracle is GIVEN the true slider (slider_err = 0, template = the true piece and alpha), so its "
        "combined columns are gap_err / 2 and not comparable; compare methods on the gap-only columns.",
        f"TM-blind: slider from a {args.tophat_px}px white top-hat (> {args.rim_level} grey levels) in the left "
        f"{args.strip:.0%} of the image; no candidate in {missed} of {args.val_size} samples.",
        "TM: Canny(100, 200) edges of template and image, cv2.matchTemplate TM_CCOEFF_NORMED, search right of the "
        f"slider + {SEARCH_MARGIN} px, " + ("all rows." if args.row_window is None
                                             else f"rows within +-{args.row_window} px of the slider's top."),
    ]
    tables = [table(rows, COLUMNS)]
    gap_errors = {m: point_errors(arrays[m], arrays["true"])["gap"] for m in ("model", "two-stage")}
    confidence = confidence_rows(arrays["gap_score"], gap_errors)
    tables.append(table(confidence, list(confidence[0])))
    notes.append("Second table: only the answers whose gap_score (the model's gap heatmap peak, predict_captcha.py's "
                 "column) is among the highest `coverage` % are kept, as a caller that asks for a new CAPTCHA "
                 "when unsure would; gap-only columns on the kept samples.")
    if args.match_weights:
        sweep = []
        for w in args.match_weights:
            gap = point_errors(arrays[f"w{w}"], arrays["true"])["gap"]
            sweep.append({"match_weight": w, "n": len(gap), "gap_hit_le_2px": float(100 * (gap <= 2).mean()),
                          "gap_hit_le_5px": float(100 * (gap <= 5).mean()), "gap_mae": float(gap.mean())})
        tables.append(table(sweep, ["match_weight", "n", "gap_hit_le_2px", "gap_hit_le_5px", "gap_mae"]))
        notes.append("Third table: the two-stage gap with each --match_weights value (0 = edge match only); the "
                     "model's gap is the first table's.")
    report("captcha_quality", f"CAPTCHA quality per {args.by} (model vs template matching)", info,
           tables, notes, args.out,
           extra={"checkpoint": str(weights), "set": args.set, "seed": seed, "val_size": args.val_size,
                  "train_factors": args.train_factors, "by": args.by})


if __name__ == "__main__":
    main()
