import numpy as np
import pytest
import torch

from models.sigma_munet import BG_CH, MU_CH, N_CHANNELS, P_CH, SIGMA_CH
from models.sigma_munet_post import DETECTION_KEYS, detections_from_output, filter_by_sigma, spatial_integration

P_FLOOR = 1e-3      # background p of the hand-made maps
SIG_PX = 0.1        # sigma of x, y in px and of photons, z in scaled units
# The default SimConfig's scales (phot_max = 10000 + 8 * 3000, z_max = 1.2 * 750 nm, bg_max = 1.2 * 150).
SCALES = {"px_size_nm": (100.0, 100.0), "z_max_nm": 900.0, "phot_max": 34_000.0, "bg_max": 180.0}


def blank(b=1, h=12, w=12):
    out = np.zeros((b, N_CHANNELS, h, w), dtype=np.float32)
    out[:, P_CH] = P_FLOOR
    out[:, SIGMA_CH] = SIG_PX
    out[:, BG_CH] = 0.5
    return out


def put(out, b, i, j, p, dx=0.0, dy=0.0, z=0.0, phot=0.3, sigma=None):
    out[b, P_CH, i, j] = p
    out[b, MU_CH, i, j] = (phot, dx, dy, z)
    if sigma is not None:
        out[b, SIGMA_CH, i, j] = sigma


def test_single_pixel_at_centre_plus_offset_with_units():
    out = blank()
    put(out, 0, 3, 5, 0.9, dx=0.2, dy=-0.3, z=0.5, phot=0.25, sigma=(0.01, 0.1, 0.2, 0.05))
    det = detections_from_output(out, px_size_nm=(110.0, 90.0), z_max_nm=800.0, phot_max=30_000.0, bg_max=200.0)
    assert set(det) == set(DETECTION_KEYS) and len(det["prob"]) == 1
    np.testing.assert_allclose(det["param_out"][0], [0.25, 5.2, 2.7, 0.5], atol=1e-6)
    np.testing.assert_allclose(det["xyz_px"][0], [5.2, 2.7, 400.0], rtol=1e-6)
    np.testing.assert_allclose(det["xyz_nm"][0], [5.2 * 110, 2.7 * 90, 400.0], rtol=1e-6)
    np.testing.assert_allclose(det["xyz_sig_nm"][0], [0.1 * 110, 0.2 * 90, 0.05 * 800], rtol=1e-6)
    np.testing.assert_allclose([det["phot"][0], det["phot_sig"][0], det["bg"][0]], [7500.0, 300.0, 100.0], rtol=1e-6)
    assert det["frame_ix"].tolist() == [0] and det["frame_ix"].dtype == np.int64
    assert det["prob"][0] == pytest.approx(0.9 + 4 * P_FLOOR) and det["prob_raw"][0] == pytest.approx(0.9)
    assert det["pixel"].tolist() == [[3, 5]] and det["pixel"].dtype == np.int64    # (row i, col j)


def test_neighbouring_pixels_of_one_emitter_integrate_into_one_detection():
    out = blank()
    put(out, 0, 4, 4, 0.52, dx=0.45)
    put(out, 0, 4, 5, 0.45, dx=-0.5)         # alone it would be below raw_th = 0.5
    det = detections_from_output(out, **SCALES)
    assert len(det["prob"]) == 1
    assert det["prob"][0] == pytest.approx(0.97 + 3 * P_FLOOR)
    assert det["xyz_px"][0, 0] == pytest.approx(4.45) and det["xyz_px"][0, 1] == pytest.approx(4.0)


def test_sum_above_one_is_clamped():
    p = torch.full((1, 5, 5), P_FLOOR)
    p[0, 2, 2], p[0, 2, 3] = 0.55, 0.5
    assert spatial_integration(p)[0, 2, 2] == pytest.approx(1.0)


def test_exact_tie_keeps_both_maxima_as_the_reference_rule_does():
    out = blank()
    put(out, 0, 4, 4, 0.5)
    put(out, 0, 4, 5, 0.5)
    assert len(detections_from_output(out, raw_th=0.5, **SCALES)["prob"]) == 0     # p > raw_th is strict
    det = detections_from_output(out, raw_th=0.1, **SCALES)                        # fitting-notebook threshold
    assert det["xyz_px"][:, 0].tolist() == [4.0, 5.0] and np.allclose(det["prob"], 1.0)


def test_second_confident_pixel_next_to_a_maximum_is_kept():
    out = blank()
    put(out, 0, 6, 6, 0.9)
    put(out, 0, 7, 6, 0.7)                   # > split_th = 0.6 although not a local maximum
    det = detections_from_output(out, **SCALES)
    assert det["xyz_px"][:, 1].tolist() == [6.0, 7.0]
    put(out, 0, 7, 6, 0.55)                  # below split_th: absorbed into the maximum
    assert len(detections_from_output(out, **SCALES)["prob"]) == 1


def test_below_thresholds_gives_nothing():
    out = blank()
    put(out, 0, 2, 2, 0.3)
    put(out, 0, 2, 3, 0.3)                   # sum 0.6, but neither pixel exceeds raw_th
    put(out, 0, 8, 8, 0.45)
    det = detections_from_output(out, **SCALES)
    assert all(len(v) == 0 for v in det.values())
    assert det["xyz_nm"].shape == (0, 3)


def test_separated_emitters_and_frames():
    out = blank(b=2)
    put(out, 0, 1, 1, 0.8, dx=-0.4)
    put(out, 0, 9, 10, 0.95, dy=0.3)
    put(out, 1, 5, 0, 0.7)                   # image border: zero padding in the 3x3 integration
    det = detections_from_output(torch.from_numpy(out), frame_ix0=100, **SCALES)
    assert det["frame_ix"].tolist() == [100, 100, 101]
    np.testing.assert_allclose(det["xyz_px"][:, :2], [[0.6, 1.0], [10.0, 9.3], [0.0, 5.0]], atol=1e-6)
    assert det["prob"][2] == pytest.approx(0.7 + 3 * P_FLOOR)


def test_sigma_filter():
    out = blank()
    put(out, 0, 2, 2, 0.9, sigma=(0.1, 0.1, 0.1, 0.05))     # 10 nm, 10 nm, 45 nm: kept
    put(out, 0, 2, 8, 0.9, sigma=(0.1, 0.5, 0.1, 0.05))     # sigma_x 50 nm > 40
    put(out, 0, 8, 2, 0.9, sigma=(0.1, 0.1, 0.1, 0.1))      # sigma_z 90 nm > 80
    det = detections_from_output(out, **SCALES)
    assert len(det["prob"]) == 3
    kept = filter_by_sigma(det)
    assert kept["xyz_px"][:, :2].tolist() == [[2.0, 2.0]]
    assert len(filter_by_sigma(det, max_sigma_xy_nm=None)["prob"]) == 2
    direct = detections_from_output(out, max_sigma_xy_nm=40.0, max_sigma_z_nm=80.0, **SCALES)
    assert all(np.array_equal(direct[k], kept[k]) for k in DETECTION_KEYS)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="10"):
        detections_from_output(np.zeros((1, 6, 8, 8)), **SCALES)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        spatial_integration(torch.zeros(4, 4))
