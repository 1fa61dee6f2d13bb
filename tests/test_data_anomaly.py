"""Anomaly data (data/anomaly/): the synthetic mini-MVTec (layout, counts, exact masks, defect size,
determinism), folder and UniAD meta-file listing, the normal-only validation split, category subsets, every
data error naming its file, and AnomalyDataset items."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import call_main
from data.anomaly import (CATEGORIES, IMAGENET_MEAN, IMAGENET_STD, MASK_EPS, AnomalyDataset, Record,
                          SyntheticDefects, add_defect, build_mini_mvtec, list_folder, list_test, load_splits,
                          min_defect_px, read_meta, render_sample, split_val)
from data.anomaly.__main__ import main as anomaly_main

SIZE, SEED, N_TRAIN, N_TEST, N_DEFECT = 48, 3, 6, 2, 2


def build_small(out: Path, seed: int = SEED, **kw) -> dict:
    return build_mini_mvtec(out, seed=seed, size=SIZE, n_train=N_TRAIN, n_test=N_TEST, n_defect=N_DEFECT, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("anomaly") / "mini"
    build_small(root)
    return root


@pytest.fixture
def nut(built, tmp_path) -> Path:
    """A writable copy of one category of the built set."""
    shutil.copytree(built / "nut", tmp_path / "data" / "nut")
    return tmp_path / "data"


def png(path: Path, size=(8, 8), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)
    return path


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- the synthetic set

def test_build_writes_the_mvtec_layout_with_counts_and_meta(built):
    meta = json.loads((built / "meta.json").read_text())
    assert (meta["seed"], meta["size"], meta["n_train"]) == (SEED, SIZE, N_TRAIN)
    assert set(meta["categories"]) == set(CATEGORIES)
    kinds = [kind for kind, _ in CATEGORIES.values()]
    assert kinds.count("texture") >= 3 and kinds.count("object") >= 2
    assert {d for _, defects in CATEGORIES.values() for d in defects} == {"scratch", "hole", "color", "cutpaste",
                                                                          "crack", "missing"}
    for cat, (_, defects) in CATEGORIES.items():
        assert len(list((built / cat / "train" / "good").glob("*.png"))) == N_TRAIN
        assert sorted(p.name for p in (built / cat / "test").iterdir()) == sorted(["good", *defects])
        assert len(list((built / cat / "test" / "good").glob("*.png"))) == N_TEST
        for d in defects:
            stems = sorted(p.stem for p in (built / cat / "test" / d).glob("*.png"))
            assert stems == [f"{i:03d}" for i in range(N_DEFECT)]
            masks = sorted(p.name for p in (built / cat / "ground_truth" / d).iterdir())
            assert masks == [f"{s}_mask.png" for s in stems]
            mask = Image.open(built / cat / "ground_truth" / d / "000_mask.png")
            assert mask.mode == "L" and mask.size == (SIZE, SIZE)
            assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert meta["images"] == {"train": 6 * N_TRAIN, "test": 6 * N_TEST + 18 * N_DEFECT, "test_defective": 18 * N_DEFECT}
    image = Image.open(built / "brick" / "train" / "good" / "000.png")
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_masks_are_exactly_where_the_image_changed(built):
    extent, area = min_defect_px(SIZE)
    for cat, (_, defects) in CATEGORIES.items():
        for kind in ("good", *defects):
            for i in range(N_TEST if kind == "good" else N_DEFECT):
                clean, image, mask = render_sample(cat, kind, i, SEED, SIZE)
                assert np.array_equal(np.asarray(Image.open(built / cat / "test" / kind / f"{i:03d}.png")), image)
                if kind == "good":
                    assert np.array_equal(clean, image) and not mask.any()
                    continue
                on_disk = np.asarray(Image.open(built / cat / "ground_truth" / kind / f"{i:03d}_mask.png")) == 255
                change = np.abs(image.astype(int) - clean.astype(int)).max(-1)
                assert np.array_equal(on_disk, mask) and np.array_equal(mask, change > 0), (cat, kind, i)
                assert change[mask].min() > MASK_EPS
                ys, xs = np.nonzero(mask)
                assert mask.sum() >= area and max(np.ptp(ys), np.ptp(xs)) + 1 >= extent


def test_defects_cover_a_feature_cell_at_the_default_size():
    # 64 px: a stride-16 feature map is 4 x 4, so a defect must reach one 16-px cell (anomaly.md §5.2)
    assert min_defect_px(64) == (16, 43)
    for cat, (_, defects) in CATEGORIES.items():
        for d in defects:
            for i in range(4):
                _, _, mask = render_sample(cat, d, i, seed=11, size=64)
                ys, xs = np.nonzero(mask)
                assert max(np.ptp(ys), np.ptp(xs)) + 1 >= 16 and mask.sum() >= 43, (cat, d, i)


def test_normal_images_vary_within_a_category(built):
    for cat in CATEGORIES:
        paths = sorted((built / cat / "train" / "good").iterdir())
        images = [np.asarray(Image.open(p), dtype=np.float32) for p in paths]
        assert len({a.tobytes() for a in images}) == N_TRAIN
        # more than sensor noise apart: pose, crop and colour differ between two normal images
        assert np.abs(images[0] - images[1]).mean() > 3, cat


def test_build_is_deterministic_by_seed(built, tmp_path):
    again = tmp_path / "again"
    build_small(again)
    assert files(again) == files(built)
    build_small(tmp_path / "other", seed=SEED + 1)
    other, reference = files(tmp_path / "other"), files(built)
    assert other.keys() == reference.keys()
    pngs = [k for k in reference if k.endswith(".png") and "ground_truth" not in k]
    assert sum(other[k] != reference[k] for k in pngs) == len(pngs)


def test_build_refuses_bad_arguments_and_a_non_empty_folder(tmp_path):
    png(tmp_path / "full" / "x.png")
    with pytest.raises(ValueError, match="full: exists and is not empty; refusing to overwrite"):
        build_small(tmp_path / "full")
    with pytest.raises(ValueError, match="unknown synthetic category bottle; expected some of brick"):
        build_small(tmp_path / "a", categories=["bottle"])
    with pytest.raises(ValueError, match="--size must be an integer >= 32"):
        build_mini_mvtec(tmp_path / "b", size=16)
    with pytest.raises(ValueError, match="kind 'scratch' for brick"):
        render_sample("brick", "scratch", 0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- listing and splits

def test_folder_listing_counts_labels_and_pairs_masks(built):
    train, test = list_folder(built)
    for cat, (_, defects) in CATEGORIES.items():
        assert sum(r.category == cat for r in train) == N_TRAIN
        assert sum(r.category == cat and r.label == 0 for r in test) == N_TEST
        assert sum(r.category == cat and r.label == 1 for r in test) == len(defects) * N_DEFECT
    assert all(r.label == 0 and r.defect == "good" and r.mask is None and r.has_mask for r in train)
    for r in test:
        p = Path(r.path)
        assert r.defect == p.parent.name and r.label == (r.defect != "good") and r.has_mask
        expected = None if r.label == 0 else str(built / r.category / "ground_truth" / r.defect / f"{p.stem}_mask.png")
        assert r.mask == expected


def test_meta_files_give_the_same_records_as_the_folder(built):
    from_folder = load_splits(built, val_fraction=0.2, seed=1)
    from_meta = load_splits(built, val_fraction=0.2, seed=1, train_meta=built / "train.jsonl",
                            test_meta=built / "test.jsonl")
    assert from_meta == from_folder
    assert from_folder.categories == tuple(sorted(CATEGORIES))


def test_val_split_is_normal_disjoint_per_category_and_fixed_by_seed(built):
    s = load_splits(built, val_fraction=0.34, seed=5)
    for cat in CATEGORIES:
        val = [r for r in s.val if r.category == cat]
        train = [r for r in s.train if r.category == cat]
        assert len(val) == round(0.34 * N_TRAIN) and len(train) == N_TRAIN - len(val)
        assert all("/train/good/" in r.path for r in val + train)
    assert all(r.label == 0 for r in s.val) and not {r.path for r in s.val} & {r.path for r in s.train}
    assert not {r.path for r in s.val} & {r.path for r in s.test}
    assert sorted(r.path for r in s.train + s.val) == sorted(r.path for r in list_folder(built)[0])
    assert load_splits(built, val_fraction=0.34, seed=5) == s
    assert {r.path for r in load_splits(built, val_fraction=0.34, seed=6).val} != {r.path for r in s.val}
    # a category's draw ignores the other categories
    assert load_splits(built, ["nut"], val_fraction=0.34, seed=5).val == [r for r in s.val if r.category == "nut"]
    assert load_splits(built, val_fraction=0).val == []
    with pytest.raises(ValueError, match="category 'brick' has 6 training image\\(s\\); val_fraction 0.95"):
        load_splits(built, val_fraction=0.95)
    with pytest.raises(ValueError, match="a defective image among the training records"):
        split_val([Record("x.png", "a", 1, "crack")], 0.5, 0)


def test_categories_subset_and_unknown_names(built):
    s = load_splits(built, categories=["wood", "brick"])
    assert s.categories == ("brick", "wood")
    assert {r.category for r in s.train + s.val + s.test} == {"brick", "wood"}
    for kw in ({}, {"train_meta": built / "train.jsonl", "test_meta": built / "test.jsonl"}):
        with pytest.raises(ValueError, match="unknown category bottle requested; found: brick, capsule, grass"):
            load_splits(built, categories=["wood", "bottle"], **kw)
    meta = load_splits(built, categories=["nut"], train_meta=built / "train.jsonl", test_meta=built / "test.jsonl")
    assert meta.categories == ("nut",) and {r.category for r in meta.test} == {"nut"}


# ---------------------------------------------------------------------------- meta files

@pytest.fixture
def images(tmp_path) -> Path:
    for rel in ("pcb/train/good/000.png", "pcb/train/good/001.png", "pcb/test/good/000.png", "pcb/test/bent/000.png",
                "pcb/test/bent/001.png"):
        png(tmp_path / rel)
    png(tmp_path / "pcb/ground_truth/bent/000_mask.png", mode="L", value=255)
    return tmp_path


def test_meta_records_fallbacks_and_a_defective_image_without_mask(images):
    train = write_lines(images / "train.jsonl", [{"filename": "pcb/train/good/000.png", "label": 0},
                                                 "", {"filename": "pcb/train/good/001.png", "label": 0,
                                                      "label_name": "good", "clsname": "pcb"}])
    test = write_lines(images / "test.jsonl", [
        {"filename": "pcb/test/good/000.png", "label": 0, "label_name": "good"},
        {"filename": "pcb/test/bent/000.png", "label": 1, "label_name": "defective",
         "maskname": "pcb/ground_truth/bent/000_mask.png"},
        {"filename": "pcb/test/bent/001.png", "label": 1, "label_name": "defective"}])
    s = load_splits(images, val_fraction=0.5, train_meta=train, test_meta=test)
    assert s.categories == ("pcb",) and len(s.train) == len(s.val) == 1
    with_mask, without, good = s.test   # sorted by path: bent/000, bent/001, good/000
    assert (good.label, good.defect, good.mask, good.has_mask) == (0, "good", None, True)
    assert (with_mask.defect, with_mask.has_mask) == ("bent", True)
    assert (without.label, without.defect, without.mask, without.has_mask) == (1, "bent", None, False)
    item = AnomalyDataset(s.test, s.categories, 8)[1]
    assert item["label"] == 1 and not item["has_mask"] and item["mask"].sum() == 0   # no invented 255 mask
    assert item["defect"] == "bent" and item["path"].endswith("bent/001.png")
    assert AnomalyDataset(s.test, s.categories, 8)[0]["mask"].min() == 1


@pytest.mark.parametrize("line, message", [
    ('{"filename": "pcb/test/good/000.png", "label": 0', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object, got list"),
    ({"filename": "pcb/test/good/000.png"}, "line 2: missing key\\(s\\) label; keys found: filename"),
    ({"label": 0}, "line 2: missing key\\(s\\) filename"),
    ({"filename": "pcb/test/good/000.png", "label": 2}, "line 2: label is 2, expected 0 \\(normal\\) or 1"),
    ({"filename": "pcb/test/good/009.png", "label": 0}, "line 2: image 'pcb/test/good/009.png' not found"),
    ({"filename": "pcb/test/bent/000.png", "label": 1, "maskname": "pcb/nope.png"},
     "line 2: mask 'pcb/nope.png' not found"),
    ({"filename": "000.png", "label": 0}, "line 2: no clsname, and filename '000.png' has fewer than 4 path parts"),
    ({"filename": "pcb/test/good/000.png", "label": 0, "clsname": ""}, "line 2: clsname is \"\""),
    ({"filename": "pcb/train/good/000.png", "label": 0}, "line 2: pcb/train/good/000.png is already listed on line 1"),
])
def test_meta_line_errors_name_the_file_and_line(images, line, message):
    path = write_lines(images / "bad.jsonl", [{"filename": "pcb/train/good/000.png", "label": 0}, line])
    with pytest.raises(ValueError, match=f"bad.jsonl: {message}"):
        read_meta(path, images)


def test_meta_file_level_errors(images):
    train = write_lines(images / "train.jsonl", [{"filename": "pcb/train/good/000.png", "label": 0}])
    with pytest.raises(ValueError, match="t1.jsonl: line 1: label 1 in a training meta file"):
        load_splits(images, train_meta=write_lines(images / "t1.jsonl", [{"filename": "pcb/test/bent/000.png",
                                                                           "label": 1}]), test_meta=train)
    (images / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        read_meta(images / "empty.jsonl", images)
    with pytest.raises(ValueError, match="missing.jsonl: meta file not found"):
        read_meta(images / "missing.jsonl", images)
    with pytest.raises(ValueError, match="give both meta files or neither"):
        load_splits(images, train_meta=train)
    other = write_lines(images / "other.jsonl", [{"filename": "pcb/test/good/000.png", "label": 0, "clsname": "cpu"}])
    with pytest.raises(ValueError, match="other.jsonl: category cpu has no training images in .*train.jsonl"):
        load_splits(images, val_fraction=0, train_meta=train, test_meta=other)


# ---------------------------------------------------------------------------- folder errors

def _drop_mask(root):
    (root / "nut/ground_truth/scratch/001_mask.png").unlink()


def _empty_category(root):
    (root / "screw/train/good").mkdir(parents=True)
    png(root / "screw/test/good/000.png")


def _garbage_image(root):
    (root / "nut/train/good/003.png").write_bytes(b"not a png at all")


def _garbage_mask(root):
    (root / "nut/ground_truth/color/000_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


def _small_mask(root):
    png(root / "nut/ground_truth/missing/001_mask.png", size=(24, 20), mode="L", value=255)


@pytest.mark.parametrize("mutate, message", [
    (_drop_mask, "nut/test/scratch/001.png: defective test image has no mask in .*nut/ground_truth/scratch "
                 "\\(expected 001_mask.png or 001.png"),
    (_empty_category, "screw/train/good: no images; every category needs normal training images"),
    (_garbage_image, "nut/train/good/003.png: not a readable image \\(UnidentifiedImageError"),
    (_garbage_mask, "nut/ground_truth/color/000_mask.png: not a readable mask"),
    (_small_mask, f"nut/ground_truth/missing/001_mask.png: mask is 24x20 px but its image .*nut/test/missing/001.png "
                  f"is {SIZE}x{SIZE} px"),
])
def test_folder_errors_name_the_file(nut, mutate, message):
    mutate(nut)
    with pytest.raises(ValueError, match=message):
        load_splits(nut)


def test_a_bad_category_outside_the_subset_is_not_read(nut):
    _empty_category(nut)
    assert load_splits(nut, categories=["nut"]).categories == ("nut",)
    with pytest.raises(ValueError, match="unknown category bolt requested; found: nut, screw"):
        load_splits(nut, categories=["bolt"])


def test_defect_without_ground_truth_folder_is_classification_only(nut):
    shutil.rmtree(nut / "nut/ground_truth/missing")
    test = load_splits(nut).test
    missing = [r for r in test if r.defect == "missing"]
    assert len(missing) == N_DEFECT and all(r.label == 1 and r.mask is None and not r.has_mask for r in missing)
    assert all(r.has_mask for r in test if r.defect != "missing")


def test_visa_style_names_are_read(tmp_path):
    png(tmp_path / "candle/train/good/000.JPG")
    png(tmp_path / "candle/test/bad/007.JPG")
    png(tmp_path / "candle/ground_truth/bad/007.png", mode="L", value=1)
    (tmp_path / "split_csv").mkdir()   # not a category: no train/ or test/ inside
    s = load_splits(tmp_path, val_fraction=0)
    assert s.categories == ("candle",)
    (r,) = s.test
    assert (r.label, r.defect, Path(r.mask).name) == (1, "bad", "007.png")
    assert AnomalyDataset(s.test, s.categories, 4)[0]["mask"].min() == 1   # values 0/1, not 0/255


def test_a_truncated_image_fails_at_item_read_naming_it(nut):
    path = nut / "nut/test/good/000.png"
    path.write_bytes(path.read_bytes()[:120])   # the header still parses, the pixels do not
    s = load_splits(nut)
    ds = AnomalyDataset(s.test, s.categories, 16)
    with pytest.raises(ValueError, match="nut/test/good/000.png: cannot decode image"):
        ds[[r.path for r in s.test].index(str(path))]


# ---------------------------------------------------------------------------- the Dataset

def test_dataset_items_shapes_normalisation_and_masks(built):
    s = load_splits(built)
    ds = AnomalyDataset(s.test, s.categories, input_size=(32, 40))
    k = next(i for i, r in enumerate(s.test) if r.label == 1)
    item = ds[k]
    r = s.test[k]
    assert item["image"].shape == (3, 32, 40) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 40) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert (item["label"].item(), item["has_mask"].item(), item["index"].item()) == (1, True, k)
    assert item["category"].item() == s.categories.index(r.category) and item["path"] == r.path
    expected = np.asarray(Image.open(r.path).resize((40, 32), Image.BILINEAR), dtype=np.float32) / 255
    raw = item["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(raw, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    nearest = np.asarray(Image.open(r.mask).resize((40, 32), Image.NEAREST)) > 0
    assert np.array_equal(item["mask"][0].numpy() > 0, nearest)
    assert all(torch.equal(a, b) for a, b in zip(ds[k].values(), item.values()) if torch.is_tensor(a))
    normal = ds[next(i for i, r in enumerate(s.test) if r.label == 0)]
    assert normal["mask"].sum() == 0 and normal["has_mask"] and normal["label"] == 0
    batch = next(iter(DataLoader(AnomalyDataset(s.train, s.categories, 32), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [0] * 4 and len(batch["path"]) == 4
    with pytest.raises(ValueError, match="categories brick, capsule, grass, gravel, nut, wood are not in categories"):
        AnomalyDataset(s.test, ["screw"])
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        AnomalyDataset(s.test, s.categories, 0)


# ---------------------------------------------------------------------------- command line

def test_command_line_build_and_check(tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, _ = call_main(capsys, anomaly_main, "build", "--out", out, "--size", 32, "--n_train", 3,
                                "--n_test", 1, "--n_defect", 1, "--categories", "grass,nut", "--seed", 2)
    assert code == 0 and "2 categories of 32x32 px, 6 train and 8 test images (6 defective)" in stdout
    code, stdout, _ = call_main(capsys, anomaly_main, "check", "--data_dir", out, "--val_fraction", 0.34)
    assert code == 0 and stdout.splitlines()[1].split() == ["grass", "2", "1", "4", "3", "0"]
    code, _, err = call_main(capsys, anomaly_main, "build", "--out", out)
    assert code == 2 and "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = call_main(capsys, anomaly_main, "check", "--data_dir", out, "--categories", "wood")
    assert code == 2 and err.startswith("data.anomaly: error: ") and "found: grass, nut" in err


def test_synthetic_defects_on_validation_images(built):
    s = load_splits(built, val_fraction=0.34, seed=0)
    base = AnomalyDataset(s.val, s.categories, 32)
    ds = SyntheticDefects(base, copies=2, seed=4)
    n = len(base)
    assert len(ds) == 3 * n
    assert torch.equal(ds[1]["image"], base[1]["image"]) and ds[1]["label"] == 0
    extent, area = min_defect_px(32)
    for j in (n, n + 1, 2 * n + 1):
        item, source = ds[j], base[(j - n) % n]
        assert item["label"] == 1 and item["has_mask"] and item["index"] == j and item["path"] == source["path"]
        assert item["defect"].startswith("synthetic_") and item["category"] == source["category"]
        mask = item["mask"][0].numpy() > 0
        changed = (item["image"] - source["image"]).abs().amax(0).numpy() > 1e-6
        assert np.array_equal(mask, changed) and mask.sum() >= area
        assert torch.equal(ds[j]["image"], item["image"])   # a pure function of (seed, i, copy)
    assert not torch.equal(SyntheticDefects(base, 2, seed=5)[n]["image"], ds[n]["image"])
    with pytest.raises(ValueError, match="SyntheticDefects takes normal images only"):
        SyntheticDefects(AnomalyDataset(s.test, s.categories, 32))
    with pytest.raises(ValueError, match="needs a square input_size, got 32x40"):
        SyntheticDefects(AnomalyDataset(s.val, s.categories, (32, 40)))


def test_add_defect_on_any_image_and_its_errors():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for kind in ("color", "crack", "cutpaste", "hole", "scratch"):
        image, mask = add_defect(clean, kind, np.random.default_rng(1))
        assert np.array_equal(mask, (image != clean).any(-1)) and mask.any()
    with pytest.raises(ValueError, match="missing defect needs an object category"):
        add_defect(clean, "missing", rng)
    with pytest.raises(ValueError, match="unknown defect 'dent'"):
        add_defect(clean, "dent", rng)
    with pytest.raises(ValueError, match="square \\(S, S, 3\\) uint8"):
        add_defect(clean[:, :30], "hole", rng)


def test_list_test_needs_no_training_images(nut):
    shutil.rmtree(nut / "nut" / "train")
    records = list_test(nut)
    assert len(records) == N_TEST + 3 * N_DEFECT and {r.category for r in records} == {"nut"}
    assert sum(r.label for r in records) == 3 * N_DEFECT
    with pytest.raises(ValueError, match="unknown category wood requested; found: nut"):
        list_test(nut, ["wood"])
    with pytest.raises(ValueError, match="nut/train/good: no images"):
        load_splits(nut)
