"""Answer questions about images with a train_vqa.py model.

    python predict_vqa.py --checkpoint runs/vqa/cpu --data datasets/vqa/test.jsonl --out preds.jsonl
    python predict_vqa.py --checkpoint runs/vqa/cpu --image photo.png --question "what color is the shape?"

``--checkpoint`` takes a run directory (its best/, else final/), an export folder or a checkpoint; the model is
rebuilt from the export's ``model.json`` (``training.export.load_export``) and the processor (tokenizer and
image preprocessing) is read from the export's ``save_pretrained`` files. ``--data`` is a JSON-lines file of
``data/vqa.py``; the output has one ``{"id", "question", "answer"}`` line per question, in the file's order,
and questions per second are printed, with the VQA accuracy and exact match (official normalisation) against
the file's answers. ``--image``/``--question`` answers one question on standard output.

The output is written to ``<out>.tmp`` and renamed; an existing ``--out`` is only replaced with ``--overwrite``.
Bad input ends with one line naming the file or flag, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BlipProcessor

from data.vqa import VQADataset, load_image
from metrics.vqa import vqa_metrics
from models.blip import decode_answers
from training.config import UsageError, fail
from training.export import load_export_or_exit, resolve_device
from training.io import check_output, write_atomically


def load_processor(export) -> BlipProcessor:
    """The processor saved with the export (exports carry it) or with its run (for a checkpoint folder)."""
    for folder in (export.folder, export.record_dir):
        if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
            return BlipProcessor.from_pretrained(folder)
    fail(f"--checkpoint {export.folder}: no processor files (processor_config.json, tokenizer.json); not a "
         "train_vqa.py export")


@torch.no_grad()
def answer(model, processor, images: list, questions: list[str], device, max_new_tokens: int, num_beams: int) -> list[str]:
    # questions longer than the text encoder's positions are cut, as in training
    enc = processor(images=images, text=questions, padding=True, truncation=True,
                    max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         pixel_values=enc["pixel_values"], max_new_tokens=max_new_tokens, num_beams=num_beams)
    return decode_answers(processor.tokenizer, out)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="train_vqa.py run directory, export or checkpoint")
    parser.add_argument("--data", help="JSON-lines file of questions (data/vqa.py format)")
    parser.add_argument("--out", default="preds.jsonl", help="output JSON lines: id, question, answer")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--image", help="one image file (with --question) instead of --data")
    parser.add_argument("--question", help="the question about --image")
    parser.add_argument("--batch_size", type=int, default=64, help="questions per forward pass")
    parser.add_argument("--num_beams", type=int, default=None, help="beam width (default: the run's --num_beams)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.image is None) or (args.image is None) != (args.question is None):
        fail("give either --data FILE or --image IMG with --question TEXT")
    if args.batch_size < 1 or (args.num_beams is not None and args.num_beams < 1):
        fail(f"--batch_size and --num_beams must be >= 1, got {args.batch_size} and {args.num_beams}")
    try:
        device = resolve_device(args.device)
        out = check_output(args.out, args.overwrite) if args.data else None
        dataset = VQADataset(args.data, answers_required=False) if args.data else None
        image = load_image(args.image) if args.image else None
    except (UsageError, ValueError) as e:
        fail(str(e))
    export = load_export_or_exit(args.checkpoint, device)
    processor = load_processor(export)
    model = export.model
    max_new_tokens = int(export.args.get("answer_max_length", 8))
    num_beams = args.num_beams or int(export.args.get("num_beams", 1))
    if image is not None:
        print(answer(model, processor, [image], [args.question], device, max_new_tokens, num_beams)[0])
        return

    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=list)  # items: the processor batches them
    preds, start = [], time.perf_counter()
    try:
        for items in loader:
            preds += answer(model, processor, [it["image"] for it in items], [it["question"] for it in items],
                            device, max_new_tokens, num_beams)
    except ValueError as e:  # an image that cannot be decoded, named with its file and line
        fail(str(e))
    seconds = time.perf_counter() - start

    def write(tmp):
        with open(tmp, "w") as f:
            for record, pred in zip(dataset.records, preds):
                f.write(json.dumps({"id": record["id"], "question": record["question"], "answer": pred}) + "\n")
    write_atomically(out, write)
    print(f"{len(preds)} questions -> {out} ({len(preds) / seconds:.1f} questions/s on {device}, beams {num_beams})")
    labelled = [(p, r["answers"]) for p, r in zip(preds, dataset.records) if r["answers"]]
    if labelled:
        scores = vqa_metrics([p for p, _ in labelled], [a for _, a in labelled])
        print(f"accuracy {scores['accuracy']:.2f}  exact match {scores['exact_match']:.2f} (against the answers of "
              f"{len(labelled)} of {len(preds)} questions)")


if __name__ == "__main__":
    main()
