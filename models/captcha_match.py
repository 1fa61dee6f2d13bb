"""Classic slider matching and the two-stage solver built on it.

- ``match_scores`` / ``match_gap``: Canny-edge template matching of the slider piece over the image
  (reference/captcha.md 10.1, the behaviour of ddddocr's ``slide_match``).
- ``find_slider``: the slider piece from the image alone, by its light rim (a white top-hat), or near
  a given point (the network's slider prediction).
- ``two_stage`` / ``two_stage_gap``: the network finds the slider, the piece cut out there (``cut_piece``:
  the rim ring, else a square around the point) is matched along the image, and the gap is the best
  position of match score + ``weight`` x the network's gap probability. Edge correlation does not care how
  a gap is shaded (the network does: docs/captcha.md, held-out rendering), while the network's heatmap
  knows fake gaps and the gap's row; the sum keeps both.

All coordinates are px of the image the functions are given (two_stage hands them each source image as
match_resolution returns it: shrunk if wider than MAX_MATCH_WIDTH) under the continuous-pixel convention of
``data.captcha`` (pixel (col, row) has its centre at (col + 0.5, row + 0.5)).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from losses.captcha import valid_cells

CANNY_LOW, CANNY_HIGH = 100, 200  # ddddocr's Canny thresholds (grey levels)
SEARCH_MARGIN = 10                # px right of the slider before the gap search starts, as in reference 10.1
FALLBACK_BOX = 44                 # px: the square piece where no rim ring is found (pieces are 40-70 px)
MATCH_WEIGHT = 0.5                # two_stage_gap's weight of the network's gap probability (docs/captcha.md)
# The piece search's sizes (rings 15-100 px, the search radius, the square, the rim's width) are in source px
# of the generator's images: 280-480 px wide, 40-70 px pieces. two_stage shrinks wider images (CAPTCHAs
# served at 2x) to MATCH_WIDTH first: their scale is unknown, and the generator's mean width is the best single
# guess. Narrower images are left alone: enlarging cannot restore a rim that a small image has blurred.
MAX_MATCH_WIDTH, MATCH_WIDTH = 480, 380


def centroid(alpha: np.ndarray) -> tuple[float, float]:
    """Alpha-weighted centroid with pixel centres at +0.5, the generator's label convention."""
    m = cv2.moments(alpha)
    if m["m00"] <= 0:
        return alpha.shape[1] / 2, alpha.shape[0] / 2
    return m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5


def match_scores(image: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray,
                 row_window: int | None = None) -> np.ndarray:
    """Edge-correlation score of the piece at box (x0, y0, x1, y1) for every top-left position.

    The template is the image under the piece's alpha (outside it black, as a transparent PNG piece
    is drawn). Positions a gap cannot take get -2: those starting left of the slider's right edge plus
    SEARCH_MARGIN (the slider must not match itself; its edges are zeroed too) and, with row_window,
    rows more than row_window px from the slider's top. Returns (H - ph + 1, W - pw + 1) float32 in
    [-1, 1] elsewhere (TM_CCOEFF_NORMED).
    """
    x0, y0, x1, y1 = box
    piece = image[y0:y1, x0:x1].astype(np.float32) * (alpha[..., None].astype(np.float32) / 255) + 0.5
    tpl_edges = cv2.Canny(piece.astype(np.uint8), CANNY_LOW, CANNY_HIGH)
    img_edges = cv2.Canny(image, CANNY_LOW, CANNY_HIGH)
    cut = min(x1 + SEARCH_MARGIN, image.shape[1])
    img_edges[:, :cut] = 0
    score = cv2.matchTemplate(img_edges, tpl_edges, cv2.TM_CCOEFF_NORMED)
    # guard against non-finite scores of degenerate (edge-free) templates or windows
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
    return score


def match_gap(image: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray,
              row_window: int | None = None) -> tuple[float, float]:
    """Gap centre (source px): the best match_scores position plus the piece's centroid."""
    _, _, _, (mx, my) = cv2.minMaxLoc(match_scores(image, box, alpha, row_window))
    cx, cy = centroid(alpha)
    return mx + cx, my + cy


def find_slider(image: np.ndarray, strip: float = 0.3, tophat_px: int = 7, rim_level: int = 40,
                near: tuple[float, float] | None = None, radius: int = 60, max_miss: float = 12.0):
    """The slider piece -> (box (x0, y0, x1, y1), alpha (h, w) uint8) in source px, or None.

    Without ``near`` the left ``strip`` of the image is searched and the largest candidate wins; with
    ``near`` (x, y) the window of +-``radius`` px around it is searched and the candidate whose centre is
    closest wins, if within ``max_miss`` px. The slider's rim is blended towards white, so it is bright in
    all three channels (the minimum channel) and thinner than tophat_px: a white top-hat keeps it and
    drops large bright areas. The rim is a closed ring, so a hole of plausible size in the rim mask is the
    piece's inside; grown by the rim's width it approximates the piece. Without any such hole the largest
    rim blob, filled, stands in (strip search only).
    """
    h, w = image.shape[:2]
    if near is None:
        ox, oy, ex, ey = 0, 0, max(8, int(strip * w)), h
    else:
        ox, oy = max(0, int(near[0]) - radius), max(0, int(near[1]) - radius)
        ex, ey = min(w, int(near[0]) + radius), min(h, int(near[1]) + radius)
        if ex - ox < 8 or ey - oy < 8:
            return None
    region = np.ascontiguousarray(image[oy:ey, ox:ex])
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (tophat_px, tophat_px))
    rim = (cv2.morphologyEx(region.min(axis=2), cv2.MORPH_TOPHAT, kernel) > rim_level).astype(np.uint8)
    contours, hierarchy = cv2.findContours(rim, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    # the hole ends where the rim starts; the rim is 5-7 px wide with its bright half about 3 px
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    best, best_key = None, None
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        bx, by, bw, bh = cv2.boundingRect(contour)
        # pieces are 40-70 px in source images; the inside of the rim is a bit smaller
        if parent < 0 or not (15 <= bw <= 100 and 15 <= bh <= 100 and 0.4 < bw / bh < 2.5):
            continue
        if near is None:
            key = -cv2.contourArea(contour)
            if key >= 0:
                continue
        else:
            key = np.hypot(ox + bx + bw / 2 - near[0], oy + by + bh / 2 - near[1])
            if key > max_miss:
                continue
        if best_key is None or key < best_key:
            best, best_key = contour, key
    mask = np.zeros(rim.shape, np.uint8)
    if best is not None:
        cv2.drawContours(mask, [best], -1, 255, -1)
        mask = cv2.dilate(mask, grow)
    elif near is None:
        outer = [c for c, (_, _, _, parent) in zip(contours, hierarchy[0]) if parent < 0]
        cv2.drawContours(mask, [max(outer, key=cv2.contourArea)], -1, 255, -1)
    else:
        return None
    x, y, bw, bh = cv2.boundingRect(mask)
    if bw == 0 or bh == 0:
        return None
    return (ox + x, oy + y, ox + x + bw, oy + y + bh), np.ascontiguousarray(mask[y:y + bh, x:x + bw])


def _peak_offset(lo: float, mid: float, hi: float) -> float:
    """Sub-pixel offset in [-0.5, 0.5] of a parabola's vertex through three neighbouring values."""
    curvature = lo - 2 * mid + hi
    return 0.0 if curvature >= 0 else float(np.clip(0.5 * (lo - hi) / curvature, -0.5, 0.5))


def two_stage_gap(image: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray, gap_prob: np.ndarray,
                  scale: float | tuple[float, float], pad: tuple[float, float], stride: int,
                  weight: float = MATCH_WEIGHT,
                  anchor: tuple[float, float] | None = None) -> tuple[tuple[float, float], float] | None:
    """Gap centre (source px) where the piece's edge match plus ``weight`` x the network's gap probability
    is largest among the positions right of the slider plus SEARCH_MARGIN, refined to sub-pixel by a
    parabola along each axis -> ((x, y), fused score); None if the piece has no room right of the slider.

    image: (H, W, 3) uint8 source image; box, alpha: the piece (find_slider near the network's slider);
    gap_prob: (h, w) sigmoid of the network's padding-masked gap logits on the letterboxed canvas, cell
    (i, j) centred at canvas ((j + 0.5) * stride, (i + 0.5) * stride); scale, pad: the map from ``image`` to
    the canvas, canvas = image px * scale + pad (scale one number, or (x, y) for an image resized from the
    letterboxed source by slightly different factors per axis). anchor: the point of the template, relative
    to its top-left, whose position is returned (default the piece's centroid; for a square cut around the
    slider point, that point). The probability is read, bilinearly, at the gap centre each template position
    implies (top-left + anchor).
    """
    score = match_scores(image, box, alpha)
    first = box[2] + SEARCH_MARGIN  # the leftmost allowed top-left column (match_scores' rule)
    if first >= score.shape[1]:
        return None
    cx, cy = centroid(alpha) if anchor is None else anchor
    scale_x, scale_y = np.broadcast_to(np.asarray(scale, dtype=np.float64), (2,)).tolist()
    cols = (np.arange(score.shape[1], dtype=np.float32) + cx) * scale_x + pad[0]
    rows = (np.arange(score.shape[0], dtype=np.float32) + cy) * scale_y + pad[1]
    map_x = np.broadcast_to(cols[None, :] / stride - 0.5, score.shape).astype(np.float32)
    map_y = np.broadcast_to(rows[:, None] / stride - 0.5, score.shape).astype(np.float32)
    prob = cv2.remap(np.ascontiguousarray(gap_prob, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    fused = score + np.float32(weight) * prob
    fused[:, :first] = np.finfo(np.float32).min  # whatever the weight, never at or left of the slider
    _, best, _, (mx, my) = cv2.minMaxLoc(fused)
    # refine only between allowed positions
    dx = _peak_offset(*fused[my, mx - 1:mx + 2]) if first < mx < fused.shape[1] - 1 else 0.0
    dy = _peak_offset(*fused[my - 1:my + 2, mx]) if 0 < my < fused.shape[0] - 1 else 0.0
    return (mx + dx + cx, my + dy + cy), float(best)


def cut_piece(image: np.ndarray, slider: tuple[float, float]):
    """The slider piece at the network's slider point (source px) -> (box, alpha, kind).

    kind "ring": find_slider's rim ring near the point; kind "box": no ring closes there (a faint or broken
    rim), so a FALLBACK_BOX px square centred on the point, all of it template, stands in. On the tuning
    seed (docs/captcha.md) the square beat keeping the network's gap in the training mix and tied in the
    validation rendering.
    """
    found = find_slider(image, near=slider)
    if found is not None:
        return (*found, "ring")
    h, w = image.shape[:2]
    side = min(FALLBACK_BOX, h, w)
    x0 = int(np.clip(round(slider[0] - side / 2), 0, w - side))
    y0 = int(np.clip(round(slider[1] - side / 2), 0, h - side))
    return (x0, y0, x0 + side, y0 + side), np.full((side, side), 255, np.uint8), "box"


def match_resolution(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` at the scale the piece search is tuned for -> (image, (x, y) factors: matching px = source
    px * factor, continuous-pixel convention). Images up to MAX_MATCH_WIDTH px wide are returned as they are,
    with factors 1; wider ones are shrunk (aspect kept) to MATCH_WIDTH."""
    h, w = image.shape[:2]
    if w <= MAX_MATCH_WIDTH:
        return image, (1.0, 1.0)
    height = max(1, round(h * MATCH_WIDTH / w))
    return cv2.resize(image, (MATCH_WIDTH, height), interpolation=cv2.INTER_AREA), (MATCH_WIDTH / w, height / h)


@torch.no_grad()
def two_stage(outputs: dict, image: torch.Tensor, points: torch.Tensor, sources: list[np.ndarray],
              geometry: list[tuple[float, tuple[float, float]]], weight: float = MATCH_WEIGHT):
    """The two-stage solver on a batch: the network's points with each gap moved to two_stage_gap's answer
    for the piece cut out at the network's slider -> (points (B, 2, 2) canvas px on the CPU, kinds: cut_piece's
    kind of each piece, "ring" or "box", or "none" where the network's gap is kept: a non-finite slider point,
    or no room for the piece right of the slider).

    outputs: the network's outputs on ``image`` (B, 4, H, W), the letterboxed canvases; points: their
    decode (metrics.captcha.decode_on); sources: the (H, W, 3) uint8 source images; geometry: each one's
    letterbox (scale, (pad_x, pad_y)). Where a rim ring is found the slider moves to its centroid (the gap is
    that same centroid at the matched position, so the slide distance is the match's shift); elsewhere the
    slider stays the network's. The matching runs on each source as match_resolution gives it (a CAPTCHA
    served at twice the generator's size is shrunk, so its rings fit the piece search); the points come back
    in canvas px of the letterbox as given.
    """
    stride = image.shape[-1] // outputs["gap"].shape[-1]
    logits = outputs["gap"][:, 0].float().masked_fill(~valid_cells(image, stride), float("-inf"))
    prob = np.nan_to_num(torch.sigmoid(logits).cpu().numpy(), nan=0.0)  # a diverged network adds nothing
    points, kinds = points.detach().cpu().clone(), []
    for k, (source, (scale, pad)) in enumerate(zip(sources, geometry)):
        # matching px = source px * (rx, ry); canvas px = matching px * (sx, sy) + pad
        matching, (rx, ry) = match_resolution(source)
        to_canvas = (scale / rx, scale / ry)
        slider = (points[k, 1] - torch.tensor(pad)) / torch.tensor(to_canvas)
        if not torch.isfinite(slider).all():
            kinds.append("none")
            continue
        sx, sy = slider.tolist()
        box, alpha, kind = cut_piece(matching, (sx, sy))
        # a square kept inside the image need not be centred on the slider point: anchor the match there
        anchor = None if kind == "ring" else (sx - box[0], sy - box[1])
        found = two_stage_gap(matching, box, alpha, prob[k], to_canvas, pad, stride, weight, anchor)
        if found is None:
            kinds.append("none")
            continue
        (gx, gy), _ = found
        points[k, 0] = torch.tensor([gx * to_canvas[0] + pad[0], gy * to_canvas[1] + pad[1]])
        if kind == "ring":
            cx, cy = centroid(alpha)
            points[k, 1] = torch.tensor([(box[0] + cx) * to_canvas[0] + pad[0],
                                         (box[1] + cy) * to_canvas[1] + pad[1]])
        kinds.append(kind)
    return points, kinds
