"""Visual question answering data: a JSON-lines format with a validating reader, a dataset, the
BLIP training batch, and an offline builder that converts the easy-vqa package.

    python -m data.vqa build --out DIR [--val_fraction F] [--seed S] [--overwrite]

File format. One JSON object per line (blank lines are skipped):
    image          str   a path relative to the .jsonl file's folder (an absolute path also works), or a
                         base64 data URI: data:image/png;base64,...
    question       str   not empty
    answer         str   not empty; or
    answers        [str] one or more non-empty answers, e.g. the 10 human answers of VQA v2 (with both
                         keys, answer must be one of answers)
    question_type  str   optional, for per-type accuracy
    id             str   optional, unique in the file; default <file stem>:<line>
Other keys are ignored. read_jsonl checks everything it can without decoding images (JSON, keys, types,
that image files exist and that data URIs are well-formed base64) and raises one ValueError naming the
file and line; load_image decodes lazily, at item read, and names the file and line when it cannot.

easy-vqa (PyPI easy-vqa 1.0, installed with its data: 4,000 train and 1,000 test 64x64 PNGs, 38,575 and
9,673 questions, 13 answers) is converted by export_easy_vqa into train/val/test jsonl files plus:
  - val is carved from the package's train split BY IMAGE: a seeded permutation of the train image ids,
    the first round(val_fraction * 4000) are val, so no image has questions in both train and val;
  - each record holds answers = [answer] * 10, so the 10-answer VQA accuracy equals exact match here;
  - question_type is yes_no, shape or color after what the question asks for (its answer's kind);
    every wording template (below) asks for exactly one kind;
  - unseen wording: a question's template is its text with colour words replaced by <color> and shape
    words by <shape> ("is there a <color> shape?"). easy-vqa's train and test use the same 24 templates,
    so no test question has unseen wording by itself. UNSEEN_TEMPLATES therefore holds out four
    templates, one per kind of question (yes/no about a colour, yes/no about a shape, colour, shape):
    train.jsonl and val.jsonl drop every train question with those templates (6,050 questions), and
    test_unseen.jsonl holds the test questions with them (1,499). test.jsonl is the package's complete
    test split (all 9,673 questions, test_unseen's included), so its numbers compare with other work. A
    held-out template is an unseen sentence form, not unseen words: its words occur in other templates.
  - meta.json (written last) holds the counts, the held-out templates and train's majority answer with
    its accuracy on every split (the majority baseline).
The build is a pure function of (val_fraction, seed) and the package's data; it is written into a
temporary folder that is renamed to --out at the end.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test", "test_unseen")
QUESTION_TYPES = ("yes_no", "shape", "color")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
# one template per kind of question; chosen so that each kind keeps other wordings in train
UNSEEN_TEMPLATES = ("is there not a <color> shape in the image?",
                    "is a <shape> present?",
                    "what is the color of the <shape>?",
                    "what shape does the image contain?")
N_EASY_VQA_ANSWERS = 10   # copies of the single answer, the number of human answers in VQA v2
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.+)", flags=re.S)


# ---------------------------------------------------------------------------- reading

def _data_uri_bytes(ref: str) -> bytes:
    """The decoded payload of a base64 image data URI; ValueError (without location) if malformed."""
    m = _DATA_URI.fullmatch(ref)
    if m is None:
        raise ValueError(f"malformed data URI {ref[:40]!r}...; expected data:image/<type>;base64,<payload>")
    try:
        return base64.b64decode(m.group(1), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"data URI payload is not valid base64 ({e})") from None


def _text(value, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key} is {json.dumps(value)}, expected a non-empty string")
    return value


def _record(obj, where: str, base_dir: Path, answers_required: bool = True) -> dict:
    """One validated, normalised record (answers always a list, empty when absent and not required);
    ValueError prefixed with `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("image", "question") if k not in obj]
    if answers_required and "answer" not in obj and "answers" not in obj:
        missing.append("answer (or answers)")
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; keys found: {', '.join(obj) or '(none)'}")
    image = _text(obj["image"], "image", where)
    if image.startswith("data:"):
        try:
            _data_uri_bytes(image)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    elif not (base_dir / image).is_file():
        raise ValueError(f"{where}: image {image!r} not found (looked for {base_dir / image}); expected a path "
                         "relative to the jsonl file's folder or a data:image/...;base64 URI")
    question = _text(obj["question"], "question", where)
    if "answers" in obj:
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{where}: answers is {json.dumps(answers)[:60]}, expected a non-empty list of strings")
        for a in answers:
            _text(a, "an entry of answers", where)
        if "answer" in obj and _text(obj["answer"], "answer", where) not in answers:
            raise ValueError(f"{where}: answer {obj['answer']!r} is not one of answers {answers}")
    elif "answer" in obj:
        answers = [_text(obj["answer"], "answer", where)]
    else:
        answers = []  # a question to answer (predict_vqa.py), not to learn from
    record = {"image": image, "question": question, "answers": list(answers),
              "question_type": _text(obj["question_type"], "question_type", where) if "question_type" in obj else ""}
    if "id" in obj:
        record["id"] = _text(obj["id"], "id", where)
    return record


def read_jsonl(path, answers_required: bool = True) -> list[dict]:
    """Validated records of a VQA jsonl file (see the module docstring): dicts with image (as written),
    question, answers (a list; empty when absent and not answers_required), question_type ("" when absent),
    id and line (1-based, for messages). Raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found; expected a VQA .jsonl file (one JSON object per line)")
    records, seen = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{path}: line {line}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                record = _record(obj, where, path.parent, answers_required)
                record.setdefault("id", f"{path.stem}:{line}")
                if record["id"] in seen:
                    raise ValueError(f"{where}: id {record['id']!r} is already used on line {seen[record['id']]}; "
                                     "expected unique ids")
                seen[record["id"]] = line
                record["line"] = line
                records.append(record)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise ValueError(f"{path}: no records; expected one JSON object per line")
    return records


def load_image(ref: str, base_dir=".", where: str | None = None) -> Image.Image:
    """RGB PIL image from a path (relative to base_dir) or a base64 data URI. ValueError naming `where`
    (e.g. "train.jsonl: line 3") and the image when it is missing or cannot be decoded."""
    if ref.startswith("data:"):
        source = "data URI"
        try:
            data = _data_uri_bytes(ref)
        except ValueError as e:
            raise ValueError(f"{where or 'image'}: {e}") from None
    else:
        file = Path(base_dir) / ref
        source = f"image {ref!r} ({file})"
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ValueError(f"{where or file}: cannot read {source} ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")   # convert decodes every pixel: a truncated file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where or source}: {source} is not a decodable image ({type(e).__name__}: {e})") from None


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one listed first."""
    counts = collections.Counter(answers)
    return max(counts, key=counts.__getitem__)   # max keeps the first of equal counts, in listed order


class VQADataset(Dataset):
    """One VQA jsonl file. Items: image (PIL RGB), question, answers (list), answer (the most frequent of
    answers, the training target), question_type ("" when absent), id. Images are decoded at item read."""

    def __init__(self, path, max_samples: int | None = None, answers_required: bool = True):
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.path = Path(path)
        self.records = read_jsonl(self.path, answers_required)[:max_samples]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = load_image(r["image"], self.path.parent, where=f"{self.path}: line {r['line']}")
        return {"image": image, "question": r["question"], "answers": r["answers"],
                "answer": majority_answer(r["answers"]) if r["answers"] else "", "question_type": r["question_type"], "id": r["id"]}


# ---------------------------------------------------------------------------- batches

class VQACollate:
    """Items -> the BLIP training batch (reference vqa.md section 3.2):
        input_ids, attention_mask      int64 (B, Lq)      questions padded to the longest in the batch
        pixel_values                   float32 (B, 3, H, W)
        decoder_input_ids              int64 (B, La)      answer ids, [CLS] replaced by bos ([DEC]), as
                                                          generate starts; La = answer_max_length
        decoder_attention_mask         int64 (B, La)
        labels                         int64 (B, La)      decoder_input_ids with -100 on padding
    plus answers (list of lists), question_type and id (lists) for evaluation. Nothing is shifted: the
    decoder compares logits[:, :-1] with labels[:, 1:] itself. Answers longer than answer_max_length
    tokens (with [DEC] and [SEP]) are truncated, and so are questions longer than question_max_length (the
    text encoder's positions: a scratch model has as many as its longest training question needs)."""

    def __init__(self, processor, answer_max_length: int = 8, question_max_length: int | None = None):
        if answer_max_length < 3:
            raise ValueError(f"answer_max_length must be >= 3 ([DEC], one token, [SEP]), got {answer_max_length}")
        self.bos_token_id = processor.tokenizer.bos_token_id
        if self.bos_token_id is None:
            raise ValueError("the processor's tokenizer has no bos_token; BLIP's decoder starts from it "
                             "(a BertTokenizer with bos_token='[DEC]')")
        self.processor, self.answer_max_length = processor, int(answer_max_length)
        self.question_max_length = question_max_length

    def __call__(self, items: list[dict]) -> dict:
        enc = self.processor(images=[it["image"] for it in items], text=[it["question"] for it in items],
                             padding=True, truncation=self.question_max_length is not None,
                             max_length=self.question_max_length, return_tensors="pt")
        # answers get their own short length: padding them to the question length only wastes decoder steps
        ans = self.processor.tokenizer([it["answer"] for it in items], padding="max_length",
                                       max_length=self.answer_max_length, truncation=True, return_tensors="pt")
        decoder_input_ids = ans["input_ids"].clone()
        decoder_input_ids[:, 0] = self.bos_token_id
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pixel_values": enc["pixel_values"], "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": ans["attention_mask"],
                "labels": decoder_input_ids.masked_fill(ans["attention_mask"] == 0, -100),
                "answers": [list(it["answers"]) for it in items],
                "question_type": [it["question_type"] for it in items], "id": [it["id"] for it in items]}


def num_answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """int64 scalar: label tokens that carry loss, i.e. not -100 in labels[:, 1:] (the decoder's loss never
    sees position 0, which it only reads as input). Sum it over a step's micro-batches (and processes) to
    normalise the summed token loss under gradient accumulation."""
    return (labels[:, 1:] != -100).sum()


# ---------------------------------------------------------------------------- easy-vqa builder

_KIND_WORDS = {**{w: "<shape>" for w in EASY_VQA_SHAPES}, **{w: "<color>" for w in EASY_VQA_COLORS}}


def question_template(question: str) -> str:
    """The wording of an easy-vqa question: colour words -> <color>, shape words -> <shape>."""
    return re.sub(r"[a-z]+", lambda m: _KIND_WORDS.get(m.group(0), m.group(0)), question.lower())


def answer_type(answer: str) -> str:
    """yes_no, shape or color: what an easy-vqa question with this answer asks for."""
    if answer in ("yes", "no"):
        return "yes_no"
    if answer in EASY_VQA_SHAPES:
        return "shape"
    if answer in EASY_VQA_COLORS:
        return "color"
    raise ValueError(f"easy-vqa answer {answer!r} is not yes/no, a shape {EASY_VQA_SHAPES} or a colour "
                     f"{EASY_VQA_COLORS}; the installed package differs from easy-vqa 1.0")


def load_easy_vqa() -> dict:
    """{"train": ..., "test": ...} of (questions, answers, image ids, {image id: png path}) from the
    installed easy-vqa package, checked for consistency; plus "version"."""
    try:
        import easy_vqa
    except ImportError:
        raise ValueError("the easy-vqa builder needs the easy-vqa package (pip install easy-vqa), which ships "
                         "the images and questions") from None
    from importlib.metadata import PackageNotFoundError, version

    data = {"train": (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
            "test": (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    for split, (questions, answers, image_ids, paths) in data.items():
        if not len(questions) == len(answers) == len(image_ids):
            raise ValueError(f"easy-vqa {split}: {len(questions)} questions, {len(answers)} answers and "
                             f"{len(image_ids)} image ids; expected equal counts")
        absent = sorted(set(image_ids) - set(paths))
        if absent:
            raise ValueError(f"easy-vqa {split}: {len(absent)} image ids without a PNG, e.g. {absent[:5]}")
    try:
        data["version"] = version("easy-vqa")
    except PackageNotFoundError:
        data["version"] = "unknown"
    return data


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def export_easy_vqa(out_dir, val_fraction: float = 0.1, seed: int = 0, overwrite: bool = False) -> dict:
    """Write train/val/test/test_unseen.jsonl, images/ and meta.json (see the module docstring) into
    out_dir, which must be new or empty unless overwrite; returns the meta dict."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; expected a new or empty output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty; refusing to overwrite (pass --overwrite)")

    data = load_easy_vqa()
    train_q, train_a, train_img, train_paths = data["train"]
    test_q, test_a, test_img, test_paths = data["test"]
    train_templates = {question_template(q) for q in train_q}
    absent = [t for t in UNSEEN_TEMPLATES if t not in train_templates]
    if absent:
        raise ValueError(f"easy-vqa train has no question with the held-out template(s) {absent}; "
                         "the installed package differs from easy-vqa 1.0")

    image_ids = sorted(set(train_img))
    n_val = round(val_fraction * len(image_ids))
    if not 0 < n_val < len(image_ids):
        raise ValueError(f"--val_fraction {val_fraction} leaves {n_val} of {len(image_ids)} train images for val; "
                         "expected at least one image in each of train and val")
    val_images = set(np.random.default_rng(seed).permutation(image_ids)[:n_val].tolist())

    def record(split, k, question, answer, image_id):
        return {"id": f"{split}_{k:05d}", "image": f"images/{split}_{image_id}.png", "question": question,
                "answers": [answer] * N_EASY_VQA_ANSWERS, "question_type": answer_type(answer)}

    splits = {name: [] for name in SPLITS}
    held_out_train = 0
    for k, (q, a, image_id) in enumerate(zip(train_q, train_a, train_img)):
        if question_template(q) in UNSEEN_TEMPLATES:
            held_out_train += 1
            continue
        splits["val" if image_id in val_images else "train"].append(record("train", k, q, a, image_id))
    for k, (q, a, image_id) in enumerate(zip(test_q, test_a, test_img)):
        splits["test"].append(record("test", k, q, a, image_id))
        if question_template(q) in UNSEEN_TEMPLATES:
            splits["test_unseen"].append(splits["test"][-1])

    majority = majority_answer([r["answers"][0] for r in splits["train"]])
    meta = {"source": "easy-vqa", "easy_vqa_version": data["version"], "val_fraction": val_fraction, "seed": seed,
            "questions": {s: len(r) for s, r in splits.items()},
            "images": {s: len({r["image"] for r in recs}) for s, recs in splits.items()},
            "package_questions": {"train": len(train_q), "test": len(test_q)},
            "unseen_templates": list(UNSEEN_TEMPLATES), "held_out_train_questions": held_out_train,
            "question_types": {s: {t: sum(r["question_type"] == t for r in recs) for t in QUESTION_TYPES}
                               for s, recs in splits.items()},
            "majority_answer": majority,
            "majority_accuracy": {s: float(np.mean([r["answers"][0] == majority for r in recs]))
                                  for s, recs in splits.items()}}

    # build beside the target and rename at the end: an interrupted build never looks like a complete one
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "images").mkdir(parents=True)
        for split, paths, ids in (("train", train_paths, set(train_img)), ("test", test_paths, set(test_img))):
            for image_id in sorted(ids):
                shutil.copyfile(paths[image_id], tmp / "images" / f"{split}_{image_id}.png")
        for split, records in splits.items():
            _write_jsonl(tmp / f"{split}.jsonl", records)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2, as for every other user mistake
        sys.stderr.write(f"data.vqa: error: {message}\n")
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m data.vqa", description="VQA data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="convert the easy-vqa package into train/val/test/test_unseen jsonl files")
    p.add_argument("--out", required=True, help="output folder (new or empty unless --overwrite)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of train IMAGES whose questions form val")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val image split (>= 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        meta = export_easy_vqa(args.out, args.val_fraction, args.seed, args.overwrite)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    for split in SPLITS:
        types = ", ".join(f"{t} {n}" for t, n in meta["question_types"][split].items())
        print(f"{Path(args.out) / (split + '.jsonl')}: {meta['questions'][split]} questions on "
              f"{meta['images'][split]} images ({types}); majority answer {meta['majority_answer']!r} "
              f"scores {meta['majority_accuracy'][split]:.3f}")
    print(f"held out {meta['held_out_train_questions']} of {meta['package_questions']['train']} train questions "
          f"with the unseen templates: {'; '.join(meta['unseen_templates'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
