"""Dye assignment, ratio and crosstalk metrics on hand-made numbers; two-colour post-processing on hand-made maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics.smlm_colour import assign_colour, colour_metrics, crosstalk_matrix, ratio_metrics
from models.double_munet import CH1_SLICE, CH2_SLICE, LOGVAR_CH, N_CHANNELS_2C, RATIO_CH
from models.double_munet_post import colour_detections, merge_channel_detections, ratio_from_photons
from models.sigma_munet import BG_CH, MU_CH, P_CH, SIGMA_CH

MEANS, SPREADS = [0.2, 0.8], [0.05, 0.05]


def test_ratio_at_a_dye_mean_goes_to_that_dye_with_high_confidence():
    dye, conf = assign_colour([0.2, 0.8], 0.02, MEANS, SPREADS)
    assert dye.tolist() == [0, 1] and dye.dtype == np.int64
    assert (conf > 0.999).all()


def test_midpoint_of_equal_spread_dyes_is_a_coin_toss():
    dye, conf = assign_colour([0.5], [0.03], MEANS, SPREADS)
    assert conf[0] == pytest.approx(0.5, abs=1e-12) and dye[0] in (0, 1)
    assert assign_colour([0.5], [0.03], MEANS, SPREADS, min_confidence=0.5)[0][0] != -1
    dye, conf = assign_colour([0.5], [0.03], MEANS, SPREADS, min_confidence=0.51)
    assert dye.tolist() == [-1] and conf[0] == pytest.approx(0.5)


def test_larger_measurement_sigma_lowers_confidence():
    conf = [assign_colour([0.4], [s], MEANS, SPREADS)[1][0] for s in (0.0, 0.05, 0.2, 1.0)]
    assert all(a > b for a, b in zip(conf, conf[1:])), conf
    assert conf[-1] > 0.5                     # still the nearer dye, only less sure


def test_priors_shift_the_decision():
    # At the midpoint the likelihoods are equal, so the posterior is the prior itself.
    dye, conf = assign_colour([0.5], 0.03, MEANS, SPREADS, dye_priors=[3.0, 7.0])
    assert dye.tolist() == [1] and conf[0] == pytest.approx(0.7)
    ratio = [0.48]                            # nearer dye 0; a strong prior for dye 1 overrides it
    assert assign_colour(ratio, 0.03, MEANS, SPREADS)[0].tolist() == [0]
    assert assign_colour(ratio, 0.03, MEANS, SPREADS, dye_priors=[0.01, 0.99])[0].tolist() == [1]
    assert assign_colour([0.2], 0.03, MEANS, SPREADS, dye_priors=[0.0, 1.0])[0].tolist() == [1]


def test_posterior_matches_brute_force_and_is_stable_far_away():
    means, spreads, priors = [0.1, 0.45, 0.9], [0.04, 0.1, 0.06], [0.5, 0.2, 0.3]
    ratio, sigma = np.array([0.0, 0.3, 0.6, 0.75, 1.0]), np.array([0.01, 0.05, 0.02, 0.1, 0.0])
    dye, conf = assign_colour(ratio, sigma, means, spreads, priors)
    for n in range(len(ratio)):
        post = []
        for m, s, p in zip(means, spreads, priors):
            var = s**2 + sigma[n] ** 2
            post.append(p * math.exp(-0.5 * (ratio[n] - m) ** 2 / var) / math.sqrt(2 * math.pi * var))
        assert dye[n] == int(np.argmax(post)) and conf[n] == pytest.approx(max(post) / sum(post), rel=1e-10)
    # exp(-(0.8 / 0.001)^2 / 2) underflows to 0 for both dyes; log space still ranks them.
    dye, conf = assign_colour([-3.0, 4.0], 0.0, MEANS, [0.001, 0.001])
    assert dye.tolist() == [0, 1] and np.isfinite(conf).all() and (conf == 1.0).all()


def test_empty_input_and_bad_inputs():
    dye, conf = assign_colour([], 0.1, MEANS, SPREADS)
    assert dye.shape == (0,) and conf.shape == (0,)
    bad = [dict(ratio=[[0.5]]), dict(ratio_sigma=[0.1, 0.1]), dict(dye_spreads=[0.05]), dict(dye_means=[]),
           dict(dye_priors=[1.0]), dict(dye_priors=[-1.0, 2.0]), dict(dye_priors=[0.0, 0.0]),
           dict(ratio=[float("nan")]), dict(ratio_sigma=-0.1), dict(min_confidence=1.5),
           dict(ratio_sigma=0.0, dye_spreads=[0.0, 0.05])]
    for kwargs in bad:
        args = {"ratio": [0.5], "ratio_sigma": 0.1, "dye_means": MEANS, "dye_spreads": SPREADS, **kwargs}
        with pytest.raises(ValueError) as info:
            assign_colour(**args)
        assert "\n" not in str(info.value), kwargs


def test_ratio_metrics_against_numpy_formulas():
    pred, true = np.array([0.2, 0.55, 0.7, 0.31]), np.array([0.25, 0.5, 0.8, 0.3])
    sigma = np.array([0.1, 0.02, 0.05, 0.02])
    m = ratio_metrics(pred, true, sigma)
    d = pred - true
    assert m["ratio_rmse"] == pytest.approx(np.sqrt(np.mean(d**2)))
    assert m["ratio_bias"] == pytest.approx(d.mean()) and m["ratio_mae"] == pytest.approx(np.abs(d).mean())
    assert m["ratio_z_std"] == pytest.approx(np.std(d / sigma))
    assert m["ratio_within_1sigma"] == pytest.approx(0.5)        # 0.05 <= 0.1 and 0.01 <= 0.02 only
    assert set(ratio_metrics(pred, true)) == {"ratio_rmse", "ratio_bias", "ratio_mae"}
    empty = ratio_metrics([], [], [])
    assert len(empty) == 5 and all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError, match="same shape"):
        ratio_metrics(pred, true[:3])
    with pytest.raises(ValueError, match="pred_sigma"):
        ratio_metrics(pred, true, np.zeros(4))


def test_crosstalk_matrix_and_rejected_fraction_hand_counted():
    true = [0, 0, 0, 0, 1, 1, 1, 2]
    pred = [0, 0, 1, -1, 1, 0, -1, -1]
    matrix = crosstalk_matrix(pred, true, 3)
    np.testing.assert_allclose(matrix[:2], [[2 / 3, 1 / 3, 0.0], [0.5, 0.5, 0.0]])
    assert np.isnan(matrix[2]).all()                              # dye 2 was never assigned
    m = colour_metrics(pred, true, 3)
    assert m["colour_accuracy"] == pytest.approx(3 / 5) and m["crosstalk"] == pytest.approx(2 / 5)
    assert m["rejected"] == pytest.approx(3 / 8)
    assert m["crosstalk_0_1"] == pytest.approx(1 / 3) and m["crosstalk_1_0"] == pytest.approx(0.5)
    assert m["crosstalk_0_2"] == 0.0 and math.isnan(m["crosstalk_2_0"])
    assert [m[f"rejected_{i}"] for i in range(3)] == pytest.approx([1 / 4, 1 / 3, 1.0])
    assert len([k for k in m if k.startswith("crosstalk_")]) == 6
    nothing = colour_metrics([], [], 2)
    assert math.isnan(nothing["colour_accuracy"]) and math.isnan(nothing["rejected_0"])


def test_colour_metrics_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        colour_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError, match="pred_dye must be in"):
        colour_metrics([2], [0], 2)
    with pytest.raises(ValueError, match="pred_dye must be in"):
        crosstalk_matrix([0], [-1], 2)
    with pytest.raises(ValueError, match="n_dyes"):
        colour_metrics([0], [0], 0)


P_FLOOR = 1e-3
SCALES = {"px_size_nm": (100.0, 110.0), "z_max_nm": 900.0, "phot_max": 10_000.0, "bg_max": (180.0, 120.0)}


def blank(b=1, h=12, w=12) -> np.ndarray:
    """22-channel maps without emitters; the ratio and log-variance maps encode their pixel so a test can tell
    where they were read: ratio = (10 i + j) / 1000, logvar = -(10 i + j) / 100."""
    out = np.zeros((b, N_CHANNELS_2C, h, w), dtype=np.float32)
    for sl in (CH1_SLICE, CH2_SLICE):
        out[:, sl.start + P_CH] = P_FLOOR
        out[:, sl.start + SIGMA_CH.start:sl.start + SIGMA_CH.stop] = 0.1
        out[:, sl.start + BG_CH] = 0.5
    code = 10 * np.arange(h)[:, None] + np.arange(w)[None, :]
    out[:, RATIO_CH] = code / 1000
    out[:, LOGVAR_CH] = -code / 100
    return out


def put(out, channel, b, i, j, p=0.9, dx=0.0, dy=0.0, z=0.0, phot=0.3, sigma=(0.01, 0.1, 0.1, 0.05)):
    o = (CH1_SLICE, CH2_SLICE)[channel].start
    out[b, o + P_CH, i, j] = p
    out[b, o + MU_CH.start:o + MU_CH.stop, i, j] = (phot, dx, dy, z)
    out[b, o + SIGMA_CH.start:o + SIGMA_CH.stop, i, j] = sigma


def test_emitter_in_both_channels_merges_with_inverse_variance_weights():
    out = blank()
    put(out, 0, 0, 4, 5, dx=0.2, dy=-0.1, z=0.1, phot=0.3, sigma=(0.01, 0.1, 0.2, 0.05))     # (5.2, 3.9)
    put(out, 1, 0, 4, 6, dx=-0.6, dy=0.1, z=0.2, phot=0.5, sigma=(0.01, 0.3, 0.1, 0.1))      # (5.4, 4.1), brighter
    res = colour_detections(out, **SCALES)
    assert len(res["ch1"]["phot"]) == 1 and len(res["ch2"]["phot"]) == 1
    merged = res["merged"]
    assert len(merged["phot"]) == 1
    sx1, sy1, sz1 = 0.1, 0.2, 0.05 * 900
    sx2, sy2, sz2 = 0.3, 0.1, 0.1 * 900

    def fuse(a, sa, b, sb):
        return (a / sa**2 + b / sb**2) / (1 / sa**2 + 1 / sb**2)

    expected = [fuse(5.2, sx1, 5.4, sx2), fuse(3.9, sy1, 4.1, sy2), fuse(90.0, sz1, 180.0, sz2)]
    np.testing.assert_allclose(merged["xyz_px"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(merged["xyz_nm"][0], [expected[0] * 100, expected[1] * 110, expected[2]], rtol=1e-5)
    fused_sig = [(sx1**-2 + sx2**-2) ** -0.5, (sy1**-2 + sy2**-2) ** -0.5, (sz1**-2 + sz2**-2) ** -0.5]
    np.testing.assert_allclose(merged["xyz_sig_px"][0], fused_sig, rtol=1e-5)
    np.testing.assert_allclose(merged["xyz_sig_nm"][0], [fused_sig[0] * 100, fused_sig[1] * 110, fused_sig[2]],
                               rtol=1e-5)
    np.testing.assert_allclose(merged["phot_ch"][0], [3000.0, 5000.0], rtol=1e-5)
    assert merged["phot"][0] == pytest.approx(8000.0, rel=1e-5)
    assert merged["channels"].tolist() == [[True, True]] and merged["det_ix"].tolist() == [[0, 0]]
    assert merged["pixel"].tolist() == [[4, 6]]                        # the brighter channel-2 detection
    assert merged["ratio"][0] == pytest.approx(0.046, rel=1e-6)
    assert merged["ratio_sigma"][0] == pytest.approx(math.exp(-0.46 / 2), rel=1e-6)
    assert merged["prob"][0] == pytest.approx(max(res["ch1"]["prob"][0], res["ch2"]["prob"][0]))
    assert merged["frame_ix"].tolist() == [0]


def test_emitter_in_one_channel_only_has_zero_photons_in_the_other():
    out = blank(b=2)
    put(out, 0, 1, 7, 3, dx=0.3, phot=0.4)
    put(out, 1, 0, 2, 9, dy=-0.2, phot=0.6)
    merged = colour_detections(out, frame_ix0=10, **SCALES)["merged"]
    assert merged["frame_ix"].tolist() == [10, 11]
    assert merged["channels"].tolist() == [[False, True], [True, False]]
    np.testing.assert_allclose(merged["phot_ch"], [[0.0, 6000.0], [4000.0, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(merged["xyz_px"][:, :2], [[9.0, 1.8], [3.3, 7.0]], rtol=1e-5)
    np.testing.assert_allclose(merged["xyz_sig_px"][:, :2], 0.1, rtol=1e-5)
    assert merged["pixel"].tolist() == [[2, 9], [7, 3]]
    np.testing.assert_allclose(merged["ratio"], [0.029, 0.073], rtol=1e-6)


def test_detections_farther_apart_than_the_radius_stay_separate():
    out = blank()
    put(out, 0, 0, 2, 2, phot=0.2)
    put(out, 1, 0, 2, 5, phot=0.3)                                     # 3 px away
    merged = colour_detections(out, **SCALES)["merged"]
    assert merged["channels"].tolist() == [[True, False], [False, True]]
    assert merged["pixel"].tolist() == [[2, 2], [2, 5]]
    wide = colour_detections(out, merge_radius_px=3.5, **SCALES)["merged"]
    assert wide["channels"].tolist() == [[True, True]] and wide["pixel"].tolist() == [[2, 5]]
    np.testing.assert_allclose(wide["xyz_px"][0, :2], [3.5, 2.0], rtol=1e-6)    # equal sigmas: the midpoint


def test_numpy_and_torch_inputs_agree():
    out = blank(b=2)
    put(out, 0, 0, 4, 5, dx=0.2, phot=0.3)
    put(out, 1, 0, 4, 6, dx=-0.6, phot=0.3)                            # same photons: a tie
    put(out, 1, 1, 8, 8, dy=0.3, phot=0.5)
    from_numpy = colour_detections(out, **SCALES)
    for tensor in (torch.from_numpy(out), torch.from_numpy(out).double()):
        from_torch = colour_detections(tensor, **SCALES)
        for part in ("ch1", "ch2", "merged"):
            assert set(from_torch[part]) == set(from_numpy[part])
            for key, value in from_numpy[part].items():
                np.testing.assert_allclose(from_torch[part][key], value, rtol=1e-6, err_msg=f"{part} {key}")
    assert from_numpy["merged"]["pixel"].tolist() == [[4, 5], [8, 8]]   # a tie in photons reads ch1's pixel
    with pytest.raises(ValueError, match="22"):
        colour_detections(out[:, :10], **SCALES)
    with pytest.raises(ValueError, match="bg_max"):
        colour_detections(out, **{**SCALES, "bg_max": (180.0,)})


def test_merge_classical_detections_without_sigmas_greedy_one_to_one():
    det1 = {"frame_ix": np.array([0, 0, 1]), "xyz_px": np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 10.0], [0.6, 0.0, 0.0]]),
            "phot": np.array([100.0, 200.0, 300.0])}
    det2 = {"frame_ix": np.array([0]), "xyz_px": np.array([[0.6, 0.0, 30.0]]), "phot": np.array([50.0])}
    merged = merge_channel_detections(det1, det2, merge_radius_px=1.0)
    assert set(merged) == {"frame_ix", "xyz_px", "phot", "phot_ch", "channels", "det_ix"}
    # det2 is 0.4 px from det1[1] and 0.6 px from det1[0]: the closer one wins, det1[0] stays alone; det1[2] is in
    # another frame although at the same place.
    assert merged["det_ix"].tolist() == [[1, 0], [0, -1], [2, -1]]
    assert merged["frame_ix"].tolist() == [0, 0, 1]
    np.testing.assert_allclose(merged["xyz_px"], [[0.8, 0.0, 20.0], [0.0, 0.0, 0.0], [0.6, 0.0, 0.0]])
    np.testing.assert_allclose(merged["phot_ch"], [[200.0, 50.0], [100.0, 0.0], [300.0, 0.0]])
    np.testing.assert_allclose(ratio_from_photons(merged["phot_ch"]), [0.8, 1.0, 1.0])
    ratio = ratio_from_photons(np.array([[1.0, 3.0], [0.0, 0.0]]))
    assert ratio[0] == 0.25 and math.isnan(ratio[1])
    empty = {"frame_ix": np.zeros(0, dtype=np.int64), "xyz_px": np.zeros((0, 3)), "phot": np.zeros(0)}
    merged = merge_channel_detections(empty, empty)
    assert merged["xyz_px"].shape == (0, 3) and merged["channels"].shape == (0, 2)


def test_merge_bad_inputs():
    det = {"frame_ix": np.array([0]), "xyz_px": np.zeros((1, 3)), "phot": np.ones(1)}
    with pytest.raises(ValueError, match="lacks"):
        merge_channel_detections({"frame_ix": np.array([0])}, det)
    with pytest.raises(ValueError, match="only one"):
        merge_channel_detections({**det, "xyz_sig_px": np.ones((1, 3))}, det)
    with pytest.raises(ValueError, match=r"xyz_px"):
        merge_channel_detections({**det, "xyz_px": np.zeros((1, 2))}, det)
    with pytest.raises(ValueError, match="phot_ch"):
        ratio_from_photons(np.ones(3))


def test_colour_scores_take_a_point_estimate_without_sigma():
    from metrics.smlm_colour import colour_scores
    det = {name: {"frame_ix": np.array([0, 0]), "xyz_nm": np.array([[100.0, 100.0, 0.0], [900.0, 900.0, 0.0]])}
           for name in ("ch1", "ch2", "merged")}
    det["merged"].update({"ratio": np.array([0.31, 0.69]), "ratio_sigma": 0.0})
    gt = {"frame_ix": np.array([0, 0]), "xyz_nm": np.array([[105.0, 100.0, 0.0], [900.0, 895.0, 0.0]]),
          "ratio": np.array([0.3, 0.7]), "dye": np.array([0, 1]), "channel_mask": np.ones((2, 2), bool)}
    m = colour_scores(det, gt, [0.3, 0.7], [0.05, 0.05])
    assert m["jaccard"] == 1 and m["colour_accuracy"] == 1 and m["crosstalk"] == 0
    assert m["ratio_rmse"] == pytest.approx(0.01) and "ratio_z_std" not in m
