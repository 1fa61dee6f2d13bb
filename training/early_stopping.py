"""Patience-based early stopping counted in evaluations, with an optional second-guard metric.

The second guard (from the CAPTCHA recipe): when the primary metric stalls but a second
metric still improves by more than ``guard_min_delta``, the patience counter is reduced by
``guard_credit`` (not reset), so slow but real progress keeps the run alive a little longer.
All ranks see the same gathered metrics; the script turns a stop into
``accelerator.set_trigger()`` / ``check_trigger()`` so they also agree on when to stop.
"""
from __future__ import annotations

import math


class EarlyStopping:
    def __init__(self, monitor: str, mode: str = "max", patience: int = 10, min_delta: float = 0.0,
                 min_evals: int = 0, guard_monitor: str | None = None, guard_mode: str = "min",
                 guard_min_delta: float = 0.0, guard_credit: int = 3):
        for m in (mode, guard_mode):
            if m not in ("min", "max"):
                raise ValueError(f"mode must be 'min' or 'max', got {m!r}")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.min_evals = min_delta, min_evals
        self.guard_monitor, self.guard_mode = guard_monitor, guard_mode
        self.guard_min_delta, self.guard_credit = guard_min_delta, guard_credit
        self.num_evals = 0
        self.bad_evals = 0
        self.best: float | None = None
        self.guard_best: float | None = None

    @staticmethod
    def _improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
        if best is None:
            return True
        return value > best + min_delta if mode == "max" else value < best - min_delta

    def step(self, metrics: dict) -> bool:
        """Record one evaluation; True when training should stop (patience <= 0 never stops)."""
        self.num_evals += 1
        value = metrics[self.monitor]
        if not math.isfinite(value):
            return self.patience > 0
        if self.num_evals <= self.min_evals:
            return False
        if self._improves(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        if self.guard_monitor is not None:
            guard = metrics[self.guard_monitor]
            if math.isfinite(guard) and self._improves(guard, self.guard_best, self.guard_mode, self.guard_min_delta):
                self.guard_best = guard
                self.bad_evals = max(0, self.bad_evals - self.guard_credit)
        return self.stopped

    @property
    def stopped(self) -> bool:
        """Patience used up; also true right after resuming a run that had stopped early."""
        return 0 < self.patience <= self.bad_evals

    def should_stop(self, metrics: dict, accelerator) -> bool:
        """``step`` on every rank, then agree through Accelerate's trigger (any rank that wants to stop stops all)."""
        if self.step(metrics):
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def state_dict(self) -> dict:
        return {"num_evals": self.num_evals, "bad_evals": self.bad_evals, "best": self.best, "guard_best": self.guard_best}

    def load_state_dict(self, state: dict) -> None:
        self.num_evals, self.bad_evals = state["num_evals"], state["bad_evals"]
        self.best, self.guard_best = state["best"], state["guard_best"]
