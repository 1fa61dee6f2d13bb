"""Task-agnostic bookkeeping around the training loops in ``train_*.py``.

Nothing here knows any task: configuration (``config``), run set-up (``run``),
checkpoints (``checkpoint``), exports that rebuild their model and their loader
(``export``), early stopping (``early_stopping``), the log window and the
per-evaluation CSV log (``summary``), output files of the predict/fit/stack
scripts checked first and written atomically (``io``), and the runs tool over run directories
(``runs``, ``python -m training.runs``).
"""
from training.checkpoint import Checkpointer, TrainState
from training.config import UsageError, parse_args
from training.early_stopping import EarlyStopping
from training.run import Run, start_run

__all__ = ["Checkpointer", "EarlyStopping", "Run", "TrainState", "UsageError", "parse_args", "start_run"]
