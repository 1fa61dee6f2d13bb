"""What a run records as it trains: the ``train/*`` and ``perf/*`` log window (``TrainMeter``) and
``summary.csv``, one row per evaluation next to what ``accelerator.log`` sends to the tracker."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch


class TrainMeter:
    """Sums over the micro-batches since the last log line: the loss and its parts (on the device, so adding
    them costs no host sync), samples over all processes and the time spent waiting for the DataLoader."""

    def __init__(self, accelerator, log):
        self.accelerator, self.log = accelerator, log
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.accelerator.device)
        self.parts: dict[str, torch.Tensor] = {}
        self.micro, self.samples, self.data_s = 0, 0, 0.0
        self.start = time.perf_counter()

    def timed(self, batches):
        """Yield from ``batches``, adding the time each ``next`` waits to the data time."""
        iterator = iter(batches)
        while True:
            fetch_start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_s += time.perf_counter() - fetch_start
            yield batch

    def add(self, loss: torch.Tensor, parts: dict, batch_size: int) -> None:
        """One micro-batch: its (detached) loss, its ``loss/<part>`` values and its per-process batch size."""
        self.loss += loss
        for key, value in parts.items():
            self.parts[key] = self.parts.get(key, 0) + value
        self.micro += 1
        self.samples += batch_size * self.accelerator.num_processes

    def write(self, step: int, lr: float, grad_norm: torch.Tensor) -> dict:
        """Log the window as ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/<part>``,
        ``perf/samples_per_s`` and ``perf/data_time_frac`` at ``step``, print one line, start a new window."""
        elapsed = time.perf_counter() - self.start
        def mean(total: torch.Tensor) -> float:  # over the processes, then over the window's micro-batches
            return self.accelerator.reduce(total, "mean").item() / self.micro

        logs = {"train/loss": mean(self.loss), "train/lr": lr, "train/grad_norm": float(grad_norm),
                "perf/samples_per_s": self.samples / elapsed, "perf/data_time_frac": self.data_s / elapsed}
        logs.update({key.replace("loss/", "train/"): mean(value) for key, value in self.parts.items()})
        self.accelerator.log(logs, step=step)
        self.log.info("update %d  loss %.4f  lr %.2e  grad %.3f  %.1f samples/s  data %.0f%%", step,
                      logs["train/loss"], lr, logs["train/grad_norm"], logs["perf/samples_per_s"],
                      100 * logs["perf/data_time_frac"])
        self._reset()
        return logs


def append_summary(path: Path, row: dict) -> None:
    """Append ``row``; when it brings new columns the file is rewritten with the union header."""
    path = Path(path)
    rows, header, rewrite = [], list(row), not path.exists()
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_header = reader.fieldnames or []
            if set(row) - set(old_header):
                rows, rewrite = list(reader), True
                header = old_header + [k for k in row if k not in old_header]
            else:
                header = old_header
    if rewrite:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows(rows)
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, restval="").writerow(row)
