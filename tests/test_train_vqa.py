"""train_vqa.py end to end through `accelerate launch`, on a tiny JSON-lines dataset made here (coloured shapes,
two questions per image) with a tiny BLIP: layout and save_pretrained exports, 2 processes, exact resume after
SIGKILL, gradient accumulation with token-count normalisation, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BlipForQuestionAnswering, BlipProcessor

from conftest import call_main, kill_after_checkpoint, read_csv, run_python, run_script
from data.vqa import VQACollate, VQADataset, num_answer_tokens
from train_vqa import MODEL_INPUTS
from training.export import load_export

COLOURS = {"red": (220, 30, 30), "dark green": (0, 100, 0), "blue": (30, 30, 220), "light gray": (200, 200, 200)}
TINY = ["--cpu", "--report_to", "none", "--num_workers", "0", "--hidden", "32", "--layers", "1", "--vision_layers", "1",
        "--heads", "2", "--image_size", "32", "--patch_size", "8", "--vocab_size", "80", "--batch_size", "8",
        "--warmup_steps", "1", "--num_figures", "2", "--answer_max_length", "6"]


def write_split(folder: Path, name: str, n_images: int, seed: int) -> None:
    """n_images coloured squares or circles, each with a colour question (answers of one or two words) and a
    yes/no question."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        circle = bool(rng.integers(2))
        image = np.full((32, 32, 3), 255, np.uint8)
        yy, xx = np.mgrid[:32, :32]
        mask = (yy - 16) ** 2 + (xx - 16) ** 2 < 100 if circle else (abs(yy - 16) < 9) & (abs(xx - 16) < 9)
        image[mask] = COLOURS[colour]
        path = f"images/{name}_{i}.png"
        Image.fromarray(image).save(folder / path)
        lines.append({"image": path, "question": "what color is the shape?", "answer": colour, "question_type": "color"})
        lines.append({"image": path, "question": "is there a circle?", "answer": "yes" if circle else "no",
                      "question_type": "yes_no"})
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vqa_data")
    for name, n, seed in (("train", 24, 0), ("val", 6, 1), ("test", 6, 2)):
        write_split(folder, name, n, seed)
    return folder


def args(data_dir, out, *extra):
    return [*TINY, "--data_dir", str(data_dir), "--test_files", "test.jsonl", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa_runs")
    run_script("train_vqa.py", args(data_dir, out, "--max_steps", "4", "--eval_every_steps", "2", "--run_name", "r"))
    return out / "r"


def test_one_process_run_writes_layout_predictions_and_save_pretrained_exports(trained_run):
    run = trained_run
    rows = read_csv(run / "summary.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]
    for key in ("val/accuracy", "val/exact_match", "val/loss", "val/accuracy/color", "val/accuracy/yes_no",
                "val/majority_baseline", "val/count/color"):
        assert key in rows[0], key
    assert float(rows[0]["val/count/color"]) == 6 and float(rows[0]["val/loss"]) > 0
    preds = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {"id", "question", "answer"} <= set(preds[0])
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["test/accuracy"] <= 100 and "test/accuracy/yes_no" in results
    assert list((run / "figures").glob("vis_predictions_step*.png"))
    for export in ("best", "final"):
        # a save_pretrained folder: what a transformers user loads
        model = BlipForQuestionAnswering.from_pretrained(run / export)
        processor = BlipProcessor.from_pretrained(run / export)
        weights = load_file(run / export / "model.safetensors")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
        assert processor.tokenizer.bos_token == "[DEC]" and processor.image_processor.size["height"] == 32
    assert type(load_export(run).model).__name__ == "BlipVQA"  # and the repository's own loader


def test_two_process_run_with_accumulation(data_dir, tmp_path):
    run_script("train_vqa.py", args(data_dir, tmp_path, "--max_steps", "2", "--grad_accum", "2", "--batch_size", "4",
                                    "--eval_every_steps", "2", "--run_name", "ddp"), nproc=2)
    run = tmp_path / "ddp"
    assert "2 process(es) (MULTI_CPU)" in (run / "train.log").read_text()
    assert len(read_csv(run / "summary.csv")) == 1
    assert len((run / "predictions" / "test.jsonl").read_text().splitlines()) == 12  # every question once
    # val/loss over 2 processes (12 questions in batches of 4: the last batch is evened out with repeats) is
    # the token mean of one pass over the file with the same weights
    export = load_export(run / "final")
    processor = BlipProcessor.from_pretrained(run / "final")
    val = VQADataset(data_dir / "val.jsonl")
    batch = VQACollate(processor, 6)([val[i] for i in range(len(val))])
    with torch.no_grad():
        losses = export.model.eval().answer_losses(**{k: batch[k] for k in MODEL_INPUTS})
    expected = (losses.sum() / num_answer_tokens(batch["labels"])).item()
    assert float(read_csv(run / "summary.csv")[0]["val/loss"]) == pytest.approx(expected, rel=1e-4)


def _first_moment(checkpoint: Path) -> list[torch.Tensor]:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True, map_location="cpu")
    return [s["exp_avg"] for _, s in sorted(state["state"].items())]


def test_accumulation_weighs_every_answer_token_alike(data_dir, tmp_path):
    """One update of 2 micro-batches of 4 equals one batch of 8: the answers have 1 or 2 words, so a mean per
    micro-batch (instead of per token of the update) would give another gradient."""
    common = ["--max_steps", "1", "--save_every_steps", "1", "--eval_every_steps", "1", "--num_figures", "0",
              "--clip_grad", "1e9", "--run_name", "r"]
    run_script("train_vqa.py", args(data_dir, tmp_path / "big", *common))
    run_script("train_vqa.py", args(data_dir, tmp_path / "acc", *common, "--batch_size", "4", "--grad_accum", "2"))
    big = _first_moment(tmp_path / "big" / "r" / "checkpoints" / "step_00000001")
    acc = _first_moment(tmp_path / "acc" / "r" / "checkpoints" / "step_00000001")
    assert len(big) == len(acc) > 20
    for g_big, g_acc in zip(big, acc):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-8)


def test_kill_and_resume_matches_uninterrupted_run(data_dir, tmp_path):
    common = ["--max_steps", "6", "--save_every_steps", "3", "--eval_every_steps", "3", "--num_figures", "0"]
    run_script("train_vqa.py", args(data_dir, tmp_path / "a", *common, "--run_name", "full"))
    part = tmp_path / "b" / "part"
    kill_after_checkpoint("train_vqa.py", args(data_dir, tmp_path / "b", *common, "--run_name", "part"), 1,
                          part / "checkpoints" / "step_00000003" / "COMPLETE")
    assert not (part / "final").exists()
    run_script("train_vqa.py", args(data_dir, tmp_path / "b", *common, "--run_name", "part", "--resume", "auto"))
    a = load_file(tmp_path / "a" / "full" / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming on other training data would rebuild another vocabulary: refused before anything changes
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    (other / "train.jsonl").write_text((other / "train.jsonl").read_text().replace("circle", "disc"))
    before = (part / "tokenizer.json").read_text()
    proc = run_python("train_vqa.py", *args(other, tmp_path / "b", *common, "--run_name", "part", "--resume", "auto"))
    assert proc.returncode == 2 and "another model or vocabulary" in proc.stderr, proc.stderr[-2000:]
    assert (part / "tokenizer.json").read_text() == before


@pytest.mark.parametrize("extra, expected", [
    (["--freeze", "vision"], "--freeze vision: no parameter name starts with it"),
    (["--model", "/nowhere/blip"], "--model /nowhere/blip: cannot load"),
    (["--test_files", "missing.jsonl"], "missing.jsonl"),
    (["--answer_max_length", "2"], "--answer_max_length must be >= 3"),
    (["--hidden", "30", "--heads", "4"], "--hidden must be a multiple of --heads"),
    (["--min_delta", "-0.1"], "--min_delta >= 0"),
])
def test_bad_input_one_line_exit_2_nothing_written(data_dir, tmp_path, extra, expected):
    proc = run_python("train_vqa.py", *args(data_dir, tmp_path / "runs", "--max_steps", "1", *extra))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_broken_jsonl_line_is_named(data_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train", "val"):
        text = (data_dir / f"{name}.jsonl").read_text()
        (bad / f"{name}.jsonl").write_text(text.replace('"images/', f'"{data_dir / "images"}/'))
    lines = (bad / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"question": "', '"questionx": "')
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_python("train_vqa.py", *TINY, "--data_dir", str(bad), "--test_files", "none", "--output_dir",
                      str(tmp_path / "runs"), "--max_steps", "1")
    assert proc.returncode == 2 and "train.jsonl: line 3" in proc.stderr and "question" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_predict_vqa_answers_a_file_and_one_question(trained_run, data_dir, tmp_path, capsys):
    import predict_vqa

    out = tmp_path / "preds.jsonl"
    cmd = ["--checkpoint", trained_run, "--data", data_dir / "test.jsonl", "--out", out, "--device", "cpu"]
    code, stdout, err = call_main(capsys, predict_vqa.main, *cmd)
    assert code == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 12 and set(lines[0]) == {"id", "question", "answer"}
    assert "questions/s" in stdout and "accuracy" in stdout
    # the same answers as the training script's own predictions with the best weights
    trained = [json.loads(line) for line in (trained_run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [line["answer"] for line in lines] == [p["answer"] for p in trained]
    code, _, err = call_main(capsys, predict_vqa.main, *cmd)  # --out exists
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    image = data_dir / json.loads((data_dir / "test.jsonl").read_text().splitlines()[0])["image"]
    code, stdout, _ = call_main(capsys, predict_vqa.main, "--checkpoint", trained_run, "--image", image,
                                "--question", lines[0]["question"], "--device", "cpu")
    assert code == 0 and stdout.strip() == lines[0]["answer"]
    code, _, err = call_main(capsys, predict_vqa.main, "--checkpoint", trained_run, "--image", image)
    assert code == 2 and "--question" in err
    # questions without answers (what users predict on), one longer than any the model was trained on
    unlabelled = data_dir / "unlabelled.jsonl"
    long_q = "what color is the shape " + "in the middle of the white image " * 6 + "?"
    unlabelled.write_text(json.dumps({"image": str(image.relative_to(data_dir)), "question": long_q}) + "\n")
    code, stdout, err = call_main(capsys, predict_vqa.main, "--checkpoint", trained_run, "--data", unlabelled,
                                  "--out", tmp_path / "u.jsonl", "--device", "cpu")
    assert code == 0, err
    assert "accuracy" not in stdout and len((tmp_path / "u.jsonl").read_text().splitlines()) == 1


def test_step_benchmark_prints_the_ratio(data_dir, tmp_path):
    """benchmarks/vqa_step.py on the tiny data (a folder with train.jsonl) and the script's defaults."""
    proc = run_python("benchmarks/vqa_step.py", "--config", "none", "--data_dir", str(data_dir), "--batch_size", "4",
                      "--steps", "1", "--warmup", "0", "--rounds", "2", "--distinct_batches", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "vqa_step.json").read_text())
    methods = [row["method"] for row in report["tables"][0]["rows"]]
    assert methods == ["ours (train_vqa.py train_step + loop)", "bare PyTorch"] and report["ratio"] > 0


def test_init_from_an_export_keeps_its_vocabulary_and_starts_at_its_metrics(trained_run, data_dir, tmp_path):
    run_script("train_vqa.py", args(data_dir, tmp_path, "--init_from", str(trained_run), "--max_steps", "1",
                                    "--eval_every_steps", "1", "--vocab_size", "70", "--run_name", "ft"))
    first = read_csv(tmp_path / "ft" / "summary.csv")[0]
    best = json.loads((trained_run / "best" / "metrics.json").read_text())
    assert int(first["step"]) == 0
    assert float(first["val/accuracy"]) == pytest.approx(best["val/accuracy"])
    assert float(first["val/loss"]) == pytest.approx(best["val/loss"], rel=1e-4)
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (trained_run / "tokenizer.json").read_text()


def test_fine_tuning_a_save_pretrained_folder_with_the_vision_model_frozen(trained_run, data_dir, tmp_path):
    """The code path of configs/vqa_blip_base.yaml (a BLIP folder as --model, vision frozen), on a tiny BLIP."""
    run_script("train_vqa.py", args(data_dir, tmp_path, "--model", str(trained_run / "best"), "--freeze",
                                    "vision_model", "--max_steps", "2", "--eval_every_steps", "2", "--run_name", "ft"))
    start, end = load_file(trained_run / "best" / "model.safetensors"), load_file(tmp_path / "ft" / "final" / "model.safetensors")
    vision = [k for k in start if k.startswith("vision_model.")]
    text = [k for k in start if k.startswith("text_encoder.encoder.")]
    assert vision and text
    assert all(torch.equal(start[k], end[k]) for k in vision)
    assert any(not torch.equal(start[k], end[k]) for k in text)
    assert (tmp_path / "ft" / "final" / "tokenizer.json").read_text() == (trained_run / "best" / "tokenizer.json").read_text()
