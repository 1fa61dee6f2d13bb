"""Localisation quality per confusion category: a trained run against classic template matching.

    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> [--val_size 300] [--out bench_out]
    python benchmarks/captcha_quality.py --checkpoint runs/captcha/<run> --set heldout [--out bench_out]

All three methods see the fixed synthetic validation set of the run (sample i is
generate_captcha((val_seed, 0, i)), exactly the samples train_captcha.py validated on), or with
--set heldout its held-out rendering set (generate_captcha((heldout_seed, 0, i), RENDER_HELDOUT), the
val_heldout/* samples):

- model:     the run's EMA weights (plain weights if the export has none), argmax decode.
- TM-oracle: classic edge template matching (reference/captcha.md 10.1, the behaviour of
             ddddocr.slide_match) with the TRUE slider piece as the template; the slider
             position is given, not predicted, so only its gap columns mean anything.
- TM-blind:  the same matching, but the slider is first found from the image alone (its light
             rim, by a white top-hat in the left strip); gap and slider are both predicted.

Template matching works in source-image pixels; its predictions are mapped to the 512x256
canvas (x * scale + pad) so every method is scored by metrics/captcha.py in the same canvas px.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import positive, print_header, report, table
from data.captcha import (CATEGORIES, RENDER_HELDOUT, RenderConfig, SyntheticCaptchaDataset, generate_captcha,
                          letterbox, to_input_tensor)
from metrics.captcha import captcha_metrics, point_errors, predict_points
from training.config import fail
from training.export import load_export_or_exit

METHODS = ("model", "TM-oracle", "TM-blind")
COLUMNS = ["method", "category", "n", "hit_le_1px", "hit_le_2px", "hit_le_5px", "mae_px", "gap_mae",
           "gap_hit_le_2px", "gap_hit_le_5px", "slide_mae_px"]
CANNY_LOW, CANNY_HIGH = 100, 200     # ddddocr's Canny thresholds (grey levels)
SEARCH_MARGIN = 10                   # px right of the slider before the gap search starts, as in reference 10.1


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="run directory, best/ or final/ folder, or .safetensors file; default: the newest run "
                        "under runs/captcha/ with an export")
    p.add_argument("--set", default="val", choices=("val", "heldout"),
                   help="the validation set (original rendering) or the held-out rendering set (RENDER_HELDOUT)")
    p.add_argument("--val_size", type=int, default=300, help="samples (the quick preset validates on 300 of each set)")
    p.add_argument("--val_seed", type=int, default=None,
                   help="seed of the set; default: the run's args.yaml (val_seed 1000003, heldout_seed 2000003)")
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
    return args


def newest_run(runs: Path) -> Path:
    """The run directory under runs/ whose best/ or final/ export was written last (make bench after make demo)."""
    exports = [p for p in runs.glob("*/*/model.safetensors") if p.parent.name in ("best", "final")]
    if not exports:
        fail(f"--checkpoint not given and no run with best/ or final/ under {runs}; train one first "
             "(train_captcha.py) or pass --checkpoint RUN_DIR")
    return max(exports, key=lambda p: p.stat().st_mtime).parent.parent


def centroid(alpha: np.ndarray) -> tuple[float, float]:
    """Alpha-weighted centroid with pixel centres at +0.5, the generator's label convention."""
    m = cv2.moments(alpha)
    if m["m00"] <= 0:
        return alpha.shape[1] / 2, alpha.shape[0] / 2
    return m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5


def match_gap(image: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray,
              row_window: int | None) -> tuple[float, float]:
    """Gap centre (source px) by Canny-edge template matching of the piece at box (x0, y0, x1, y1).

    The template is the composite image under the piece's alpha (outside it black, as a
    transparent PNG piece is drawn); edges left of the slider plus a margin are zeroed so the
    slider cannot match itself, and no match may start there.
    """
    x0, y0, x1, y1 = box
    piece = (image[y0:y1, x0:x1].astype(np.float32) * (alpha[..., None].astype(np.float32) / 255) + 0.5)
    tpl_edges = cv2.Canny(piece.astype(np.uint8), CANNY_LOW, CANNY_HIGH)
    img_edges = cv2.Canny(image, CANNY_LOW, CANNY_HIGH)
    cut = min(x1 + SEARCH_MARGIN, image.shape[1])
    img_edges[:, :cut] = 0
    score = cv2.matchTemplate(img_edges, tpl_edges, cv2.TM_CCOEFF_NORMED)
    # a template without edges (flat piece) has zero variance and gives NaN scores
    score = np.nan_to_num(score, nan=-1.0, posinf=-1.0, neginf=-1.0)
    allowed = np.ones_like(score, dtype=bool)
    if cut < score.shape[1]:
        allowed[:, :cut] = False
    if row_window is not None:
        rows = np.arange(score.shape[0])
        allowed &= (np.abs(rows - y0) <= row_window)[:, None]
    if not allowed.any():  # piece too large for the space right of it: search everywhere
        allowed[:] = True
    score[~allowed] = -2.0
    _, _, _, (mx, my) = cv2.minMaxLoc(score)
    cx, cy = centroid(alpha)
    return mx + cx, my + cy


def find_slider(image: np.ndarray, strip: float, tophat_px: int, rim_level: int):
    """The slider from the image alone -> (box (x0, y0, x1, y1), alpha (h, w) uint8) in source px, or None.

    The slider's rim is blended towards white, so it is bright in all three channels (the
    minimum channel) and thinner than tophat_px: a white top-hat keeps it and drops large bright
    areas. The rim is a closed ring, so the largest hole of plausible size in the rim mask is
    the piece's inside; grown by the rim's width it approximates the piece. Without any such
    hole the largest rim blob, filled, stands in.
    """
    h, w = image.shape[:2]
    region = np.ascontiguousarray(image[:, :max(8, int(strip * w))])
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (tophat_px, tophat_px))
    rim = (cv2.morphologyEx(region.min(axis=2), cv2.MORPH_TOPHAT, kernel) > rim_level).astype(np.uint8)
    contours, hierarchy = cv2.findContours(rim, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    best, best_area = None, 0.0
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        bw, bh = cv2.boundingRect(contour)[2:]
        # pieces are 40-70 px in source images; the inside of the rim is a bit smaller
        if parent < 0 or not (15 <= bw <= 100 and 15 <= bh <= 100 and 0.4 < bw / bh < 2.5):
            continue
        area = cv2.contourArea(contour)
        if area > best_area:
            best, best_area = contour, area
    mask = np.zeros(rim.shape, np.uint8)
    if best is not None:
        cv2.drawContours(mask, [best], -1, 255, -1)
        # the hole ends where the rim starts; the rim is 5-7 px wide with its bright half about 3 px
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    else:
        outer = [c for c, (_, _, _, parent) in zip(contours, hierarchy[0]) if parent < 0]
        cv2.drawContours(mask, [max(outer, key=cv2.contourArea)], -1, 255, -1)
    x, y, bw, bh = cv2.boundingRect(mask)
    if bw == 0 or bh == 0:
        return None
    return (x, y, x + bw, y + bh), np.ascontiguousarray(mask[y:y + bh, x:x + bw])


class QualitySamples(Dataset):
    """Validation sample i as the model sees it, plus both template-matching predictions.

    Generating once per sample and running template matching here (in DataLoader workers)
    keeps the three methods on identical images; main() checks sample 0 against
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
                "blind_found": torch.tensor(found is not None)}


def check_same_samples(ours: QualitySamples, seed: int) -> None:
    reference = SyntheticCaptchaDataset(ours.size, seed=seed, fresh_each_epoch=False, render=ours.render)[0]
    mine = ours[0]
    same = torch.equal(mine["image"], reference["image"]) and all(
        torch.equal(mine[k], reference[k]) for k in ("gap", "slider", "category"))
    if not same:
        raise RuntimeError("benchmark inputs differ from SyntheticCaptchaDataset: the data.captcha package changed how "
                           "samples are packed; update QualitySamples.__getitem__ to match")


def table_rows(preds: dict[str, np.ndarray], true: np.ndarray, category: np.ndarray) -> list[dict]:
    rows = []
    groups = [(name, category == k) for k, name in enumerate(CATEGORIES)] + [("all", np.ones_like(category, bool))]
    for name, sel in groups:
        for method in METHODS:
            row = {"method": method, "category": name, "n": int(sel.sum())}
            if sel.any():
                m = captcha_metrics(preds[method][sel], true[sel])
                gap = point_errors(preds[method][sel], true[sel])["gap"]
                row.update({k: m[k] for k in ("hit_le_1px", "hit_le_2px", "hit_le_5px", "mae_px", "gap_mae",
                                              "slide_mae_px")})
                row.update(gap_hit_le_2px=float(100 * (gap <= 2).mean()), gap_hit_le_5px=float(100 * (gap <= 5).mean()))
            rows.append(row)
    return rows


@torch.no_grad()
def main():
    args = parse_args()
    device = torch.device(args.device)
    export = load_export_or_exit(args.checkpoint, device)
    model, weights, train_args = export.model, export.weights, export.args
    info = print_header("CAPTCHA localisation quality: model vs template matching")
    heldout = args.set == "heldout"
    default_seed = (int(train_args.get("heldout_seed", 2_000_003)) if heldout
                    else int(train_args.get("val_seed", 1_000_003)))
    seed = args.val_seed if args.val_seed is not None else default_seed
    what = "held-out rendering samples (RENDER_HELDOUT)" if heldout else "validation samples"
    print(f"weights {weights}; {args.val_size} {what} of seed {seed}", flush=True)

    samples = QualitySamples(args.val_size, seed, args, RENDER_HELDOUT if heldout else RenderConfig())
    check_same_samples(samples, seed)
    loader = DataLoader(samples, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False)
    collected = {"true": [], "category": [], "blind_found": [], **{m: [] for m in METHODS}}
    for batch in loader:
        image = batch["image"].to(device)
        points, _ = predict_points(model, image)
        collected["model"].append(points.cpu())
        collected["TM-oracle"].append(batch["tm_oracle"])
        collected["TM-blind"].append(batch["tm_blind"])
        collected["true"].append(torch.stack([batch["gap"], batch["slider"]], dim=1))
        collected["category"].append(batch["category"])
        collected["blind_found"].append(batch["blind_found"])
        print(f"  {sum(len(c) for c in collected['true'])}/{args.val_size} samples", end="\r", flush=True)
    print()
    arrays = {k: torch.cat(v).numpy() for k, v in collected.items()}
    rows = table_rows({m: arrays[m] for m in METHODS}, arrays["true"], arrays["category"])

    missed = int((~arrays["blind_found"]).sum())
    notes = [
        f"{args.val_size} fixed {what} (seed {seed}); errors in 512x256 canvas px; "
        f"model = `{weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights}`.",
        "Combined columns (gap + slider): hit_le_1px, hit_le_2px, hit_le_5px, mae_px = per-sample "
        "(gap_err + slider_err) / 2 with err = mean(|dx|, |dy|). Gap-only columns: gap_mae, gap_hit_le_2px, "
        "gap_hit_le_5px. slide_mae_px = |(gx - sx)_pred - (gx - sx)_true|.",
        "TM-oracle is GIVEN the true slider (slider_err = 0, template = the true piece and alpha), so its "
        "combined columns are gap_err / 2 and not comparable; compare methods on the gap-only columns.",
        f"TM-blind: slider from a {args.tophat_px}px white top-hat (> {args.rim_level} grey levels) in the left "
        f"{args.strip:.0%} of the image; no candidate in {missed} of {args.val_size} samples.",
        "TM: Canny(100, 200) edges of template and image, cv2.matchTemplate TM_CCOEFF_NORMED, search right of the "
        f"slider + {SEARCH_MARGIN} px, " + ("all rows." if args.row_window is None
                                             else f"rows within +-{args.row_window} px of the slider's top."),
    ]
    report("captcha_quality", "CAPTCHA quality per confusion category (model vs template matching)", info,
           [table(rows, COLUMNS)], notes, args.out,
           extra={"checkpoint": str(weights), "set": args.set, "seed": seed, "val_size": args.val_size})


if __name__ == "__main__":
    main()
