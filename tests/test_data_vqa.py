"""VQA data (data/vqa.py): the jsonl reader and its errors, path and data-URI images, dataset items, the BLIP
training batch built by VQACollate, and the easy-vqa export with its image-disjoint val split and held-out
wordings. No network: the tokenizer is built from a word list here, easy-vqa ships its data."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

import data.vqa as vqa
from conftest import call_main
from data.vqa import (QUESTION_TYPES, UNSEEN_TEMPLATES, VQACollate, VQADataset, answer_type, export_easy_vqa,
                      load_image, majority_answer, num_answer_tokens, question_template, read_jsonl)

WORDS = "what color is the shape circle rectangle triangle red green blue yes no there a in image".split()


def png_bytes(color=(200, 30, 40), size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def write_lines(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes())
    return tmp_path


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True, bos_token="[DEC]")
    return BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy") / "easy_vqa"
    meta = export_easy_vqa(out, val_fraction=0.1, seed=0)
    return out, meta, {s: read_jsonl(out / f"{s}.jsonl") for s in vqa.SPLITS}


# ---------------------------------------------------------------------------- reading

def test_records_are_normalised_and_images_resolve_against_the_jsonl_folder(folder):
    uri = data_uri(png_bytes((0, 0, 255)))
    path = write_lines(folder / "qa.jsonl", [
        {"image": "imgs/a.png", "question": "what color?", "answer": "red"},
        "",
        {"image": uri, "question": "is it blue?", "answers": ["yes", "yes", "no"], "question_type": "yes_no",
         "id": "q7", "extra": 1},
        {"image": str(folder / "imgs" / "a.png"), "question": "q?", "answer": "a", "answers": ["b", "a"]}])
    records = read_jsonl(path)
    assert [r["id"] for r in records] == ["qa:1", "q7", "qa:4"]
    assert [r["line"] for r in records] == [1, 3, 4]
    assert records[0]["answers"] == ["red"] and records[0]["question_type"] == ""
    assert records[1]["answers"] == ["yes", "yes", "no"] and records[1]["question_type"] == "yes_no"
    assert "extra" not in records[1]
    assert records[2]["answers"] == ["b", "a"]
    # the path is relative to the jsonl's folder, not to the working directory
    assert np.array(load_image(records[0]["image"], folder)).shape == (12, 20, 3)
    assert np.array(load_image(records[2]["image"], "/nonexistent")).shape == (12, 20, 3)



def test_questions_without_answers_are_read_only_when_answers_are_not_required(folder):
    path = write_lines(folder / "ask.jsonl", [{"image": "imgs/a.png", "question": "what color?"},
                                              {"image": "imgs/a.png", "question": "is it red?", "answer": "yes"}])
    with pytest.raises(ValueError, match="line 1: missing key.s. answer"):
        read_jsonl(path)
    records = read_jsonl(path, answers_required=False)
    assert [r["answers"] for r in records] == [[], ["yes"]]
    assert VQADataset(path, answers_required=False)[0]["answer"] == ""


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["image", "question"]', "expected a JSON object, got list"),
    ({"question": "q?", "answer": "a"}, "missing key(s) image"),
    ({"image": "imgs/a.png", "answer": "a"}, "missing key(s) question"),
    ({"image": "imgs/a.png", "question": "q?"}, "missing key(s) answer (or answers)"),
    ({"image": "imgs/a.png", "question": "  ", "answer": "a"}, "question is"),
    ({"image": "imgs/a.png", "question": "q?", "answer": ""}, "answer is"),
    ({"image": "imgs/a.png", "question": "q?", "answer": 3}, "answer is 3"),
    ({"image": "imgs/a.png", "question": "q?", "answers": []}, "answers is []"),
    ({"image": "imgs/a.png", "question": "q?", "answers": "yes"}, "expected a non-empty list"),
    ({"image": "imgs/a.png", "question": "q?", "answers": ["yes", ""]}, "an entry of answers"),
    ({"image": "imgs/a.png", "question": "q?", "answer": "no", "answers": ["yes"]}, "is not one of answers"),
    ({"image": "imgs/missing.png", "question": "q?", "answer": "a"}, "image 'imgs/missing.png' not found"),
    ({"image": "", "question": "q?", "answer": "a"}, "image is"),
    ({"image": "data:image/png;base64,###", "question": "q?", "answer": "a"}, "not valid base64"),
    ({"image": "data:text/plain;base64,aGVsbG8=", "question": "q?", "answer": "a"}, "malformed data URI"),
    ({"image": "data:image/png,rawbytes", "question": "q?", "answer": "a"}, "malformed data URI"),
    ({"image": "imgs/a.png", "question": "q?", "answer": "a", "id": "first"}, "id 'first' is already used on line 1"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_each_bad_line_is_one_error_naming_file_and_line(folder, bad, message):
    good = {"image": "imgs/a.png", "question": "what color?", "answer": "red", "id": "first"}
    path = write_lines(folder / "bad.jsonl", [good, "", bad])
    with pytest.raises(ValueError) as e:
        read_jsonl(path)
    text = str(e.value)
    assert text.startswith(f"{path}: line 3: ") and message in text
    assert "\n" not in text


def test_missing_or_empty_file_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.jsonl: file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl: not UTF-8"):
        read_jsonl(tmp_path / "latin.jsonl")


def test_data_uri_round_trip_is_lossless_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = load_image(data_uri(buf.getvalue()))
    assert image.mode == "RGB" and np.array_equal(np.array(image), pixels)
    grey = load_image(data_uri(png_bytes(77, mode="L")))
    assert grey.mode == "RGB" and np.all(np.array(grey) == 77)
    rgba = load_image(data_uri(png_bytes((1, 2, 3, 128), mode="RGBA")))
    assert rgba.mode == "RGB" and tuple(np.array(rgba)[0, 0]) == (1, 2, 3)


def test_undecodable_images_fail_at_item_read_naming_file_and_line(folder):
    (folder / "imgs" / "junk.png").write_bytes(b"not a png at all")
    (folder / "imgs" / "cut.png").write_bytes(png_bytes()[:60])   # a truncated file: header only
    path = write_lines(folder / "qa.jsonl", [
        {"image": "imgs/a.png", "question": "q?", "answer": "a"},
        {"image": "imgs/junk.png", "question": "q?", "answer": "a"},
        {"image": data_uri(b"garbage bytes"), "question": "q?", "answer": "a"},
        {"image": "imgs/cut.png", "question": "q?", "answer": "a"}])
    ds = VQADataset(path)                         # existence is checked up front, decodability lazily
    assert len(ds) == 4 and ds[0]["image"].mode == "RGB"
    for i, what in ((1, "junk.png"), (2, "data URI"), (3, "cut.png")):
        with pytest.raises(ValueError) as e:
            ds[i]
        assert str(e.value).startswith(f"{path}: line {i + 1}: ") and what in str(e.value)
        assert "not a decodable image" in str(e.value) and "\n" not in str(e.value)


def test_dataset_items_and_the_majority_answer(folder):
    path = write_lines(folder / "qa.jsonl", [
        {"image": "imgs/a.png", "question": "what color?", "answers": ["red", "blue", "blue", "red"]},
        {"image": "imgs/a.png", "question": "what shape?", "answers": ["circle", "square", "square"],
         "question_type": "shape", "id": "s1"}])
    ds = VQADataset(path)
    item = ds[0]
    assert set(item) == {"image", "question", "answers", "answer", "question_type", "id"}
    assert item["answer"] == "red"                # tie: the first listed wins
    assert item["image"].size == (20, 12) and item["image"].mode == "RGB"
    assert item["question"] == "what color?" and item["question_type"] == "" and item["id"] == "qa:1"
    assert ds[1]["answer"] == "square" and ds[1]["question_type"] == "shape" and ds[1]["id"] == "s1"
    assert len(VQADataset(path, max_samples=1)) == 1
    assert majority_answer(["b", "a", "a", "b", "c"]) == "b"
    with pytest.raises(ValueError, match="max_samples"):
        VQADataset(path, max_samples=0)


# ---------------------------------------------------------------------------- batches

def items_for(questions_answers):
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    return [{"image": image, "question": q, "answers": [a] * 3, "answer": a, "question_type": t, "id": f"i{k}"}
            for k, (q, a, t) in enumerate(questions_answers)]


def test_collate_builds_the_reference_batch(processor):
    tok = processor.tokenizer
    items = items_for([("is there a red circle in the image?", "yes", "yes_no"),
                       ("what color is the shape?", "blue", "color"),
                       ("what shape?", "red green blue triangle circle yes no", "shape")])   # answer too long
    batch = VQACollate(processor, answer_max_length=6)(items)
    b, lq = batch["input_ids"].shape
    assert b == 3 and lq == len(tok(items[0]["question"]).input_ids) == 11   # 8 words, "?", [CLS], [SEP]
    assert batch["attention_mask"].shape == (3, lq)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    for key in ("decoder_input_ids", "decoder_attention_mask", "labels"):
        assert batch[key].shape == (3, 6) and batch[key].dtype == torch.int64   # answers' own length
    dec, mask, labels = batch["decoder_input_ids"], batch["decoder_attention_mask"], batch["labels"]
    assert torch.all(dec[:, 0] == tok.bos_token_id) and tok.convert_ids_to_tokens(int(dec[0, 0])) == "[DEC]"
    # unshifted: after [DEC] come the answer's tokens, then [SEP], then padding
    assert dec[0].tolist() == [tok.bos_token_id, tok.convert_tokens_to_ids("yes"), tok.sep_token_id, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert dec[2, -1].item() == tok.sep_token_id and mask[2].tolist() == [1] * 6   # truncated, still ends in [SEP]
    assert torch.equal(labels == -100, mask == 0)
    assert torch.equal(labels[mask == 1], dec[mask == 1])
    for key in ("input_ids", "decoder_input_ids"):
        assert batch[key].min() >= 0 and batch[key].max() < len(tok)
    assert batch["answers"] == [it["answers"] for it in items]
    assert batch["question_type"] == ["yes_no", "color", "shape"] and batch["id"] == ["i0", "i1", "i2"]
    # loss-carrying tokens: "yes" [SEP], "blue" [SEP], five tokens up to the truncation [SEP]
    assert num_answer_tokens(labels).item() == 2 + 2 + 5 == int(mask[:, 1:].sum())


def test_answers_are_padded_to_their_own_length_not_the_questions(processor):
    short = VQACollate(processor, answer_max_length=8)(items_for([("what?", "red", "color"), ("is?", "no", "")]))
    assert short["input_ids"].shape[1] < 8 and short["labels"].shape == (2, 8)
    long_q = "is there a red circle in the image or a blue triangle or a green rectangle?"
    batch = VQACollate(processor, answer_max_length=8)(items_for([(long_q, "red", "color")]))
    assert batch["input_ids"].shape[1] > 8 and batch["labels"].shape == (1, 8)
    assert num_answer_tokens(batch["labels"]).item() == 2
    with pytest.raises(ValueError, match="answer_max_length"):
        VQACollate(processor, answer_max_length=2)


def test_collate_works_through_a_dataloader(folder, processor):
    path = write_lines(folder / "qa.jsonl", [
        {"image": "imgs/a.png", "question": "what color is the shape?", "answer": "red"},
        {"image": data_uri(png_bytes()), "question": "is there a circle?", "answers": ["no"] * 10,
         "question_type": "yes_no"}])
    loader = torch.utils.data.DataLoader(VQADataset(path), batch_size=2, collate_fn=VQACollate(processor))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].shape == (2, 8)
    assert batch["id"] == ["qa:1", "qa:2"] and batch["answers"][1] == ["no"] * 10


# ---------------------------------------------------------------------------- easy-vqa export

def test_package_counts_and_templates():
    data = vqa.load_easy_vqa()
    assert [len(x) for x in data["train"]] == [38575, 38575, 38575, 4000]
    assert [len(x) for x in data["test"]] == [9673, 9673, 9673, 1000]
    train_templates = {question_template(q) for q in data["train"][0]}
    test_templates = {question_template(q) for q in data["test"][0]}
    # the reason for held-out templates: train and test share every wording
    assert train_templates == test_templates and len(train_templates) == 24
    assert set(UNSEEN_TEMPLATES) <= train_templates
    assert question_template("What is the Blue shape?") == "what is the <color> shape?"
    with pytest.raises(ValueError, match="purple"):
        answer_type("purple")


def test_export_counts_types_and_meta(easy):
    out, meta, splits = easy
    assert sorted(p.name for p in out.iterdir()) == ["images", "meta.json", "test.jsonl", "test_unseen.jsonl",
                                                     "train.jsonl", "val.jsonl"]
    assert json.loads((out / "meta.json").read_text()) == meta
    n = {s: len(r) for s, r in splits.items()}
    assert meta["questions"] == n and meta["package_questions"] == {"train": 38575, "test": 9673}
    assert n["train"] + n["val"] + meta["held_out_train_questions"] == 38575
    assert n["test"] == 9673 and meta["held_out_train_questions"] == 6050 and n["test_unseen"] == 1499
    assert meta["images"]["train"] + meta["images"]["val"] == 4000 and meta["images"]["val"] == 400
    assert len(list((out / "images").iterdir())) == 5000
    train_answers = [r["answers"][0] for r in splits["train"]]
    assert meta["majority_answer"] == max(set(train_answers), key=train_answers.count)
    for split, records in splits.items():
        assert {r["question_type"] for r in records} <= set(QUESTION_TYPES)
        assert meta["question_types"][split] == {t: sum(r["question_type"] == t for r in records)
                                                 for t in QUESTION_TYPES}
        for r in records:
            assert r["answers"] == [r["answers"][0]] * 10 and r["question_type"] == answer_type(r["answers"][0])
    # one kind of question per wording, so question_type is a property of the template
    kinds = {}
    for records in splits.values():
        for r in records:
            kinds.setdefault(question_template(r["question"]), set()).add(r["question_type"])
    assert all(len(k) == 1 for k in kinds.values())
    assert {next(iter(kinds[t])) for t in UNSEEN_TEMPLATES} == set(QUESTION_TYPES)


def test_val_is_carved_by_image_and_unseen_wordings_are_absent_from_training(easy):
    out, _, splits = easy
    images = {s: {r["image"] for r in recs} for s, recs in splits.items()}
    assert not images["train"] & images["val"]
    assert all(i.startswith("images/train_") for i in images["train"] | images["val"])
    assert all(i.startswith("images/test_") for i in images["test"])
    seen = {question_template(r["question"]) for s in ("train", "val") for r in splits[s]}
    unseen = {question_template(r["question"]) for r in splits["test_unseen"]}
    assert unseen == set(UNSEEN_TEMPLATES) and not seen & unseen
    assert len(seen) == 20
    test_ids = {r["id"] for r in splits["test"]}
    assert {r["id"] for r in splits["test_unseen"]} <= test_ids
    assert sum(question_template(r["question"]) in unseen for r in splits["test"]) == len(splits["test_unseen"])
    # read_jsonl already checked every path exists; the images are easy-vqa's 64x64 PNGs
    item = VQADataset(out / "val.jsonl", max_samples=1)[0]
    assert item["image"].size == (64, 64) and item["answers"] == [item["answer"]] * 10


def test_export_is_deterministic_refuses_non_empty_and_overwrites(easy, tmp_path, capsys):
    out, _, splits = easy
    again = tmp_path / "again"
    code, stdout, _ = call_main(capsys, vqa.main, "build", "--out", again, "--seed", "0")
    assert code == 0 and "test_unseen.jsonl: 1499 questions" in stdout and "held out 6050 of 38575" in stdout
    for s in vqa.SPLITS:
        assert (again / f"{s}.jsonl").read_bytes() == (out / f"{s}.jsonl").read_bytes()
    code, _, err = call_main(capsys, vqa.main, "build", "--out", again)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("data.vqa: error: ") and "refusing to overwrite (pass --overwrite)" in err
    code, _, err = call_main(capsys, vqa.main, "build", "--out", tmp_path / "x", "--val_fraction", "1")
    assert code == 2 and err == "data.vqa: error: --val_fraction must be a number in (0, 1), got 1.0\n"
    export_easy_vqa(again, seed=1, overwrite=True)
    val1 = {r["image"] for r in read_jsonl(again / "val.jsonl")}
    assert val1 != {r["image"] for r in splits["val"]} and len(val1) == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]   # no temporary folder left behind


def test_interrupted_export_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old build")

    copy, calls = vqa.shutil.copyfile, []

    def dies_after_ten_images(src, dst):
        calls.append(dst)
        if len(calls) % 10 == 0:
            raise KeyboardInterrupt
        return copy(src, dst)

    monkeypatch.setattr(vqa.shutil, "copyfile", dies_after_ten_images)
    with pytest.raises(KeyboardInterrupt):
        export_easy_vqa(out, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        export_easy_vqa(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
