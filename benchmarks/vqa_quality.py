"""VQA accuracy of a trained train_vqa.py run against a CNN + bag-of-words baseline, per question type, on
easy-VQA's test split and on its questions with unseen wording.

    python benchmarks/vqa_quality.py --checkpoint runs/vqa/cpu --data_dir datasets/vqa --out bench_out

ours: the run's best export (``training.export.load_export`` and its processor), answers generated as
``predict_vqa.py`` does (greedy unless --num_beams). baseline: the classic easy-VQA model, trained here on
the same train.jsonl for --baseline_epochs epochs with AdamW (batch 64, lr 1e-3): a 3-block CNN (16, 32, 64
channels, 3x3 conv + ReLU + 2x2 max-pool) on the 64x64 image, global-average-pooled, and a bag of words of
the question (an EmbeddingBag of 64 over the training words, unseen words dropped), concatenated into a
2-layer MLP that classifies among the training answers. It is what "a small CNN + bag of words nearly
saturates easy-VQA" refers to; it cannot produce an answer it never saw and sees the question as an
unordered set of words. The majority row answers every question with train's most frequent answer.
Scores: ``metrics.vqa.vqa_metrics`` (official normalisation; accuracy = exact match on easy-VQA's
single-answer data) on every file given by --splits that exists in --data_dir.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Makefile runs benchmarks by path; the repo's modules live one level up

import argparse
import re
import time

import numpy as np
import torch
from torch import nn

from benchmarks.common import print_header, report, table
from data.vqa import VQADataset, load_image, majority_answer
from metrics.vqa import most_frequent_answer, vqa_metrics
from predict_vqa import answer, load_processor
from training.config import UsageError, fail
from training.export import load_export, resolve_device

WORD = re.compile(r"[a-z0-9']+")


class CnnBow(nn.Module):
    """Image CNN + question bag of words -> answer logits."""

    def __init__(self, n_words: int, n_answers: int):
        super().__init__()
        blocks = []
        for c_in, c_out in ((3, 16), (16, 32), (32, 64)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.cnn = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bow = nn.EmbeddingBag(n_words, 64, mode="mean", padding_idx=0)
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, n_answers))

    def forward(self, images, words, offsets):
        return self.head(torch.cat([self.cnn(images), self.bow(words, offsets)], dim=1))


def encode(dataset: VQADataset, vocab: dict[str, int], image_cache: dict):
    """(images float (N, 3, 64, 64) in [0, 1], word id lists, questions); each image file is decoded once."""
    images, words = [], []
    for r in dataset.records:
        key = (str(dataset.path.parent), r["image"])
        if key not in image_cache:
            image = load_image(r["image"], dataset.path.parent).resize((64, 64))
            image_cache[key] = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        images.append(image_cache[key])
        words.append([vocab.get(w, 0) for w in WORD.findall(r["question"].lower())] or [0])
    return torch.stack(images), words


def bag(word_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0] + [len(w) for w in word_lists[:-1]]).cumsum(0)
    return torch.tensor([i for w in word_lists for i in w]), offsets


def train_baseline(train: VQADataset, epochs: int, seed: int):
    """-> (model, vocab, answers, seconds)."""
    torch.manual_seed(seed)
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for r in train.records for w in WORD.findall(r["question"].lower())}))}
    targets = [majority_answer(r["answers"]) for r in train.records]
    answers = sorted(set(targets))
    index = {a: i for i, a in enumerate(answers)}
    images, words = encode(train, vocab, {})
    target = torch.tensor([index[a] for a in targets])
    model = CnnBow(len(vocab) + 1, len(answers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(target), generator=generator).split(64):
            w, o = bag([words[i] for i in batch])
            loss = nn.functional.cross_entropy(model(images[batch], w, o), target[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), vocab, answers, time.perf_counter() - start


@torch.no_grad()
def baseline_answers(model, vocab, answers, dataset: VQADataset, image_cache: dict) -> list[str]:
    images, words = encode(dataset, vocab, image_cache)
    preds = []
    for batch in torch.arange(len(words)).split(256):
        w, o = bag([words[i] for i in batch])
        preds += [answers[i] for i in model(images[batch], w, o).argmax(1).tolist()]
    return preds


def ours_answers(export, processor, dataset: VQADataset, device, num_beams: int, batch_size: int = 128) -> list[str]:
    preds, max_new = [], int(export.args.get("answer_max_length", 8))
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        preds += answer(export.model, processor, [it["image"] for it in items], [it["question"] for it in items],
                        device, max_new, num_beams)
    return preds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train_vqa.py run directory or export")
    p.add_argument("--data_dir", default="datasets/vqa", help="python -m data.vqa build folder")
    p.add_argument("--splits", default="test,test_unseen", help="jsonl files (stems) to score")
    p.add_argument("--baseline_epochs", type=int, default=20, help="epochs of the CNN + bag-of-words baseline")
    p.add_argument("--num_beams", type=int, default=1, help="beam width for ours")
    p.add_argument("--seed", type=int, default=0, help="baseline initialisation and batch order")
    p.add_argument("--device", default="cpu", help="device for ours (the baseline runs on the CPU)")
    p.add_argument("--out", default=None, help="folder for the .md/.json report")
    flags = p.parse_args()
    data_dir = Path(flags.data_dir)
    try:
        device = resolve_device(flags.device)
        export = load_export(flags.checkpoint)
        train = VQADataset(data_dir / "train.jsonl")
        splits = {s: VQADataset(data_dir / f"{s}.jsonl") for s in flags.splits.split(",")
                  if (data_dir / f"{s}.jsonl").is_file()}
    except (UsageError, ValueError) as e:
        fail(str(e))
    if not splits:
        fail(f"--splits {flags.splits}: none of these files is in {data_dir}")
    export.model.to(device)
    processor = load_processor(export)
    info = print_header("VQA: train_vqa.py against a CNN + bag-of-words baseline")
    model, vocab, answers, baseline_s = train_baseline(train, flags.baseline_epochs, flags.seed)
    print(f"baseline: {sum(q.numel() for q in model.parameters())} parameters, {flags.baseline_epochs} epochs in "
          f"{baseline_s / 60:.1f} min", flush=True)
    majority = most_frequent_answer([a for r in train.records for a in r["answers"]])
    rows, cache = [], {}
    for name, dataset in splits.items():
        types = [r["question_type"] or "other" for r in dataset.records]
        gts = [r["answers"] for r in dataset.records]
        start = time.perf_counter()
        ours = ours_answers(export, processor, dataset, device, flags.num_beams)
        ours_s = time.perf_counter() - start
        base = baseline_answers(model, vocab, answers, dataset, cache)
        for method, preds in (("ours", ours), ("CNN + bag of words", base), ("majority answer", [majority] * len(gts))):
            scores = vqa_metrics(preds, gts, types)
            row = {"split": name, "method": method, "questions": len(gts), "accuracy": scores["accuracy"]}
            row.update({t: scores[f"accuracy/{t}"] for t in sorted(set(types))})
            if method == "ours":
                row["questions/s"] = len(gts) / ours_s
            rows.append(row)
    type_columns = sorted({t for d in splits.values() for t in (r["question_type"] or "other" for r in d.records)})
    notes = [f"ours: {export.folder} ({sum(q.numel() for q in export.model.parameters()) / 1e6:.2f} M parameters), "
             f"beams {flags.num_beams}, on {device}; baseline: {flags.baseline_epochs} epochs, "
             f"{baseline_s / 60:.1f} min on the CPU; majority answer '{majority}'.",
             "accuracy = official VQA accuracy (10 identical answers per question: equal to exact match), %."]
    report("vqa_quality", "VQA accuracy per question type", info,
           [table(rows, ["split", "method", "questions", "accuracy", *type_columns, "questions/s"])], notes, flags.out)


if __name__ == "__main__":
    main()
