"""predict_captcha.py and predict_pair.py on hand-made exports (tiny untrained models), in this process.

Bad input is one line naming the file or flag, exit status 2, checked before the work, and an existing
``--out`` survives every failure.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import predict_captcha
import predict_pair
from conftest import call_main, read_csv
from data.captcha import export as export_captchas
from training.export import build_model, model_record

CAPTCHA_COLUMNS = ["filename", "gap_x", "gap_y", "slider_x", "slider_y", "gap_score", "slider_score", "gap_piece"]


def make_export(folder, cls, **kwargs):
    folder.mkdir(parents=True)
    record = model_record(cls, **kwargs)
    torch.manual_seed(0)
    (folder / "model.json").write_text(json.dumps(record))
    save_file(build_model(record).state_dict(), folder / "model.safetensors")
    return folder


def truncated_copy(export, folder):
    folder.mkdir()
    (folder / "model.json").write_bytes((export / "model.json").read_bytes())
    (folder / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:100])
    return folder


run = call_main


@pytest.fixture(scope="module")
def captcha_export(tmp_path_factory):
    from models.lite_hrnet import LiteHRNet18FPN

    return make_export(tmp_path_factory.mktemp("captcha") / "final", LiteHRNet18FPN, in_chans=4, fpn_channels=16,
                       head_channels=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images") / "imgs"
    export_captchas(folder, 2, seed=7)
    (folder / "labels.csv").unlink()
    return folder


def test_predict_captcha_outputs_and_bad_input(tmp_path, capsys, monkeypatch, captcha_export, images):
    out = tmp_path / "preds.csv"
    base = ["--checkpoint", captcha_export, "--images", images, "--device", "cpu", "--batch_size", "2"]
    code, stdout, err = run(capsys, predict_captcha.main, *base, "--out", out)
    assert code == 0, err
    assert f"weights: {captcha_export / 'model.safetensors'}" in stdout
    rows = read_csv(out)
    assert [r["filename"] for r in rows] == ["captcha_000000.png", "captcha_000001.png"]
    assert list(rows[0]) == CAPTCHA_COLUMNS and not (tmp_path / "preds.csv.tmp").exists()
    kept = out.read_bytes()

    (tmp_path / "a_file").write_text("x\n")
    with monkeypatch.context() as m:  # refused before any image is read
        m.setattr(predict_captcha, "load_image", lambda path: pytest.fail(f"{path} read"))
        for argv, named in [
            ((*base, "--out", out), "--overwrite"),
            ((*base, "--out", tmp_path), "is a directory"),
            ((*base, "--out", tmp_path / "a_file" / "p.csv"), "a_file is a file"),
            ((*base, "--out", tmp_path / "new.csv", "--device", "gpu"), "--device gpu"),
            ((*base, "--out", tmp_path / "new.csv", "--checkpoint", truncated_copy(captcha_export, tmp_path / "t")),
             "model.safetensors: not a readable safetensors file"),
        ]:
            code, _, err = run(capsys, predict_captcha.main, *argv)
            assert code == 2 and err.count("\n") == 1 and named in err, (argv, err)
    if not torch.cuda.is_available():
        code, _, err = run(capsys, predict_captcha.main, *base, "--out", tmp_path / "new.csv", "--device", "cuda")
        assert code == 2 and err.count("\n") == 1 and "--device cuda" in err, err
    assert out.read_bytes() == kept and not (tmp_path / "new.csv").exists()

    code, stdout, err = run(capsys, predict_captcha.main, *base, "--out", out, "--overwrite")
    assert code == 0, err
    assert out.read_bytes() == kept  # the same predictions, rewritten

    # --network_only: the network's points, the same scores
    assert {r["gap_piece"] for r in rows} <= {"ring", "box", "none"}
    code, stdout, err = run(capsys, predict_captcha.main, *base, "--out", tmp_path / "net.csv", "--network_only")
    assert code == 0, err
    net = read_csv(tmp_path / "net.csv")
    assert {r["gap_piece"] for r in net} == {"none"} and "0 rim rings, 0 boxes, 2 network's gap kept" in stdout
    for a, b in zip(rows, net, strict=True):
        assert (a["gap_score"], a["slider_score"]) == (b["gap_score"], b["slider_score"])
        if a["gap_piece"] != "ring":  # a found ring also places the slider
            assert (a["slider_x"], a["slider_y"]) == (b["slider_x"], b["slider_y"])


def test_predict_captcha_skip_bad(tmp_path, capsys, captcha_export, images):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    cv2.imwrite(str(folder / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "preds.csv"
    argv = ["--checkpoint", captcha_export, "--images", folder, "--device", "cpu", "--out", out]
    code, _, err = run(capsys, predict_captcha.main, *argv)
    assert code == 2 and err.count("\n") == 1 and "broken.jpg" in err and "--skip_bad" in err, err
    assert not out.exists() and not (tmp_path / "preds.csv.tmp").exists()
    code, _, err = run(capsys, predict_captcha.main, *argv[:3], folder / "dot.png", *argv[4:])
    assert code == 2 and err.count("\n") == 1 and "dot.png: 1x1 px is too small" in err, err

    code, stdout, err = run(capsys, predict_captcha.main, *argv, "--skip_bad")
    assert code == 0, err
    assert [r["filename"] for r in read_csv(out)] == ["captcha_000000.png", "captcha_000001.png"]
    assert "2 images ->" in stdout and "skipped 2 image(s)" in stdout
    listed = stdout.split("skipped 2 image(s)")[1]
    assert "broken.jpg: not a decodable image" in listed and "dot.png: 1x1 px is too small" in listed

    only_bad = tmp_path / "only_bad.csv"
    code, _, err = run(capsys, predict_captcha.main, *argv[:3], folder / "dot.png", *argv[4:6], "--out", only_bad,
                       "--skip_bad")
    assert code == 2 and err.count("\n") == 1 and "nothing written" in err and not only_bad.exists(), err


@pytest.fixture(scope="module")
def pair_export(tmp_path_factory):
    from models.compare_net import ResNetCompareNet

    return make_export(tmp_path_factory.mktemp("pair") / "final", ResNetCompareNet, layers=[1, 1, 1], width_mult=0.25,
                       feat_dim=16)


def test_predict_pair_outputs_and_bad_input(tmp_path, capsys, pair_export):
    rng = np.random.default_rng(0)
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.integers(0, 256, (6, 28, 56), dtype=np.uint8), id=np.array([f"p{i}" for i in range(6)]),
             y=np.array([0, 1, 0, 1, 0, 1]))
    out = tmp_path / "preds.csv"
    base = ["--checkpoint", pair_export, "--data", data, "--device", "cpu"]
    code, stdout, err = run(capsys, predict_pair.main, *base, "--out", out)
    assert code == 0, err
    assert [r["id"] for r in read_csv(out)] == [f"p{i}" for i in range(6)] and "accuracy" in stdout
    kept = out.read_bytes()
    for argv, named in [
        (("--checkpoint", tmp_path / "no_such_run", *base[2:], "--out", out), "--overwrite"),
        ((*base, "--out", tmp_path), "is a directory"),
        ((*base, "--out", tmp_path / "new.csv", "--device", "gpu"), "--device gpu"),
        ((*base, "--out", tmp_path / "new.csv", "--checkpoint", truncated_copy(pair_export, tmp_path / "trunc")),
         "model.safetensors: not a readable safetensors file"),
        (("--checkpoint", pair_export, pair_export, *base[2:], "--out", tmp_path / "new.csv", "--stacker", tmp_path),
         "no stacker.json"),
    ]:
        code, _, err = run(capsys, predict_pair.main, *argv)
        assert code == 2 and err.count("\n") == 1 and named in err, (argv, err)
    assert out.read_bytes() == kept and not (tmp_path / "new.csv").exists()
    code, _, err = run(capsys, predict_pair.main, *base, "--out", out, "--overwrite")
    assert code == 0 and out.read_bytes() == kept, err


def test_pair_tta_is_symmetric_in_the_halves_and_shifts_both_alike(tmp_path, capsys, pair_export):
    from models.compare_net import ResNetCompareNet

    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(predict_pair.shift_images(x, 1, 0)[0, 0, 1:], x[0, 0, :3])      # down one row
    assert torch.equal(predict_pair.shift_images(x, 0, -1)[0, 0, :, :3], x[0, 0, :, 1:])  # left one column
    corner = predict_pair.shift_images(x, 1, -1)[0, 0]   # what comes in repeats the edge it comes from
    assert torch.equal(corner[0], corner[1]) and torch.equal(corner[:, 3], corner[:, 2]) and corner[1, 0] == x[0, 0, 0, 1]
    torch.manual_seed(0)
    model = ResNetCompareNet(width_mult=0.25, feat_dim=16, layers=(1, 1), fusion=False, head="concat")
    for module in model.modules():   # non-trivial BatchNorm statistics, so that the order matters visibly
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
    model.eval()
    a, b = torch.rand(5, 1, 28, 28), torch.rand(5, 1, 28, 28)
    plain_ab, plain_ba = predict_pair.pair_logits(model, a, b), predict_pair.pair_logits(model, b, a)
    assert (plain_ab - plain_ba).abs().max() > 1e-4        # the concatenation head depends on the order ...
    tta_ab, tta_ba = predict_pair.pair_logits(model, a, b, tta=True), predict_pair.pair_logits(model, b, a, tta=True)
    assert torch.allclose(tta_ab, tta_ba, atol=1e-6)      # ... the TTA mean does not
    views = [model(predict_pair.shift_images(p, dy, dx), predict_pair.shift_images(q, dy, dx))
             for dy, dx in predict_pair.TTA_SHIFTS for p, q in ((a, b), (b, a))]
    assert torch.allclose(tta_ab, torch.stack(views).mean(0), atol=1e-5)   # the mean of the 10 single views

    rng = np.random.default_rng(0)
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.integers(0, 256, (6, 28, 56), dtype=np.uint8), id=np.array([f"p{i}" for i in range(6)]))
    swapped = tmp_path / "swapped.npz"
    np.savez(swapped, x=np.load(data)["x"][:, :, [*range(28, 56), *range(28)]], id=np.load(data)["id"])
    outs = []
    for name in (data, swapped):
        out = tmp_path / f"{name.stem}.csv"
        code, _, err = run(capsys, predict_pair.main, "--checkpoint", pair_export, "--data", name, "--device", "cpu",
                           "--tta", "--out", out)
        assert code == 0, err
        outs.append([float(r["prob"]) for r in read_csv(out)])
    assert np.allclose(outs[0], outs[1], atol=2e-6)


def test_predict_pair_with_a_stacker(tmp_path, capsys, pair_export):
    """load_stacker runs before any prediction: the stacker of stack_pair.py applied to its member runs."""
    from test_stack_pair import members, stack_cli, write_run

    y_val, _ = members(90, 1, seed=1)
    y_test, _ = members(30, 1, seed=2)
    runs = []
    for k in range(2):
        run_dir = write_run(tmp_path / f"run{k}", y_val, y_test, seed=k)
        for name in ("model.json", "model.safetensors"):
            (run_dir / name).write_bytes((pair_export / name).read_bytes())
        runs.append(run_dir)
    code, _, err = stack_cli(capsys, "--runs", *runs, "--out", tmp_path / "stacker", "--folds", "3")
    assert code == 0, err
    data = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (4, 28, 56), dtype=np.uint8), id=np.array([f"p{i}" for i in range(4)]))
    out = tmp_path / "stacked.csv"
    argv = ["--data", data, "--device", "cpu", "--stacker", tmp_path / "stacker"]
    code, stdout, err = run(capsys, predict_pair.main, "--checkpoint", *reversed(runs), *argv, "--out", out)
    assert code == 0, err
    assert "stacked 2 model(s)" in stdout and len(read_csv(out)) == 4
    other = tmp_path / "other.csv"
    code, _, err = run(capsys, predict_pair.main, "--checkpoint", runs[0], pair_export, *argv, "--out", other)
    assert code == 2 and err.count("\n") == 1 and "expects exactly the runs run0, run1" in err, err
    assert not other.exists()


def test_output_helpers_keep_the_old_output_on_failure(tmp_path, monkeypatch):
    from training import io
    from training.config import UsageError

    target = tmp_path / "sub" / "out.csv"
    assert io.check_output(target, overwrite=False) == target and not (tmp_path / "sub").exists()
    io.write_atomically(target, lambda tmp: tmp.write_text("old\n"))

    def broken(tmp):
        (tmp / "half" if tmp.is_dir() else tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.write_atomically(target, broken)
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]

    folder = tmp_path / "report"
    io.write_folder_atomically(folder, lambda tmp: (tmp / "a.txt").write_text("old\n"))
    with pytest.raises(RuntimeError):
        io.write_folder_atomically(folder, broken)
    assert [p.name for p in folder.iterdir()] == ["a.txt"]
    io.write_folder_atomically(folder, lambda tmp: (tmp / "b.txt").write_text("new\n"))
    assert [p.name for p in folder.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "sub"]  # no .tmp, no .old
    with pytest.raises(UsageError, match="not empty"):
        io.check_output(folder, overwrite=False, folder=True)
    assert io.check_output(folder, overwrite=True, folder=True) == folder

    monkeypatch.setattr(io.os, "access", lambda path, mode: False)  # as a non-root user in a read-only folder
    with pytest.raises(UsageError, match=rf"--out {tmp_path / 'new.csv'}: folder {tmp_path} is not writable"):
        io.check_output(tmp_path / "new.csv", overwrite=False)


def peaked_copy(export, folder):
    """The export with heatmap heads 1000x steeper: an untrained head is nearly flat (init std 0.001), and
    where two cells differ by float rounding alone, either backend may pick either (a trained head peaks)."""
    from safetensors.torch import load_file

    folder.mkdir()
    (folder / "model.json").write_bytes((export / "model.json").read_bytes())
    model = build_model(json.loads((export / "model.json").read_text()))
    model.load_state_dict(load_file(export / "model.safetensors"))
    with torch.no_grad():
        for head in (model.gap_head, model.slider_head):
            head[-1].weight.mul_(1000.0)
    save_file(model.state_dict(), folder / "model.safetensors")
    return folder


def test_export_and_predict_of_a_model_on_the_half_canvas(tmp_path, capsys, images):
    """--input_scale 2: the ONNX graph takes the full canvas, shrinks it inside, records stride 8; both backends
    decode at that stride and give the points of the same weights run at input_scale 1 on the pooled canvas."""
    import export_captcha
    from metrics.captcha import predict_points
    from models.lite_hrnet import LiteHRNet18FPN, pool_canvas
    from models.onnx_io import OnnxModel
    from training.export import load_export

    half = peaked_copy(make_export(tmp_path / "half", LiteHRNet18FPN, in_chans=4, fpn_channels=16,
                                   head_channels=16, input_scale=2), tmp_path / "peaked")
    onnx_file = tmp_path / "half.onnx"
    code, stdout, err = run(capsys, export_captcha.main, "--checkpoint", half, "--out", onnx_file,
                            "--check_samples", "2")
    assert code == 0, err
    onnx_model = OnnxModel(onnx_file)
    assert onnx_model.metadata["stride"] == "8" and onnx_model.metadata["canvas_w"] == "512"
    x = torch.rand(2, 4, 256, 512)
    x[:, 3] = 1.0
    assert onnx_model(x)["gap"].shape == (2, 1, 32, 64)
    model = load_export(half).model
    full = LiteHRNet18FPN(in_chans=4, fpn_channels=16, head_channels=16).eval()
    full.load_state_dict(model.state_dict())
    got, ref = predict_points(model, x)[0], predict_points(full, pool_canvas(x, 2))[0] * 2
    torch.testing.assert_close(got, ref)
    for backend, checkpoint, out in (("torch", half, tmp_path / "torch.csv"),
                                     ("onnx", onnx_file, tmp_path / "onnx.csv")):
        code, _, err = run(capsys, predict_captcha.main, "--checkpoint", checkpoint, "--images", images,
                           "--device", "cpu", "--backend", backend, "--out", out)
        assert code == 0, err
    for a, b in zip(read_csv(tmp_path / "torch.csv"), read_csv(tmp_path / "onnx.csv"), strict=True):
        for column in CAPTCHA_COLUMNS[1:7]:
            assert float(a[column]) == pytest.approx(float(b[column]), abs=0.011)
        assert a["gap_piece"] == b["gap_piece"]


def test_export_captcha_onnx_matches_pytorch_and_predicts_the_same(tmp_path, capsys, captcha_export, images):
    import export_captcha
    from models.onnx_io import OnnxModel
    from training.export import load_export

    captcha_export = peaked_copy(captcha_export, tmp_path / "peaked")
    onnx_file = tmp_path / "captcha.onnx"
    code, stdout, err = run(capsys, export_captcha.main, "--checkpoint", captcha_export, "--out", onnx_file,
                            "--check_samples", "3")
    assert code == 0, err
    assert "decoded points 0.0000 px" in stdout and onnx_file.is_file()
    # Any batch size; the same raw outputs as the PyTorch model.
    onnx_model, model = OnnxModel(onnx_file), load_export(captcha_export).model
    assert onnx_model.metadata["canvas_w"] == "512" and onnx_model.output_names == ["gap", "slider", "offset"]
    for batch in (1, 5):
        x = torch.rand(batch, 4, 256, 512)
        x[:, 3] = 1.0
        with torch.no_grad():
            ref = model(x)
        got = onnx_model(x)
        for name in ("gap", "slider", "offset"):
            assert got[name].shape == ref[name].shape
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)
    # predict_captcha gives the same predictions with either backend.
    for backend, checkpoint, out in (("torch", captcha_export, tmp_path / "torch.csv"),
                                     ("onnx", onnx_file, tmp_path / "onnx.csv")):
        code, stdout, err = run(capsys, predict_captcha.main, "--checkpoint", checkpoint, "--images", images,
                                "--device", "cpu", "--backend", backend, "--out", out)
        assert code == 0, err
    torch_rows, onnx_rows = read_csv(tmp_path / "torch.csv"), read_csv(tmp_path / "onnx.csv")
    assert [r["filename"] for r in onnx_rows] == [r["filename"] for r in torch_rows]
    for a, b in zip(torch_rows, onnx_rows):
        for column in CAPTCHA_COLUMNS[1:7]:
            assert float(a[column]) == pytest.approx(float(b[column]), abs=0.011)
        assert a["gap_piece"] == b["gap_piece"]
    # Bad input: one line, exit 2, nothing written or replaced.
    onnx_file_bytes = onnx_file.read_bytes()
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model")
    cases = [
        (export_captcha.main, ["--checkpoint", captcha_export, "--out", onnx_file], "--overwrite"),
        (export_captcha.main, ["--checkpoint", captcha_export, "--out", tmp_path / "m.pt"], ".onnx"),
        (export_captcha.main, ["--checkpoint", tmp_path / "nope", "--out", tmp_path / "n.onnx"], "nope"),
        (export_captcha.main, ["--checkpoint", captcha_export, "--out", tmp_path / "n.onnx", "--check_samples", "0"],
         "--check_samples"),
        (predict_captcha.main, ["--checkpoint", captcha_export, "--backend", "onnx", "--images", images,
                                "--out", tmp_path / "p.csv"], ".onnx"),
        (predict_captcha.main, ["--checkpoint", foreign, "--backend", "onnx", "--images", images,
                                "--out", tmp_path / "p.csv"], "foreign.onnx"),
    ]
    for main, argv, named in cases:
        code, _, err = run(capsys, main, *argv)
        assert code == 2 and err.count("\n") == 1 and named in err, (argv, err)
    assert onnx_file.read_bytes() == onnx_file_bytes
    assert not (tmp_path / "n.onnx").exists() and not (tmp_path / "p.csv").exists()


def test_ddddocr_inputs_map_its_answer_back_to_the_gap():
    """benchmarks/captcha_latency.py gives ddddocr's slide_match the true piece and the background right of
    it; the gap it finds, mapped back, is the generator's gap label (the matching is exact on most samples);
    the blind piece is the one the two-stage solver's cut_piece cuts at a predicted slider point."""
    import ddddocr

    from benchmarks.captcha_latency import SlideInputs
    from data.captcha import generate_captcha
    from models.captcha_match import cut_piece

    slide = ddddocr.DdddOcr(det=False, ocr=False, show_ad=False)
    errors = []
    for i in range(6):
        s = generate_captcha((1_000_003, 0, i))
        oracle = SlideInputs(s)
        assert oracle.piece.mode == "RGBA" and oracle.background.width < s["image"].shape[1]
        errors.append(np.abs(np.subtract(oracle.gap(slide.slide_match(oracle.piece, oracle.background)), s["gap"])))
        near = (s["slider"][0] + 3, s["slider"][1])
        (x0, y0, x1, y1), _, _ = cut_piece(s["image"], near)
        assert SlideInputs(s, near).piece.size == (x1 - x0, y1 - y0)  # the two-stage solver's piece
    errors = np.array(errors)
    assert np.median(errors) <= 1.0 and (errors.max(axis=1) <= 2).sum() >= 4, errors
