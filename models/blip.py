"""BLIP for visual question answering (Li et al., 2022), on Hugging Face transformers.

``BlipVQA`` is transformers' ``BlipForQuestionAnswering`` (a ViT ``vision_model``, a BERT ``text_encoder``
with cross-attention to the image, a BERT ``text_decoder`` that generates the answer) with two additions:

- it is built from a plain ``BlipConfig`` dict, so an export's ``model.json`` can rebuild it
  (``training.export.model_record(BlipVQA, config=...)``) and its weights load through safetensors;
- ``forward(..., num_items_in_batch=N)`` returns the answer tokens' summed cross-entropy divided by N instead
  of the micro-batch mean: with gradient accumulation (and several processes) every answer token then weighs
  the same, however the tokens fall into micro-batches (the token-count normalisation of Accelerate's
  gradient-accumulation guide). Without it, ``forward`` is transformers' own.

Where the model comes from:

- ``load_pretrained(name_or_path)``: weights and processor from a local folder (an export, or a download of
  ``Salesforce/blip-vqa-base``) or, when online, a hub name;
- ``train_wordpiece`` + ``small_config``: a small BLIP trained from scratch (the offline default, sized for a
  CPU) with a deterministic WordPiece vocabulary built from the training questions and answers (characters as
  pieces, so an unseen word becomes pieces, not a single [UNK]).

The batch contract (``data.vqa.VQACollate``) follows the model: the decoder gets ``decoder_input_ids`` that
start with the [DEC] token, as ``generate`` starts, and ``labels`` equal to them with -100 on padding; nobody
shifts them (the decoder's loss compares logits[:, :-1] with labels[:, 1:] itself). The config's bos, sep and
pad ids must be the tokenizer's: ``small_config`` takes them from the tokenizer and ``check_tokenizer`` refuses
a mismatch.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")  # [DEC] starts every answer
HUB_MODEL = "Salesforce/blip-vqa-base"


def _cross_attention_mask(module, args, kwargs):
    if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
    return args, kwargs


class BlipVQA(BlipForQuestionAnswering):
    """``BlipForQuestionAnswering`` built from a config dict, with token-count-normalised training loss."""

    def __init__(self, config: BlipConfig | dict):
        super().__init__(BlipConfig.from_dict(config) if isinstance(config, dict) else config)
        # transformers 5.x's BLIP text layers hand the cross-attention mask to their attention module as
        # attention_mask, which the module then replaces with its (unset) encoder_attention_mask: the decoder
        # attends to the padding of the question, so an answer depends on the other questions in its batch.
        # The hook passes the mask on under the name the module reads. Plain BlipForQuestionAnswering loading
        # our exports does not get it.
        for module in self.modules():
            if type(module).__name__ == "BlipTextSelfAttention":
                module.register_forward_pre_hook(_cross_attention_mask, with_kwargs=True)

    def forward(self, input_ids=None, pixel_values=None, decoder_input_ids=None, decoder_attention_mask=None,
                attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if num_items_in_batch is None or labels is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                   attention_mask=attention_mask, labels=labels, **kwargs)
        return self.answer_losses(input_ids, pixel_values, decoder_input_ids, decoder_attention_mask,
                                  attention_mask, labels).sum() / num_items_in_batch

    def answer_losses(self, input_ids, pixel_values, decoder_input_ids, decoder_attention_mask, attention_mask,
                      labels) -> torch.Tensor:
        """(B,) summed answer-token cross-entropy per question. The same three stages as the parent's forward,
        with the decoder's per-answer sums (reduction="none") instead of its micro-batch mean."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        question_embeds = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                            encoder_hidden_states=image_embeds,
                                            encoder_attention_mask=image_mask).last_hidden_state
        answer = self.text_decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                   encoder_hidden_states=question_embeds, encoder_attention_mask=attention_mask,
                                   labels=labels, reduction="none")
        return answer.loss

    @torch.no_grad()
    def generate(self, input_ids, pixel_values, attention_mask=None, **generate_kwargs):
        """The parent's generate, except that the decoder attends to the question tokens only, as in training:
        transformers' version passes an all-ones mask over the padded question, so an answer would depend on
        the length of the other questions in its batch."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        question_embeds = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                            encoder_hidden_states=image_embeds,
                                            encoder_attention_mask=image_mask).last_hidden_state
        bos = torch.full((input_ids.shape[0], 1), self.decoder_start_token_id, device=input_ids.device)
        return self.text_decoder.generate(input_ids=bos, eos_token_id=self.config.text_config.sep_token_id,
                                          pad_token_id=self.config.text_config.pad_token_id,
                                          encoder_hidden_states=question_embeds,
                                          encoder_attention_mask=attention_mask, **generate_kwargs)


_NUMBER_SPACE = re.compile(r"(?<=\d)([.,]) (?=\d)")


def decode_answers(tokenizer, ids) -> list[str]:
    """Generated ids -> answer strings. WordPiece splits punctuation into tokens and decoding puts spaces
    around them ("don ' t", "1, 000"), which the official VQA normalisation does not undo and would score 0:
    the tokenizer's clean-up rejoins contractions and the regex rejoins numbers."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [_NUMBER_SPACE.sub(r"\1", t).strip() for t in texts]



def check_tokenizer(config: BlipConfig, tokenizer) -> None:
    """ValueError unless the config's text bos/sep/pad ids and vocabulary size fit the tokenizer (BLIP's
    defaults assume BERT's 30522/102/0: a small vocabulary with them would index past its embeddings)."""
    text = config.text_config
    expected = {"bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    wrong = {k: (getattr(text, k), v) for k, v in expected.items() if getattr(text, k) != v}
    if wrong or text.vocab_size < len(tokenizer):
        detail = ", ".join(f"{k} {a} (tokenizer: {b})" for k, (a, b) in wrong.items()) or \
            f"vocab_size {text.vocab_size} < {len(tokenizer)} tokens"
        raise ValueError(f"the model's text config does not fit its tokenizer: {detail}")


def train_wordpiece(texts, out_dir, vocab_size: int = 1000) -> BertTokenizer:
    """A lower-cased BERT WordPiece vocabulary for ``texts`` (the training questions and answers), written to
    ``out_dir/vocab.txt``, and the BERT tokenizer over it with [DEC] as its bos token.

    The vocabulary: the special tokens, every character of the texts as a word start and as a ``##``
    continuation, then whole words by frequency (ties alphabetical) up to ``vocab_size``. Text goes through
    the ``tokenizers`` library's BERT normaliser and pre-tokeniser, as the tokenizer will see it. An unseen word
    becomes its longest known prefix plus pieces, never a single [UNK]. Deterministic: the same texts give the
    same file in every process and every run (the library's WordPiece trainer breaks ties between equally
    frequent merges differently in each process, so three trainings on the same texts gave three
    vocabularies, and runs with one seed could not be reproduced)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True, strip_accents=True), BertPreTokenizer()
    counts = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = [*SPECIAL_TOKENS, *chars, *("##" + c for c in chars)]
    if len(vocab) > vocab_size:
        raise ValueError(f"--vocab_size {vocab_size}: the texts need {len(vocab)} special and character tokens")
    known = set(vocab)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    vocab += words[: vocab_size - len(vocab)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("".join(token + "\n" for token in vocab))
    return BertTokenizer(str(out_dir / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")


def small_config(tokenizer, image_size: int = 64, patch_size: int = 8, hidden: int = 128, layers: int = 2,
                 heads: int = 4, vision_layers: int | None = None, max_answer_length: int = 8,
                 max_question_length: int = 40, label_smoothing: float = 0.0) -> dict:
    """A BlipConfig dict for a small BLIP trained from scratch: text and vision width ``hidden`` with
    ``layers`` layers each (``vision_layers`` for the ViT if given), MLPs 4x wide, the tokenizer's
    vocabulary and special ids, label smoothing set explicitly (transformers 4.x hard-coded 0.1 in the
    decoder, 5.x reads it from the config)."""
    positions = max(max_question_length, max_answer_length) + 2
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=positions, encoder_hidden_size=hidden,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                sep_token_id=tokenizer.sep_token_id, label_smoothing=label_smoothing)
    # BlipVisionConfig's default initializer_range is 1e-10 (harmless when pretrained weights overwrite it): a
    # ViT built from scratch with it starts with every weight ~1e-10 and learns colours late and shapes never
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                  num_hidden_layers=vision_layers or layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                  initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden).to_dict()


def make_processor(tokenizer, image_size: int) -> BlipProcessor:
    """Images resized to image_size x image_size and normalised as BLIP's (CLIP's mean and std)."""
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_pretrained(name_or_path: str, label_smoothing: float = 0.0) -> tuple[BlipVQA, BlipProcessor]:
    """Weights and processor from a local folder (a ``save_pretrained`` export or a downloaded
    ``Salesforce/blip-vqa-base``) or a hub name. Offline (``HF_HUB_OFFLINE=1``) a hub name must be in the
    local cache. ValueError with one line when it cannot be loaded."""
    local = Path(name_or_path).is_dir()
    try:
        model = BlipVQA.from_pretrained(name_or_path, local_files_only=local)
        processor = BlipProcessor.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        hint = " (offline: download it first, or pass a local folder)" if offline or not local else ""
        raise ValueError(f"--model {name_or_path}: cannot load a BLIP VQA model and processor{hint}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    model.config.text_config.label_smoothing = label_smoothing
    model.text_decoder.label_smoothing = label_smoothing  # the decoder copies it at construction
    check_tokenizer(model.config, processor.tokenizer)
    return model, processor


def freeze(model: torch.nn.Module, prefixes) -> int:
    """``requires_grad_(False)`` on every parameter whose name starts with one of ``prefixes`` (e.g.
    ``vision_model``, ``text_encoder.embeddings``); ValueError for a prefix that matches nothing. Returns the
    number of trainable parameters left (build the optimizer over those only)."""
    prefixes = [p.strip().rstrip(".") for p in prefixes if p.strip()]
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"--freeze {prefix}: no parameter name starts with it (top-level modules: "
                             f"{', '.join(tops)})")
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
