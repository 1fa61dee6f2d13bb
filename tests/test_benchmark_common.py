"""benchmarks.common.preset_args: the step benchmarks' Args from a preset, their flags, and fixed values."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from benchmarks.common import preset_args
from conftest import ROOT
from train_vqa import Args


def flags(**kw):
    return SimpleNamespace(**{"config": "none", "cpu": True, "batch_size": None, "mixed_precision": None, **kw})


def test_preset_found_from_anywhere_then_flags_then_fixed_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repo: the relative preset path is found in the repository
    args = preset_args(flags(config="configs/vqa_cpu.yaml", batch_size=3), Args, ("batch_size", "mixed_precision"),
                       model="scratch")
    preset = yaml.safe_load((ROOT / "configs" / "vqa_cpu.yaml").read_text())
    assert (args.lr, args.epochs) == (preset["lr"], preset["epochs"]) != (Args().lr, Args().epochs)  # the preset's
    assert args.batch_size == 3 and args.mixed_precision is None  # a given flag wins, an absent one does not
    assert (args.grad_accum, args.num_workers, args.report_to, args.cpu) == (1, 0, "none", True)
    assert preset_args(flags(), Args, ()).lr == Args().lr  # "none": the script's defaults


def test_a_bad_preset_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        preset_args(flags(config=str(tmp_path / "missing.yaml")), Args, ())
    assert e.value.code == 2 and "missing.yaml" in capsys.readouterr().err
