"""Unified anomaly detection data (UniAD, anomaly.md): listing and validating datasets, the train/val/test
records, the torch Dataset, and a synthetic mini-MVTec builder.

    python -m data.anomaly build --out DIR [--seed 0] [--size 128] [--n_train 48] [--n_test 20] [--n_defect 8]
    python -m data.anomaly check --data_dir DIR [--train_meta F --test_meta F] [--categories a,b]

    layout.py     Record, Splits, load_splits (folder or meta files -> validated train/val/test records),
                  list_folder, list_test, read_meta, split_val, validate, find_categories
    dataset.py    AnomalyDataset (resize, ImageNet normalisation, masks, labels), SyntheticDefects (normal
                  validation images plus defective copies with exact masks), load_image, load_mask
    synth.py      build_mini_mvtec, render_sample, add_defect, CATEGORIES: the synthetic mini-MVTec
    __main__.py   the command line

Supported layouts
    MVTec-AD      <root>/<category>/train/good/*.png, <root>/<category>/test/{good,<defect>}/*.png,
                  <root>/<category>/ground_truth/<defect>/<stem>_mask.png (0/255). A test/<defect> folder
                  without a ground_truth/<defect> folder gives defective records without masks.
    VisA          after its official split script (split_csv/1cls.csv): the same folders with test/bad and
                  ground_truth/bad/<stem>.png, JPEG images (.JPG); masks are any image with values > 0 anomalous.
                  Raw VisA (Data/Images/{Normal,Anomaly}) must be split first.
    UniAD meta    JSON lines, one object per line: filename and label (0/1) required; clsname (default
                  filename.split('/')[-4]), maskname and label_name optional; paths relative to the image folder:
        {"filename": "bottle/test/broken_large/002.png", "label": 1, "label_name": "defective",
         "maskname": "bottle/ground_truth/broken_large/002_mask.png", "clsname": "bottle"}
    Image extensions: .png .jpg .jpeg .bmp .tif .tiff, any case. MVTec LOCO / AD 2 (validation/ folders) are not
    read as such.

One model trains on every category found, or on `categories`; a category's id is its index in the sorted
names. The validation split holds normal images only, carved from train/good per category (split_val), never
from test: UniAD chose its checkpoint on the test set (anomaly.md §8 bug 2). A defective image without a mask
keeps label 1 and has_mask False instead of UniAD's all-anomalous mask (§8 bug 6). Every data mistake is one
ValueError naming the file (and line) and what was expected, raised when listing, before training starts,
except pixel data that only fails to decode at item read.
"""
from .dataset import (IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset, SyntheticDefects, image_tensor, load_image,
                      load_mask, normalise, resized_rgb)
from .layout import (IMAGE_EXTENSIONS, Record, Splits, find_categories, image_size, list_folder, list_test,
                     load_splits, read_meta, split_val, validate)
from .synth import CATEGORIES, DEFECTS, MASK_EPS, add_defect, build_mini_mvtec, min_defect_px, render_sample

__all__ = ["CATEGORIES", "DEFECTS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "MASK_EPS",
           "AnomalyDataset", "Record", "Splits", "SyntheticDefects", "add_defect", "build_mini_mvtec",
           "find_categories", "image_size", "image_tensor", "list_folder", "list_test", "load_image", "load_mask",
           "load_splits", "min_defect_px", "normalise", "read_meta", "render_sample", "resized_rgb", "split_val",
           "validate"]
