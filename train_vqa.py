"""Visual question answering with BLIP: a small model trained from scratch, or blip-vqa-base fine-tuned.

    python -m data.vqa build --out datasets/vqa                                   # once: easy-VQA as JSON lines
    accelerate launch train_vqa.py --config configs/vqa_cpu.yaml --cpu             # a small BLIP from scratch
    accelerate launch train_vqa.py --config configs/vqa_blip_base.yaml             # blip-vqa-base (GPU, weights)

Data: ``--data_dir`` holds JSON-lines files (``data/vqa.py``: image path or data URI, question, answer or
answers, question_type). The model: ``--model scratch`` builds a small BLIP (``models/blip.py``) with a
WordPiece vocabulary trained on the training questions and answers; any other value is a folder or hub name
of a BLIP VQA model, loaded with its processor. Training minimises the answer tokens' cross-entropy, normalised
by the answer-token count of the whole update (all micro-batches, all processes), so gradient accumulation
and DDP weigh every token alike. Evaluation generates the answers (``--num_beams``) and scores them with the
official VQA normalisation (``metrics/vqa.py``); ``val/accuracy`` selects the model and stops early. After
training the best weights predict ``--test_files`` into ``predictions/<name>.jsonl`` and ``results.json``.
Every export (``best/``, ``final/``) is also a ``save_pretrained`` folder: ``BlipForQuestionAnswering.
from_pretrained(export)`` and ``BlipProcessor.from_pretrained(export)`` load it.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BlipProcessor

from data.vqa import VQACollate, VQADataset, num_answer_tokens
from metrics.vqa import most_frequent_answer, vqa_metrics
from models.blip import BlipVQA, decode_answers, freeze, load_pretrained, make_processor, small_config, train_wordpiece
from training import Checkpointer, EarlyStopping, TrainState, UsageError, parse_args, start_run
from training.config import fail
from training.export import MODEL_JSON, build_model, load_weights, model_record, read_weights, resolve_export
from training.run import log_images, resolve_run
from training.summary import TrainMeter, append_summary

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "decoder_input_ids", "decoder_attention_mask", "labels")


@dataclass
class Args:
    """Train a BLIP visual-question-answering model (from scratch or fine-tuned)."""
    config: str | None = None             # YAML preset that sets defaults; the command line wins
    output_dir: str = "runs/vqa"          # runs live in <output_dir>/<run_name>/
    run_name: str | None = None           # default: <date>-<time>_s<seed>
    data_dir: str = "datasets/vqa"        # folder of JSON-lines files (python -m data.vqa build --out DIR)
    train_file: str = "train.jsonl"       # inside --data_dir
    val_file: str = "val.jsonl"           # inside --data_dir; selects the model
    test_files: str | None = "test.jsonl,test_unseen.jsonl"  # inside --data_dir, comma-separated, predicted with the best weights; none to skip
    max_train_samples: int | None = None  # use only the first N training questions (quick runs)
    max_val_samples: int | None = None    # evaluate on the first N validation questions only
    model: str = "scratch"                # scratch, or a folder or hub name of a BLIP VQA model (Salesforce/blip-vqa-base)
    vocab_size: int = 1000                # scratch: WordPiece vocabulary size (fewer when the corpus is small)
    image_size: int = 64                  # scratch: input side in px
    patch_size: int = 8                   # scratch: ViT patch side in px
    hidden: int = 128                     # scratch: width of the vision and text transformers
    layers: int = 2                       # scratch: layers of the text encoder and decoder
    vision_layers: int = 2                # scratch: layers of the ViT
    heads: int = 4                        # scratch: attention heads
    answer_max_length: int = 8            # answer tokens incl. [DEC] and [SEP]; longer answers are truncated
    freeze: str | None = None             # comma-separated parameter-name prefixes to freeze, e.g. vision_model
    label_smoothing: float = 0.0          # of the answer-token cross-entropy (transformers 4.x hard-coded 0.1)
    epochs: int = 10                      # passes over the training file
    max_steps: int | None = None          # optimizer updates; default: epochs x updates per epoch
    batch_size: int = 64                  # per device, per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer update
    lr: float = 5e-4                      # AdamW peak learning rate
    weight_decay: float = 0.05            # AdamW decoupled weight decay (on every trainable parameter)
    warmup_steps: int = 200               # linear warm-up in updates, then cosine decay to min_lr at max_steps
    min_lr: float = 1e-6                  # floor of the cosine decay
    clip_grad: float = 1.0                # max global gradient norm
    num_beams: int = 1                    # beam search width at evaluation and prediction (1: greedy)
    seed: int = 42                        # seeds weights, sampler order and dropout
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the accelerate config
    cpu: bool = False                     # force CPU (with ACCELERATE_USE_CPU=1 for multi-process gloo runs)
    num_workers: int = 2                  # DataLoader workers per process (image decoding and resizing run there)
    log_every_steps: int = 50             # updates between train/* log lines
    eval_every_steps: int | None = None   # updates between evaluations; default: one epoch
    save_every_steps: int | None = None   # updates between full-state checkpoints; default: one epoch
    keep_last: int = 2                    # newest checkpoints kept
    save_top_k: int = 1                   # best checkpoints (by val/accuracy) kept in addition
    resume: str | None = None             # "auto" (newest complete checkpoint) or a checkpoint/run directory
    init_from: str | None = None          # start from these weights (run dir, export or checkpoint of the same model)
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # tracker; W&B runs offline unless logged in
    patience: int = 5                     # evaluations without val accuracy gain before stopping; 0 disables
    min_delta: float = 0.0                # val accuracy (in %) must rise by more than this to count as a gain
    num_figures: int = 16                 # validation questions drawn with their predictions per evaluation; 0 disables

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "log_every_steps", "vocab_size", "image_size",
                     "patch_size", "hidden", "layers", "vision_layers", "heads", "num_beams"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every_steps", "save_every_steps", "max_train_samples", "max_val_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1 (or none), got {getattr(self, name)}")
        if self.lr <= 0 or self.clip_grad <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.min_delta < 0:
            raise UsageError("--lr and --clip_grad must be > 0, --min_lr, --weight_decay and --min_delta >= 0")
        if self.answer_max_length < 3:
            raise UsageError(f"--answer_max_length must be >= 3 ([DEC], a token, [SEP]), got {self.answer_max_length}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.hidden % self.heads or self.image_size % self.patch_size:
            raise UsageError("--hidden must be a multiple of --heads and --image_size a multiple of --patch_size")
        if min(self.warmup_steps, self.num_workers, self.keep_last, self.save_top_k, self.patience,
               self.num_figures) < 0:
            raise UsageError("--warmup_steps, --num_workers, --keep_last, --save_top_k, --patience and "
                             "--num_figures must be >= 0")

    def test_list(self) -> list[str]:
        return [f.strip() for f in (self.test_files or "").split(",") if f.strip()]


def load_datasets(args: Args) -> tuple[VQADataset, VQADataset, dict[str, VQADataset]]:
    """Train, val and the test files, each checked line by line; a bad file ends the program (exit 2)."""
    data_dir = Path(args.data_dir)
    if not (data_dir / args.train_file).is_file():
        fail(f"--data_dir {data_dir}: no {args.train_file}; build easy-VQA with `python -m data.vqa build --out "
             f"{data_dir}` or point --data_dir at a folder of JSON-lines files")
    try:
        train = VQADataset(data_dir / args.train_file, max_samples=args.max_train_samples)
        val = VQADataset(data_dir / args.val_file, max_samples=args.max_val_samples)
        tests = {Path(f).stem: VQADataset(data_dir / f) for f in args.test_list()}
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    return train, val, tests


def model_spec(args: Args, train: VQADataset) -> tuple[dict, object, dict | None]:
    """(model.json record, processor, pretrained weights or None): of ``--model`` (a folder or hub name), of the
    ``--init_from`` export (its own vocabulary and config), or of a new scratch model."""
    if args.model != "scratch":
        try:
            pretrained, processor = load_pretrained(args.model, label_smoothing=args.label_smoothing)
        except ValueError as e:
            fail(str(e))
        return model_record(BlipVQA, config=pretrained.config.to_dict()), processor, pretrained.state_dict()
    if args.init_from:
        try:
            _, record_dir = resolve_export(args.init_from)
            folder = next(d for d in (record_dir, record_dir.parent) if (d / MODEL_JSON).is_file())
            return json.loads((folder / MODEL_JSON).read_text()), BlipProcessor.from_pretrained(folder), None
        except (UsageError, StopIteration, OSError, ValueError) as e:
            fail(f"--init_from {args.init_from}: not a train_vqa.py export with its model.json and processor ({e})")
    return (*scratch_spec(args, train), None)


def scratch_spec(args: Args, train: VQADataset) -> tuple[dict, object]:
    """A new scratch model's record and processor: a WordPiece vocabulary built from the training questions and
    answers (deterministic: every process and every resumed launch builds the same one) and small_config."""
    texts = [r["question"] for r in train.records] + [a for r in train.records for a in r["answers"]]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tokenizer = train_wordpiece(texts, tmp, vocab_size=args.vocab_size)
        except ValueError as e:
            fail(str(e))
    config = small_config(tokenizer, image_size=args.image_size, patch_size=args.patch_size, hidden=args.hidden,
                          layers=args.layers, heads=args.heads, vision_layers=args.vision_layers,
                          max_answer_length=args.answer_max_length, label_smoothing=args.label_smoothing,
                          max_question_length=max(len(tokenizer(r["question"]).input_ids) for r in train.records))
    return model_record(BlipVQA, config=config), make_processor(tokenizer, args.image_size)


def check_resumed_model(args: Args, model_json: dict, processor) -> None:
    """A resumed run must rebuild the model and vocabulary it was trained with: a scratch vocabulary comes
    from the training file, so other data would silently remap the token ids. One line and exit 2 if not,
    before start_run touches the run."""
    try:
        run_dir, checkpoint, _ = resolve_run(args, "vqa")
    except UsageError:
        return  # start_run names what is wrong with --resume
    if checkpoint is None or not (run_dir / MODEL_JSON).is_file():
        return
    saved = json.loads((run_dir / MODEL_JSON).read_text())
    try:
        same_vocab = BlipProcessor.from_pretrained(run_dir).tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    except (OSError, ValueError):
        same_vocab = False
    if saved != json.loads(json.dumps(model_json)) or not same_vocab:
        fail(f"--resume: {run_dir} was trained with another model or vocabulary than this launch builds (other "
             "training data, --model or model flags?); resume with the run's own data and flags")


def check_freeze(args: Args, model_json: dict) -> None:
    """--freeze prefixes checked on the model built on the meta device (no memory), before anything is written."""
    with torch.device("meta"):
        model = build_model(model_json)
    try:
        freeze(model, (args.freeze or "").split(","))
    except ValueError as e:
        fail(str(e))


def save_processor(net, processor, run) -> tuple[str, ...]:
    """config.json and the processor's files into the run directory (main process); every export carries them,
    so an export is a save_pretrained folder. Returns their names."""
    with tempfile.TemporaryDirectory() as tmp:
        net.config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        names = tuple(sorted(p.name for p in Path(tmp).iterdir()))
        if run is not None:
            for name in names:
                (run.dir / name).write_bytes((Path(tmp) / name).read_bytes())
    return names


def build_scheduler(optimizer, args: Args, max_steps: int):
    """Linear warm-up from lr/1000, then cosine decay to min_lr at max_steps; stepped once per real update."""
    warmup = min(args.warmup_steps, max_steps - 1)
    floor = args.min_lr / args.lr

    def factor(step: int) -> float:
        if step < warmup:
            return 1e-3 + (1 - 1e-3) * step / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def with_token_counts(batches, accelerator, grad_accum: int):
    """Yield the micro-batches with ``num_items``: the answer tokens of their whole accumulation group, summed over
    the group's micro-batches and the processes (one all-gather per group). The group is read ahead, which is
    why this wraps the iterator. A group cut short by the end of an epoch (it continues in the next one) counts
    its tokens scaled to a full group, so each of its micro-batches still weighs about 1/grad_accum."""
    iterator = iter(batches)
    while True:
        # accelerator.step counts accumulate() calls: the group may have begun in the previous epoch. Reading
        # ahead is safe because start_run sets sync_with_dataloader=False: with Accelerate's default, the
        # dataloader's end (reached while reading the last group) would force a step on every micro-batch after it
        group = list(islice(iterator, grad_accum - accelerator.step % grad_accum))
        if not group:
            return
        tokens = sum(num_answer_tokens(b["labels"]) for b in group).float() * (grad_accum / len(group))
        total = accelerator.gather(tokens.reshape(1)).sum() if accelerator.num_processes > 1 else tokens
        for batch in group:
            batch["num_items"] = total.clamp(min=1)
            yield batch


def train_step(model, batch, optimizer, accelerator, args: Args):
    """One micro-batch: forward, loss, backward; on the last micro-batch of an accumulation group also clip
    and step. -> (detached mean answer-token loss of this micro-batch, {}, clipped-gradient norm or None)."""
    grad_norm = None
    with accelerator.accumulate(model):
        # the summed token loss over the update's token count: this micro-batch's share of the update's mean
        loss = model(**{k: batch[k] for k in MODEL_INPUTS}, num_items_in_batch=batch["num_items"])
        # Accelerate divides by grad_accum and DDP averages over processes; undoing both makes the update's
        # gradient the mean over every answer token it saw.
        accelerator.backward(loss * args.grad_accum * accelerator.num_processes)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()  # between updates Accelerate's wrapper skips the step and keeps the gradients
        optimizer.zero_grad(set_to_none=True)
    tokens = num_answer_tokens(batch["labels"]).clamp(min=1)
    return (loss.detach() * batch["num_items"] / tokens), {}, grad_norm


@torch.no_grad()
def predict(model, dataloader, accelerator, processor, args: Args) -> dict:
    """Generated answers for a whole dataset, gathered over processes, in dataset order; plus the token-mean
    loss of the reference answers (``loss``)."""
    model.eval()
    net = accelerator.unwrap_model(model)
    rows, loss_sum, tokens = [], 0.0, 0
    for batch in dataloader:
        with accelerator.autocast():
            losses = net.answer_losses(**{k: batch[k] for k in MODEL_INPUTS}).float()
            out = net.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"], max_new_tokens=args.answer_max_length,
                               num_beams=args.num_beams)
        # per question, so that gather_for_metrics drops the questions repeated to even out the last batch
        losses, counts = accelerator.gather_for_metrics((losses, (batch["labels"][:, 1:] != -100).sum(1)))
        loss_sum, tokens = loss_sum + losses.sum().item(), tokens + int(counts.sum())
        preds = decode_answers(processor.tokenizer, out)
        rows += accelerator.gather_for_metrics(list(zip(batch["id"], preds)), use_gather_object=True)
    pred = dict(rows)  # by id: the order of the processes' shards does not matter
    return {"pred": [pred[r["id"]] for r in dataloader.dataset.records], "loss": loss_sum / max(tokens, 1)}


def score(preds: list[str], records: list[dict], majority: str) -> dict:
    """metrics.vqa over a file's records; per question type when the file has types."""
    types = [r["question_type"] or "other" for r in records] if any(r["question_type"] for r in records) else None
    return vqa_metrics(preds, [r["answers"] for r in records], types, majority_answer=majority)


def draw_questions(dataset: VQADataset, preds: list[str], n: int, tile: int = 128) -> np.ndarray:
    """The first n questions (RGB uint8): image, question, reference answer and prediction (green when right)."""
    rows = []
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        image = cv2.resize(np.asarray(item["image"]), (tile, tile), interpolation=cv2.INTER_NEAREST)
        text = np.full((tile, 3 * tile, 3), 255, np.uint8)
        right = most_frequent_answer([preds[i]]) == most_frequent_answer(item["answers"])
        lines = [(item["question"][k:k + 40], (0, 0, 0)) for k in range(0, min(len(item["question"]), 80), 40)]
        lines += [(f"answer: {item['answer']}", (0, 0, 160)), (f"pred:   {preds[i]}", (0, 140, 0) if right else (200, 0, 0))]
        for k, (line, colour) in enumerate(lines):
            cv2.putText(text, line, (6, 22 + 24 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
        rows.append(np.concatenate([image, text], axis=1))
    return np.concatenate(rows, axis=0)


def log_table(accelerator, dataset: VQADataset, preds: list[str], n: int, step: int) -> None:
    """A W&B table of (image, question, answer, prediction) for the first n questions, when W&B is the tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            items = [dataset[i] for i in range(min(n, len(dataset)))]
            table = wandb.Table(columns=["image", "question", "answer", "prediction"],
                                data=[[wandb.Image(it["image"]), it["question"], it["answer"], p]
                                      for it, p in zip(items, preds)])
            tracker.log({"vis/predictions": table}, step=step)


def validate(model, val_dl, accelerator, processor, run, state: TrainState, args: Args, lr: float,
             majority: str) -> dict:
    """Generate on the validation file, log val/* (per question type too), append summary.csv, draw questions."""
    dataset = val_dl.dataset
    out = predict(model, val_dl, accelerator, processor, args)
    metrics = {"val/loss": out["loss"], **{f"val/{k}": v for k, v in score(out["pred"], dataset.records, majority).items()}}
    state.last_metrics = metrics
    accelerator.log(metrics, step=state.global_step)
    run.log.info("eval %d (epoch %d)  %s", state.global_step, state.epoch,
                 "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "/count/" not in k))
    if accelerator.is_main_process:
        append_summary(run.summary_path, {"step": state.global_step, "epoch": state.epoch, "train/lr": lr, **metrics})
        if args.num_figures:
            log_images(accelerator, run, {"vis/predictions": draw_questions(dataset, out["pred"], args.num_figures)},
                       state.global_step)
            log_table(accelerator, dataset, out["pred"], args.num_figures, state.global_step)
    model.train()
    return metrics


def predict_tests(model, test_dls: dict, accelerator, processor, run, state: TrainState, args: Args,
                  majority: str) -> dict:
    """The best weights answer every test file -> predictions/<name>.jsonl and results.json with their metrics."""
    best = run.dir / "best" / "model.safetensors"
    load_weights(accelerator.unwrap_model(model), read_weights(best), best)
    result = {"run": str(run.dir), "best_step": state.best_step, "majority_answer": majority}
    for name, dl in test_dls.items():
        out = predict(model, dl, accelerator, processor, args)
        records = dl.dataset.records
        result.update({f"{name}/{k}": v for k, v in score(out["pred"], records, majority).items()})
        if accelerator.is_main_process:
            (run.dir / "predictions").mkdir(exist_ok=True)
            with (run.dir / "predictions" / f"{name}.jsonl").open("w") as f:
                for r, p in zip(records, out["pred"]):
                    f.write(json.dumps({"id": r["id"], "question": r["question"], "answer": p,
                                        "answers": r["answers"], "question_type": r["question_type"]}) + "\n")
    accelerator.log({k: v for k, v in result.items() if "/" in k and "/count/" not in k}, step=state.global_step)
    if accelerator.is_main_process:
        (run.dir / "results.json").write_text(json.dumps(result, indent=1))
    return result


def main():
    args = parse_args(Args)
    train_ds, val_ds, test_ds = load_datasets(args)  # before start_run: bad data fails before a run exists
    model_json, processor, pretrained = model_spec(args, train_ds)
    check_freeze(args, model_json)
    check_resumed_model(args, model_json, processor)
    accelerator, run = start_run(args, task="vqa", model_json=model_json)
    model = build_model(model_json)
    if pretrained is not None:
        model.load_state_dict(pretrained)
    run.load_init(model)
    trainable = freeze(model, (args.freeze or "").split(","))
    files = save_processor(model, processor, run if accelerator.is_main_process else None)
    majority = most_frequent_answer([a for r in train_ds.records for a in r["answers"]])
    run.log.info("model: %.3f M parameters (%.3f M trainable), vocabulary %d; %d training, %d validation questions",
                 sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6, len(processor.tokenizer),
                 len(train_ds), len(val_ds))
    collate = VQACollate(processor, args.answer_max_length, model.config.text_config.max_position_embeddings)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate,
                  pin_memory=torch.cuda.is_available())
    # Its own generator, so starting an epoch's iterator leaves the global RNG (dropout) untouched.
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(args.seed),
                          **common)
    val_dl, test_dls = DataLoader(val_ds, **common), {k: DataLoader(v, **common) for k, v in test_ds.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    test_dls = {k: accelerator.prepare(v) for k, v in test_dls.items()}
    updates_per_epoch = max(1, len(train_dl) // args.grad_accum)  # len(train_dl) is per process after prepare
    max_steps = args.max_steps or math.ceil(args.epochs * len(train_dl) / args.grad_accum)
    eval_every, save_every = args.eval_every_steps or updates_per_epoch, args.save_every_steps or updates_per_epoch
    scheduler = build_scheduler(optimizer, args, max_steps)  # not prepared: stepped once per real update
    monitor = "val/accuracy"
    state = TrainState()
    stopper = EarlyStopping(monitor, mode="max", patience=args.patience, min_delta=args.min_delta)
    ckpt = Checkpointer(accelerator, run, monitor=monitor, mode="max", keep_last=args.keep_last,
                        save_top_k=args.save_top_k, model_json=model_json, export_files=files)
    ckpt.register(scheduler, state, stopper)
    ckpt.resume(state)

    stop = stopper.stopped  # a resumed run that had stopped early stays stopped
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="updates", dynamic_ncols=True)
    train_start = time.perf_counter()
    model.train()
    if args.init_from and state.global_step == 0:  # the starting point's own score, logged at update 0
        metrics = validate(model, val_dl, accelerator, processor, run, state, args, scheduler.get_last_lr()[0], majority)
        ckpt.update_best(state, metrics, model)
    meter = TrainMeter(accelerator, run.log)
    while state.global_step < max_steps and not stop:
        batches = with_token_counts(ckpt.remaining_batches(train_dl, state), accelerator, args.grad_accum)
        for batch in meter.timed(batches):
            loss, parts, grad_norm = train_step(model, batch, optimizer, accelerator, args)
            meter.add(loss, parts, batch["input_ids"].shape[0])
            if not accelerator.sync_gradients:
                continue
            ckpt.check_finite(grad_norm, state)
            # The schedule counts applied updates: under fp16 the scaler may skip an overflowing one.
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % args.log_every_steps == 0:
                meter.write(state.global_step, optimizer.param_groups[0]["lr"], grad_norm)
            last_step = state.global_step >= max_steps
            if state.global_step % eval_every == 0 or last_step:
                metrics = validate(model, val_dl, accelerator, processor, run, state, args,
                                   optimizer.param_groups[0]["lr"], majority)
                ckpt.update_best(state, metrics, model)
                stop = stopper.should_stop(metrics, accelerator)
            if state.global_step % save_every == 0 or stop or last_step:  # the end too: resuming is free
                ckpt.save(state)
            if stop or last_step:
                break
    progress.close()

    # final/ is written last (a run with final/ is finished): the best weights answer the test files first.
    final_weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    result = predict_tests(model, test_dls, accelerator, processor, run, state, args, majority) if test_dls else {}
    accelerator.unwrap_model(model).load_state_dict(final_weights)
    ckpt.export_final(model, None, state.last_metrics, state)
    if accelerator.is_main_process:
        minutes = (time.perf_counter() - train_start) / 60
        print(f"\nbest model (update {state.best_step}) of {run.dir}, {minutes:.1f} min:")
        for key, value in {**{k: v for k, v in state.last_metrics.items() if "/count/" not in k}, **result}.items():
            if isinstance(value, float):
                print(f"  {key:32s} {value:10.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
