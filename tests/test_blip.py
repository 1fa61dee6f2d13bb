"""models/blip.py: the tiny from-scratch BLIP, its WordPiece vocabulary, the token-count-normalised loss,
freezing by name, and exports that reload with from_pretrained. No network: every model is built here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

from metrics.vqa import normalize_answer
from models.blip import BlipVQA, check_tokenizer, decode_answers, freeze, load_pretrained, make_processor, small_config, train_wordpiece
from training.export import build_model, model_record

QA = [("what color is the circle?", "red"), ("what shape is the blue shape?", "triangle"),
      ("does the image contain a rectangle?", "yes"), ("is there a green shape?", "no")]
COLOURS = {"red": (220, 30, 30), "triangle": (30, 30, 220), "yes": (30, 200, 30), "no": (240, 240, 240)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor) of a ~0.1 M parameter BLIP on 32x32 images with a vocabulary trained on QA."""
    torch.manual_seed(0)
    texts = [q for q, _ in QA] + [a for _, a in QA] + ["how many shapes are purple or gray?"]
    tokenizer = train_wordpiece(texts, tmp_path_factory.mktemp("vocab"), vocab_size=200)
    config = small_config(tokenizer, image_size=32, patch_size=8, hidden=32, layers=2, heads=4)
    return BlipVQA(config), make_processor(tokenizer, 32)


def batch_of(processor, model, qa=QA, answer_length=6):
    """The training batch of the reference recipe: answers with their own short length, the decoder starting
    from [DEC], no loss on padding."""
    images = [Image.fromarray(np.full((32, 32, 3), COLOURS.get(a, (128, 128, 128)), np.uint8)) for _, a in qa]
    enc = processor(images=images, text=[q for q, _ in qa], padding=True, return_tensors="pt")
    ans = processor.tokenizer([a for _, a in qa], padding="max_length", max_length=answer_length, truncation=True,
                              return_tensors="pt")
    dec = ans.input_ids.clone()
    dec[:, 0] = model.config.text_config.bos_token_id
    return dict(**enc, decoder_input_ids=dec, decoder_attention_mask=ans.attention_mask,
                labels=dec.masked_fill(ans.attention_mask == 0, -100))


def test_wordpiece_vocabulary_splits_unseen_words_into_pieces(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 5]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    assert tok.bos_token == "[DEC]" and tok.pad_token_id == 0
    ids = tok("what colour is the circles?").input_ids  # 'colour', 'circles': never seen whole
    assert tok.unk_token_id not in ids and len(ids) > 7


def test_config_ids_must_fit_the_tokenizer(tiny):
    model, processor = tiny
    check_tokenizer(model.config, processor.tokenizer)
    with pytest.raises(ValueError, match="bos_token_id 30522"):
        check_tokenizer(BlipConfig(), processor.tokenizer)  # BERT's defaults


def test_tiny_blip_overfits_four_examples_and_generates_their_answers(tmp_path):
    torch.manual_seed(0)
    tokenizer = train_wordpiece([q for q, _ in QA] + [a for _, a in QA], tmp_path, vocab_size=120)
    model = BlipVQA(small_config(tokenizer, image_size=32, patch_size=8, hidden=32, layers=2, heads=4))
    processor = make_processor(tokenizer, 32)
    batch = batch_of(processor, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05
    model.eval()
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], max_new_tokens=6)
    assert processor.batch_decode(out, skip_special_tokens=True) == [a for _, a in QA]


def test_token_count_normalised_loss_equals_the_mean_on_one_micro_batch(tiny):
    model, processor = tiny
    batch = batch_of(processor, model, qa=QA[:3] + [("is there a green shape?", "red triangle yes")])
    model.eval()
    mean = model(**batch).loss
    tokens = (batch["labels"][:, 1:] != -100).sum()  # the decoder's loss compares logits[:, :-1] with labels[:, 1:]
    summed = model(**batch, num_items_in_batch=tokens)
    torch.testing.assert_close(summed, mean)
    # Two halves with the total count add up to the whole: what gradient accumulation relies on.
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    torch.testing.assert_close(sum(model(**h, num_items_in_batch=tokens) for h in halves), mean)


def test_freeze_by_name_prefix(tiny):
    model, _ = tiny
    model = BlipVQA(model.config.to_dict())
    total = sum(p.numel() for p in model.parameters())
    trainable = freeze(model, ["vision_model", "text_encoder.embeddings"])
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision_model."))
    embeddings = sum(p.numel() for n, p in model.named_parameters() if n.startswith("text_encoder.embeddings."))
    assert trainable == total - vision - embeddings and vision > 0 and embeddings > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("vision_model."))
    with pytest.raises(ValueError, match="--freeze vision: no parameter name starts with it"):
        freeze(model, ["vision"])  # a prefix must end at a dot: 'vision' is not 'vision_model'


def test_exports_reload_with_from_pretrained_and_from_model_json(tiny, tmp_path):
    model, processor = tiny
    model.eval()
    batch = batch_of(processor, model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    plain = BlipForQuestionAnswering.from_pretrained(tmp_path).eval()  # what a user of transformers does
    theirs, ours = plain.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # unpadded, the two agree (padded, the plain class attends to the question padding: see BlipVQA)
    single = {k: v[:1] for k, v in batch.items()}
    single = {**single, "input_ids": single["input_ids"][:, : int(single["attention_mask"].sum())],
              "attention_mask": single["attention_mask"][:, : int(single["attention_mask"].sum())]}
    torch.testing.assert_close(plain(**single).loss, model(**single).loss)
    loaded, loaded_processor = load_pretrained(str(tmp_path), label_smoothing=0.1)
    assert isinstance(loaded_processor, BlipProcessor) and loaded.text_decoder.label_smoothing == 0.1
    rebuilt = build_model(model_record(BlipVQA, config=model.config.to_dict()))  # training.export's path
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(**batch).loss, model(**batch).loss)


def test_load_pretrained_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="--model .*nowhere: cannot load") as e:
        load_pretrained(str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)


def test_scratch_config_initialises_vision_and_text_weights_at_the_same_scale(tiny):
    """BlipVisionConfig's default initializer_range (1e-10) would start the ViT with all weights ~1e-10."""
    model, _ = tiny
    params = dict(model.named_parameters())
    for name in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding",
                 "vision_model.encoder.layers.0.mlp.fc1.weight", "text_encoder.encoder.layer.0.attention.self.query.weight"):
        assert 0.01 < float(params[name].detach().std()) < 0.03, name


def test_decoded_answers_survive_the_official_normalisation(tmp_path):
    """WordPiece splits punctuation; decoding must not leave "don ' t" or "1, 000" (they would score 0)."""
    answers = ["don't", "o'clock", "1,000", "2.5", "t-shirt", "yes", "red and blue", "3"]
    tokenizer = train_wordpiece([q for q, _ in QA] + answers, tmp_path, vocab_size=200)
    ids = tokenizer(answers, padding=True, return_tensors="pt").input_ids
    decoded = decode_answers(tokenizer, ids)
    assert [normalize_answer(d) for d in decoded] == [normalize_answer(a) for a in answers]
    assert decoded[:4] == ["don't", "o'clock", "1,000", "2.5"]


def test_an_answer_does_not_depend_on_the_other_questions_in_its_batch(tiny):
    """generate masks the question padding as training does (transformers' own generate attends to it)."""
    model, processor = tiny
    model.eval()
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    questions = ["is it red?", "what color is the big shape in the middle of the image?"]
    alone = processor(images=images[:1], text=questions[:1], return_tensors="pt")
    both = processor(images=images, text=questions, padding=True, return_tensors="pt")
    assert both.input_ids.shape[1] > alone.input_ids.shape[1]  # the first question is padded in the batch
    kwargs = dict(max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
    a = model.generate(input_ids=alone.input_ids, attention_mask=alone.attention_mask, pixel_values=alone.pixel_values, **kwargs)
    b = model.generate(input_ids=both.input_ids, attention_mask=both.attention_mask, pixel_values=both.pixel_values, **kwargs)
    torch.testing.assert_close(b.scores[0][:1], a.scores[0], atol=1e-5, rtol=1e-5)
