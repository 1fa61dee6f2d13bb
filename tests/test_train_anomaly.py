"""train_anomaly.py and predict_anomaly.py end to end through `accelerate launch`, on a small synthetic
mini-MVTec built here (three categories, 64 px) with timm's 82 k-parameter `test_efficientnet` backbone:
layout, exports with thresholds, 2 processes, exact resume after SIGKILL, the feature cache against
recomputing, bad input, and the prediction files."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_after_checkpoint, read_csv, run_python, run_script
from data.anomaly import build_mini_mvtec

TINY = ["--cpu", "--report_to", "none", "--num_workers", "0", "--backbone", "test_efficientnet", "--input_size", "64",
        "--hidden_dim", "32", "--num_heads", "2", "--num_encoder_layers", "1", "--num_decoder_layers", "1",
        "--dim_feedforward", "64", "--neighbor_size", "3", "--batch_size", "8", "--num_figures", "4",
        "--val_fraction", "0.25", "--score_pool", "8", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("anomaly_data") / "mini"
    build_mini_mvtec(folder, seed=0, size=64, n_train=12, n_test=3, n_defect=2, categories=["brick", "capsule", "wood"])
    return folder


def args(data_dir, out, *extra):
    return [*TINY, "--data_dir", str(data_dir), "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("anomaly_runs")
    run_script("train_anomaly.py", args(data_dir, out, "--max_steps", "6", "--eval_every_steps", "3", "--run_name", "r"))
    return out / "r"


def test_one_process_run_writes_layout_thresholds_and_test_metrics(trained_run):
    run = trained_run
    for export in ("best", "final"):
        for name in ("model.safetensors", "metrics.json", "model.json", "args.yaml", "thresholds.json"):
            assert (run / export / name).is_file(), f"{export}/{name}"
    thresholds = json.loads((run / "best" / "thresholds.json").read_text())
    assert list(thresholds["categories"]) == ["brick", "capsule", "wood"]
    for t in thresholds["categories"].values():
        assert t["image"] > 0 and t["pixel"] > 0 and t["normal_val_images"] == 3
    result = json.loads((run / "results.json").read_text())
    for prefix in ("test", "test_final"):
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_auroc/brick", "aupro/wood"):
            assert 0 <= result[f"{prefix}/{key}"] <= 1, (prefix, key)
    rows = read_csv(run / "summary.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert all(0 <= float(r["val/aupro"]) <= 1 and 0 <= float(r["val/image_auroc"]) <= 1 for r in rows)
    assert sorted(p.name.split("_step")[0] for p in (run / "figures").glob("*_step00000006.png")) == ["vis_scores",
                                                                                                      "vis_val"]
    # the export holds the frozen backbone, so it predicts without the run's backbone weights
    weights = load_file(run / "best" / "model.safetensors")
    assert any(k.startswith("backbone.") for k in weights) and any(k.startswith("reconstruction.") for k in weights)


def test_two_process_run_scores_every_validation_image_once(data_dir, tmp_path):
    # no jitter, no dropout: nothing random but the sampler, which Accelerate seeds alike for 1 and 2 processes
    common = ["--max_steps", "1", "--eval_every_steps", "1", "--num_figures", "0", "--jitter_scale", "0",
              "--dropout", "0"]
    # with a disk cache: the main process computes and writes the features, the other reads them
    cache = tmp_path / "cache"
    run_script("train_anomaly.py", args(data_dir, tmp_path, *common, "--run_name", "ddp", "--feature_cache_dir",
                                        str(cache)), nproc=2)
    assert len(list(cache.glob("*.h5"))) == 3 and not list(cache.glob("*.tmp"))
    one = tmp_path / "one"
    run_script("train_anomaly.py", args(data_dir, one, *common, "--run_name", "r", "--batch_size", "16"))
    two = read_csv(tmp_path / "ddp" / "summary.csv")[-1]
    single = read_csv(one / "r" / "summary.csv")[-1]
    # 2 processes x 8 = one process x 16: the same update, so the gathered validation metrics agree
    for key in ("val/image_auroc", "val/pixel_auroc", "val/aupro"):
        assert float(two[key]) == pytest.approx(float(single[key]), abs=1e-4), key
    # and so do the test metrics and thresholds that the end of the run computes from gathered maps
    two_result = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one_result = json.loads((one / "r" / "results.json").read_text())
    for key in ("test/image_auroc", "test/aupro", "test_final/pixel_auroc"):
        assert two_result[key] == pytest.approx(one_result[key], abs=1e-4), key
    two_t = json.loads((tmp_path / "ddp" / "final" / "thresholds.json").read_text())["categories"]
    one_t = json.loads((one / "r" / "final" / "thresholds.json").read_text())["categories"]
    for name in one_t:
        assert two_t[name]["image"] == pytest.approx(one_t[name]["image"], rel=1e-4), name


def test_kill_and_resume_matches_uninterrupted_run(data_dir, tmp_path):
    # 27 training images in batches of 8: 3 updates per epoch, so the checkpoint at update 2 is mid-epoch
    common = ["--max_steps", "6", "--save_every_steps", "2", "--eval_every_steps", "3", "--num_figures", "0"]
    run_script("train_anomaly.py", args(data_dir, tmp_path / "a", *common, "--run_name", "full"))
    part = tmp_path / "b" / "part"
    kill_after_checkpoint("train_anomaly.py", args(data_dir, tmp_path / "b", *common, "--run_name", "part"), 1,
                          part / "checkpoints" / "step_00000002" / "COMPLETE")
    assert not (part / "final").exists()
    run_script("train_anomaly.py", args(data_dir, tmp_path / "b", *common, "--run_name", "part", "--resume", "auto"))
    full = tmp_path / "a" / "full"
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result_a, result_b = (json.loads((r / "results.json").read_text()) for r in (full, part))
    assert {k: v for k, v in result_a.items() if k != "run"} == {k: v for k, v in result_b.items() if k != "run"}
    assert (full / "final" / "thresholds.json").read_text() == (part / "final" / "thresholds.json").read_text()


def test_cached_features_train_like_recomputed_ones(data_dir, tmp_path):
    common = ["--max_steps", "3", "--eval_every_steps", "3", "--num_figures", "0", "--dropout", "0"]
    run_script("train_anomaly.py", args(data_dir, tmp_path / "c", *common, "--run_name", "r"))
    run_script("train_anomaly.py", args(data_dir, tmp_path / "n", *common, "--run_name", "r", "--no-cache_features"))
    a = load_file(tmp_path / "c" / "r" / "final" / "model.safetensors")
    b = load_file(tmp_path / "n" / "r" / "final" / "model.safetensors")
    # the same updates up to float rounding: the cache's features come from batches of 32, not of 8
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_feature_cache_dir_is_reused_and_an_unreadable_file_computed_again(data_dir, tmp_path):
    cache = tmp_path / "cache"
    common = ["--max_steps", "2", "--eval_every_steps", "2", "--num_figures", "0", "--feature_cache_dir", str(cache)]
    run_script("train_anomaly.py", args(data_dir, tmp_path, *common, "--run_name", "a"))
    files = sorted(cache.glob("*.h5"))
    assert len(files) == 3  # training, validation and test features
    log_a = (tmp_path / "a" / "train.log").read_text()
    assert log_a.count("features written to") == 3 and "features read from" not in log_a
    files[0].write_bytes(b"not an HDF5 file")
    with h5py.File(files[1], "w") as f:  # a sound HDF5 file that holds something else
        f.create_dataset("feature_align", data=np.zeros((2, 3), np.float32))
    run_script("train_anomaly.py", args(data_dir, tmp_path, *common, "--run_name", "b"))
    log_b = (tmp_path / "b" / "train.log").read_text()
    assert log_b.count("features read from") == 1 and log_b.count("computing them again") == 2, log_b
    assert sorted(cache.glob("*.h5")) == files and h5py.is_hdf5(files[0])
    # the features read back are the ones computed: the two runs are the same run
    result_a, result_b = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("a", "b"))
    assert {k: v for k, v in result_a.items() if k != "run"} == {k: v for k, v in result_b.items() if k != "run"}


def test_feature_key_changes_with_what_the_features_depend_on(data_dir, tmp_path):
    from data.anomaly import AnomalyDataset, SyntheticDefects, load_splits
    from models.uniad import UniAD
    from train_anomaly import Args, backbone_fingerprint, feature_key, model_kwargs

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    splits = load_splits(str(data), None, 0.25, 0)

    def key(seed=0, input_size=64, defects_seed=0, hidden_dim=32, keys=("mask",)):
        a = Args(backbone="test_efficientnet", input_size=input_size, neighbor_size=3, hidden_dim=hidden_dim,
                 num_heads=2)
        torch.manual_seed(seed)
        model = UniAD(**model_kwargs(a, weights=False))
        val = SyntheticDefects(AnomalyDataset(splits.val, splits.categories, input_size), 1, defects_seed)
        return feature_key(backbone_fingerprint(model), val, a, "cpu", keys)

    base = key()
    # the transformer's settings are not in the key: a search over them shares the features
    assert key() == base == key(hidden_dim=64)
    assert len({base, key(seed=1), key(input_size=96), key(defects_seed=1), key(keys=())}) == 5
    image = Path(splits.val[0].path)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # an edited image
    assert key() != base


@pytest.mark.parametrize("extra, expected", [
    (["--categories", "brick,marble"], "marble"),
    (["--feature_cache_dir", "/proc/version"], "--feature_cache_dir /proc/version"),
    (["--neighbor_size", "4"], "--neighbor_size must be odd"),
    (["--neighbor_size", "9"], "neighbor_size"),
    (["--out_indices", "a,b"], "--out_indices expects"),
    (["--out_indices", "0,9"], "--out_indices 0,9"),
    (["--backbone_weights", "/nowhere/b4.pth"], "/nowhere/b4.pth"),
    (["--backbone", "no_such_net"], "--backbone no_such_net"),
    (["--backbone_weights", "timm"], "--backbone_weights timm"),  # the tests run offline: no download
    (["--val_fraction", "1.5"], "--val_fraction"),
])
def test_bad_input_one_line_exit_2_nothing_written(data_dir, tmp_path, extra, expected):
    proc = run_python("train_anomaly.py", *args(data_dir, tmp_path / "runs", "--max_steps", "1", *extra))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_missing_mask_is_named_before_the_run_starts(data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    mask = next((bad / "wood" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    proc = run_python("train_anomaly.py", *args(bad, tmp_path / "runs", "--max_steps", "1"))
    assert proc.returncode == 2 and mask.stem.replace("_mask", "") in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_truncated_image_ends_the_run_with_one_line(data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    image = sorted((bad / "brick" / "test" / "good").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:200])  # the header still reads; the pixels do not
    proc = run_python("train_anomaly.py", *args(bad, tmp_path / "runs", "--max_steps", "1"))
    assert proc.returncode == 2 and image.name in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


def test_predict_writes_scores_maps_overlays_and_masks(trained_run, data_dir, tmp_path, capsys):
    import predict_anomaly

    out = tmp_path / "preds"
    predict_anomaly.main(["--checkpoint", str(trained_run), "--data", str(data_dir), "--out", str(out), "--overlays",
                          "--masks", "--batch_size", "5"])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "image_auroc" in printed
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    n_test = sum(1 for p in data_dir.glob("*/test/*/*.png"))
    assert len(rows) == n_test and set(rows[0]) == {"category", "path", "defect", "score", "threshold", "is_anomalous"}
    thresholds = json.loads((trained_run / "best" / "thresholds.json").read_text())["categories"]
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(thresholds[row["category"]]["image"], rel=1e-5)
        assert int(row["is_anomalous"]) == (float(row["score"]) >= float(row["threshold"]))
        stem = Path(row["path"]).stem
        amap = np.load(out / row["category"] / row["defect"] / f"{stem}.npy")
        assert amap.shape == (64, 64) and amap.dtype == np.float32 and (amap >= 0).all()
        assert (out / row["category"] / row["defect"] / f"{stem}_overlay.png").is_file()
        assert (out / row["category"] / row["defect"] / f"{stem}_mask.png").is_file()
    # plain images of one category, and a threshold given on the command line
    plain = tmp_path / "plain"
    predict_anomaly.main(["--checkpoint", str(trained_run / "final"), "--data", str(data_dir / "wood" / "test" / "hole"),
                          "--category", "wood", "--threshold", "0", "--out", str(plain)])
    with (plain / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["is_anomalous"] == "1" and r["defect"] == "hole" for r in rows)


def test_predict_bad_input_one_line_nothing_written(trained_run, data_dir, tmp_path):
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere")], "--checkpoint"),
        (["--category", "marble"], "--category marble"),
        (["--data", str(data_dir / "wood" / "test" / "hole")], "--category is needed"),
    ]
    for extra, expected in cases:
        base = {"--checkpoint": str(trained_run), "--data": str(data_dir), "--out": str(tmp_path / "out")}
        for flag, value in zip(extra[::2], extra[1::2]):
            base[flag] = value
        proc = run_python("predict_anomaly.py", *[x for kv in base.items() for x in kv])
        assert proc.returncode == 2 and expected in proc.stderr, (extra, proc.stderr[-2000:])
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "out").exists()


def test_step_benchmark_prints_overhead_and_cache_speedup(tmp_path):
    preset = tmp_path / "tiny.yaml"
    # a GPU-recipe preset names timm's pretrained weights: the benchmark times random ones and never downloads
    preset.write_text("backbone: test_efficientnet\nbackbone_weights: timm\ninput_size: 64\nhidden_dim: 32\n"
                      "num_heads: 2\nnum_encoder_layers: 1\nnum_decoder_layers: 1\ndim_feedforward: 64\n"
                      "neighbor_size: 3\nbatch_size: 4\n")
    proc = run_python("benchmarks/anomaly_step.py", "--config", str(preset), "--steps", "2", "--rounds", "1",
                      "--warmup", "0", "--out", str(tmp_path / "bench"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/bare = " in proc.stdout and "cached / recomputed throughput: " in proc.stdout
    cache = json.loads((tmp_path / "bench" / "anomaly_cache.json").read_text())
    assert cache["speedup"] > 0 and [r["batch"] for r in cache["tables"][1]["rows"]] == [1, 32]


def test_quality_benchmark_scores_uniad_and_patchcore_per_category(trained_run, tmp_path):
    proc = run_python("benchmarks/anomaly_quality.py", "--checkpoint", str(trained_run), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "anomaly_quality.json").read_text())["tables"][0]["rows"]
    assert [r["category"] for r in rows] == ["brick", "capsule", "wood", "mean"]
    for row in rows:
        for method in ("UniAD", "PatchCore"):
            assert 0 <= row[f"{method} image_auroc"] <= 100 and 0 <= row[f"{method} aupro"] <= 100


def test_coreset_is_greedy_k_centre():
    from benchmarks.anomaly_quality import coreset

    bank = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [10.0]])
    picked = coreset(bank, 0.5).tolist()
    assert len(picked) == 3 == len(set(picked))
    # whichever point comes first, three k-centre picks cover the three clusters
    assert {min(picked, key=lambda i: abs(bank[i, 0] - c)) for c in (0.1, 5.05, 10.0)} == set(picked)
    assert sorted({round(float(bank[i, 0]) / 5) for i in picked}) == [0, 1, 2]
    assert coreset(bank, 1.0).tolist() == list(range(6))
