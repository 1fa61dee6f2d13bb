"""Unit tests of training/: config parsing, checkpoint rotation and resume choice, EMA and stopper state."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from conftest import Payload
from training import Checkpointer, EarlyStopping, Run, TrainState, UsageError, parse_args
from training.checkpoint import find_latest_checkpoint
from training.run import resolve_run
from training.summary import append_summary


@dataclass
class Demo:
    config: str | None = None     # preset
    lr: float = 1e-3              # learning rate
    steps: int = 10               # updates
    name: str = "a"
    flag: bool = False            # a switch
    mode: Literal["x", "y"] = "x"
    scale: Literal[1, 2, 4] = 1
    maybe: int | None = None
    output_dir: str = "runs"
    seed: int = 0
    resume: str | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")


def test_parse_args_yaml_defaults_and_cli_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1\nsteps: 5\nflag: true\nmode: y\n")
    args = parse_args(Demo, ["--config", str(cfg), "--steps", "7", "--maybe", "3"])
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert args.steps == 7 and args.flag is True and args.mode == "y" and args.maybe == 3
    assert parse_args(Demo, ["--no-flag", "--config", str(cfg)]).flag is False


@pytest.mark.parametrize("argv, expected", [
    (["--steps", "abc"], "--steps: expected int, got 'abc'"),
    (["--mode", "z"], "expected one of x, y"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--lr", "nan"], "--lr: expected a finite number, got 'nan'"),
    (["--lr=-inf"], "--lr: expected a finite number, got '-inf'"),
])
def test_parse_args_bad_flags_exit_2_with_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Demo, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_parse_args_unknown_yaml_key_lists_valid_keys(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(SystemExit) as e:
        parse_args(Demo, ["--config", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(cfg) in err[0] and "learning_rate" in err[0] and "valid keys: config, lr, steps" in err[0]


def test_parse_args_yaml_type_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("steps: 1.5\n")
    with pytest.raises(SystemExit):
        parse_args(Demo, ["--config", str(cfg)])
    assert "key steps: expected int, got 1.5" in capsys.readouterr().err
    cfg.write_text("lr: .nan\n")
    with pytest.raises(SystemExit):
        parse_args(Demo, ["--config", str(cfg)])
    assert "key lr: expected a finite number, got nan" in capsys.readouterr().err
    cfg.write_text("lr: " + "9" * 400 + "\n")  # float() of it would raise OverflowError
    with pytest.raises(SystemExit):
        parse_args(Demo, ["--config", str(cfg)])
    assert "key lr: expected a finite number, got an integer of 400 digits" in capsys.readouterr().err
    # an integer choice is that integer: neither 2.0 nor true (== 1) passes for it
    for text, shown in (("2.0", "2.0"), ("true", "True")):
        cfg.write_text(f"scale: {text}\n")
        with pytest.raises(SystemExit):
            parse_args(Demo, ["--config", str(cfg)])
        assert f"key scale: expected one of 1, 2, 4, got {shown}" in capsys.readouterr().err
    cfg.write_text("scale: 2\n")
    assert parse_args(Demo, ["--config", str(cfg)]).scale == 2
    with pytest.raises(SystemExit):
        parse_args(Demo, ["--config", str(tmp_path / "missing.yaml")])
    assert "file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _run(tmp_path, resume_from=None) -> Run:
    return Run(dir=tmp_path, name=tmp_path.name, resume_from=resume_from, log=logging.getLogger("test"))


def _saved_run(run_dir: Path, accelerator, steps=(2, 4)) -> tuple[Checkpointer, TrainState]:
    """A run directory with real checkpoints of a tiny model (registered: an LR scheduler and the loop state)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    state = TrainState()
    ckpt = Checkpointer(accelerator, _run(run_dir), monitor="val/acc")
    ckpt.register(scheduler, state)
    for step in steps:
        model(torch.randn(4, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
        state.global_step, state.last_metrics = step, {"val/acc": step / 10}
        ckpt.save(state)
    return ckpt, state


def _step(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_resume_auto_skips_partial_checkpoint(tmp_path, accelerator):
    run_dir = tmp_path / "runs" / "r1"
    _saved_run(run_dir, accelerator, steps=(2,))
    partial = _step(run_dir, 4)
    partial.mkdir()
    (partial / "meta.json").write_text(json.dumps({"global_step": 4, "value": 0.6}))  # no COMPLETE
    assert find_latest_checkpoint(run_dir).name == "step_00000002"
    args = Demo(output_dir=str(tmp_path / "runs"), resume="auto")
    assert resolve_run(args, "demo") == (run_dir, _step(run_dir, 2), [])
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        resolve_run(Demo(output_dir=str(tmp_path / "runs"), resume=str(partial)), "demo")
    with pytest.raises(UsageError, match="no such checkpoint"):
        resolve_run(Demo(resume=str(tmp_path / "nope")), "demo")


def test_registered_objects_round_trip_without_pickle(tmp_path, accelerator):
    """Scheduler and loop state come back from registered.json/.safetensors; nothing of them is pickled."""
    run_dir = tmp_path / "r"
    ckpt, state = _saved_run(run_dir, accelerator)
    files = sorted(p.name for p in _step(run_dir, 4).iterdir())
    assert "registered.json" in files and "registered.safetensors" in files
    assert not [f for f in files if f.startswith("custom_checkpoint")], files
    scheduler = ckpt.objects[0]
    saved_scheduler, saved_state = scheduler.state_dict(), state.state_dict()
    for _ in range(5):
        scheduler.step()
    state.global_step, state.last_metrics = 99, {}
    ckpt.run.resume_from = _step(run_dir, 4)
    ckpt.resume(state)
    assert scheduler.state_dict() == saved_scheduler and state.state_dict() == saved_state


def test_encoding_keeps_tuples_int_keys_and_non_finite_floats(tmp_path):
    from training.checkpoint import _decode, _encode

    tensors = {}
    value = {"a": (1, 2.5, float("inf")), 3: [None, "x", torch.arange(3)], "__b": {"nan": float("nan")}}
    encoded = json.loads(json.dumps(_encode(value, tensors)))
    decoded = _decode(encoded, tensors)
    assert decoded["a"] == (1, 2.5, float("inf")) and decoded[3][:2] == [None, "x"]
    assert torch.equal(decoded[3][2], torch.arange(3)) and decoded["__b"]["nan"] != decoded["__b"]["nan"]
    with pytest.raises(TypeError, match="cannot store a set"):
        _encode({"s": {1, 2}}, {})


def test_crafted_or_corrupt_checkpoint_files_are_refused_before_loading(tmp_path, accelerator):
    """A pickle where the registered objects were (Accelerate would unpickle it with weights_only=False), a crafted
    or corrupt RNG state, a truncated weights file: refused with one reason; the payload never runs."""
    from training.checkpoint import check_checkpoint

    run_dir = tmp_path / "runs" / "r"
    _saved_run(run_dir, accelerator)
    marker = tmp_path / "pwned"
    newest = _step(run_dir, 4)
    torch.save(Payload(marker), newest / "custom_checkpoint_0.pkl")
    with pytest.raises(UsageError, match="custom_checkpoint_0.pkl, objects that only unpickling with code execution"):
        check_checkpoint(newest)
    (newest / "custom_checkpoint_0.pkl").unlink()
    check_checkpoint(newest)

    rng = (newest / "random_states_0.pkl").read_bytes()
    torch.save({"random_state": Payload(marker)}, newest / "random_states_0.pkl")
    with pytest.raises(UsageError, match="random_states_0.pkl cannot be read safely"):
        check_checkpoint(newest)
    (newest / "random_states_0.pkl").write_bytes(rng[: len(rng) // 2])  # truncated
    with pytest.raises(UsageError, match="random_states_0.pkl cannot be read safely"):
        check_checkpoint(newest)
    with pytest.raises(UsageError, match="no random_states_1.pkl"):
        check_checkpoint(_step(run_dir, 2), num_processes=2)
    weights = (_step(run_dir, 2) / "model.safetensors").read_bytes()
    (_step(run_dir, 2) / "model.safetensors").write_bytes(weights[:-8])
    with pytest.raises(UsageError, match="model.safetensors is not a complete safetensors file"):
        check_checkpoint(_step(run_dir, 2))
    (_step(run_dir, 2) / "model.safetensors").write_bytes(weights)
    (_step(run_dir, 2) / "registered.json").write_text("{")
    with pytest.raises(UsageError, match="registered.json/registered.safetensors unreadable"):
        check_checkpoint(_step(run_dir, 2))
    assert not marker.exists()


def test_a_checkpoint_of_another_process_count_or_with_sharded_fsdp_states_is_refused(tmp_path, accelerator):
    """Fewer processes than saved would pass the RNG-file check but resume inexactly (batches counted per
    process); torch.distributed.checkpoint folders are read with pickle."""
    from training.checkpoint import check_checkpoint

    run_dir = tmp_path / "runs" / "r"
    _saved_run(run_dir, accelerator)
    step = _step(run_dir, 4)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["num_processes"] == 1
    (step / "random_states_1.pkl").write_bytes((step / "random_states_0.pkl").read_bytes())
    (step / "meta.json").write_text(json.dumps({**meta, "num_processes": 2}))
    with pytest.raises(UsageError, match="saved by 2 process\\(es\\), this launch has 1; resume it with 2"):
        check_checkpoint(step)
    check_checkpoint(step, num_processes=2)
    (step / "meta.json").write_text(json.dumps(meta))
    shards = step / "pytorch_model_fsdp_0"
    shards.mkdir()
    (shards / ".metadata").write_bytes(b"not read")
    with pytest.raises(UsageError, match="torch.distributed.checkpoint folder .*FULL_STATE_DICT"):
        check_checkpoint(step)


def test_resume_falls_back_past_a_refused_checkpoint_and_refuses_a_named_one(tmp_path, accelerator):
    run_dir = tmp_path / "runs" / "r"
    _saved_run(run_dir, accelerator)
    (_step(run_dir, 4) / "random_states_0.pkl").write_bytes(b"garbage")
    for resume in ("auto", str(run_dir)):
        found, ckpt, skipped = resolve_run(Demo(output_dir=str(tmp_path / "runs"), resume=resume), "demo")
        assert (found, ckpt) == (run_dir, _step(run_dir, 2)), resume
        assert len(skipped) == 1 and "step_00000004: random_states_0.pkl cannot be read safely" in skipped[0]
    with pytest.raises(UsageError, match=r"^--resume checkpoint .*step_00000004: random_states_0.pkl"):
        resolve_run(Demo(resume=str(_step(run_dir, 4))), "demo")
    (_step(run_dir, 2) / "random_states_0.pkl").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="no checkpoint of .* can be resumed safely"):
        resolve_run(Demo(output_dir=str(tmp_path / "runs"), resume="auto"), "demo")


def test_a_file_that_weights_only_loading_refuses_ends_the_resume_with_one_line(tmp_path, accelerator, capsys):
    """optimizer.bin is a torch archive, so only loading it can tell a crafted one: Accelerate loads it with
    weights_only=True, which refuses the payload; the script stops with one line instead of a traceback."""
    run_dir = tmp_path / "r"
    ckpt, state = _saved_run(run_dir, accelerator, steps=(2,))
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [Payload(marker)]}, _step(run_dir, 2) / "optimizer.bin")
    ckpt.run.resume_from = _step(run_dir, 2)
    with pytest.raises(SystemExit) as e:
        ckpt.resume(state)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "step_00000002: cannot be loaded (UnpicklingError" in err[0], err
    assert not marker.exists()


def test_checkpoint_rotation_keeps_last_and_top_k(tmp_path, accelerator):
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    ckpt = Checkpointer(accelerator, _run(tmp_path), monitor="val/acc", mode="max", keep_last=2, save_top_k=2)
    state = TrainState()
    values = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.8, 5: 0.2, 6: 0.3}
    for step, value in values.items():
        state.global_step, state.last_metrics = step, {"val/acc": value}
        ckpt.save(state)
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [2, 4, 5, 6]  # last two (5, 6) plus the two best (2: 0.9, 4: 0.8)
    assert all((tmp_path / "checkpoints" / f"step_{s:08d}" / "COMPLETE").exists() for s in kept)
    assert (tmp_path / "checkpoints" / "step_00000006" / "model.safetensors").exists()
    del model


class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_ema_round_trip_includes_batchnorm_buffers(tmp_path, accelerator):
    torch.manual_seed(0)
    net = _BNNet()
    ema = ModelEmaV3(net, decay=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(1, 6):
        net(torch.randn(4, 3, 8, 8) * 3 + 1).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(net, step=step)
    assert not torch.allclose(ema.module.bn.running_mean, torch.zeros(4)), "EMA must track BN buffers"
    ckpt = Checkpointer(accelerator, _run(tmp_path), monitor="val/acc")
    ckpt.register(ema)
    ckpt.save(TrainState(global_step=5))
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    fresh = ModelEmaV3(_BNNet(), decay=0.9)
    ema.load_state_dict(fresh.state_dict())
    ckpt.run.resume_from = _step(tmp_path, 5)
    ckpt.resume(TrainState())
    for key, value in saved.items():
        assert torch.equal(ema.state_dict()[key], value), key
    assert "module.bn.running_var" in saved and "module.bn.num_batches_tracked" in saved


def test_best_export_writes_safetensors_and_is_best_order(tmp_path, accelerator):
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({"lr": 1.0}))
    net = _BNNet()
    ema = ModelEmaV3(net, decay=0.5)
    ckpt = Checkpointer(accelerator, _run(tmp_path), monitor="val/acc", mode="max")
    state = TrainState(global_step=3)
    assert ckpt.update_best(state, {"val/acc": 0.4}, net, ema)
    assert not ckpt.update_best(state, {"val/acc": 0.4}, net, ema)  # equal is not better
    assert ckpt.update_best(state, {"val/acc": 0.5}, net, ema) and state.best == 0.5
    assert not ckpt.update_best(state, {"val/acc": float("nan")}, net, ema)
    files = sorted(p.name for p in (tmp_path / "best").iterdir())
    assert files == ["args.yaml", "metrics.json", "model.safetensors", "model_ema.safetensors"]
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["val/acc"] == 0.5


def test_early_stopping_patience_min_evals_and_state(tmp_path):
    s = EarlyStopping("acc", mode="max", patience=2, min_evals=2)
    stops = [s.step({"acc": a}) for a in [0.1, 0.0, 0.5, 0.5, 0.4, 0.9]]
    # evals 1-2 ignored (min_evals); 0.5 best; 0.5 (no gain) -> 1; 0.4 -> 2 -> stop
    assert stops == [False, False, False, False, True, False]
    restored = EarlyStopping("acc", mode="max", patience=2)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def test_early_stopping_second_guard_reduces_patience():
    s = EarlyStopping("hit", mode="max", patience=4, guard_monitor="mae", guard_mode="min",
                      guard_min_delta=0.05, guard_credit=3)
    seq = [(90, 2.0), (89, 1.99), (89, 1.98), (88, 1.90), (88, 1.89), (88, 1.88), (88, 1.87)]
    out = []
    for hit, mae in seq:
        out.append((s.step({"hit": hit, "mae": mae}), s.bad_evals))
    # (90, 2.0): both improve. Then hit stalls: 1, 2, then mae improves by 0.08 > 0.05: 3 - 3 = 0,
    # then 1, 2, 3 with mae gains below min_delta.
    assert [b for _, b in out] == [0, 1, 2, 0, 1, 2, 3]
    assert not any(stop for stop, _ in out)
    assert s.step({"hit": 80, "mae": 1.86}) is True  # fourth bad evaluation


def test_summary_csv_union_header(tmp_path):
    path = tmp_path / "summary.csv"
    append_summary(path, {"step": 1, "val/a": 0.5})
    append_summary(path, {"step": 2, "val/a": 0.6, "val/b": 1.0})
    lines = path.read_text().splitlines()
    assert lines == ["step,val/a,val/b", "1,0.5,", "2,0.6,1.0"]


def _export_of(tmp_path, accelerator) -> tuple[Path, torch.nn.Module]:
    """A real best/ export of a tiny SigmaMUNet (a class of the models package) through the Checkpointer."""
    from models.sigma_munet import SigmaMUNet
    from training.export import build_model, model_record

    record = model_record(SigmaMUNet, n_frames=3, depth_shared=1, depth_union=1, initial_features=4, inter_features=4)
    net = build_model(record)
    ckpt = Checkpointer(accelerator, _run(tmp_path), monitor="val/acc", mode="max", model_json=record)
    assert ckpt.update_best(TrainState(global_step=3), {"val/acc": 0.5}, net)
    return tmp_path / "best", net


def test_load_export_rebuilds_the_model_and_refuses_what_it_cannot_trust(tmp_path, accelerator):
    from safetensors.torch import load_file, save_file

    from training.export import load_export, model_record

    folder, net = _export_of(tmp_path, accelerator)
    for path in (tmp_path, folder, folder / "model.safetensors"):
        export = load_export(path)
        assert export.folder == folder and export.metrics["val/acc"] == 0.5 and export.metrics["global_step"] == 3
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in export.model.state_dict().items())
        assert not export.model.training
    with pytest.raises(UsageError, match="nowhere: no such run"):
        load_export(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no model.safetensors found"):
        load_export(tmp_path / "empty")
    record = json.loads((folder / "model.json").read_text())
    for bad, message in (({**record, "module": "os"}, "models package"),
                         ({**record, "module": "models.lite_hrnet", "class": "conv_bn"}, "not a model class"),
                         ({**record, "class": "Nope"}, "no model class"),
                         ({**record, "kwargs": {"n_frames": 3, "width": 3}}, "failed"),
                         ({"kwargs": {}}, "expected keys")):
        (folder / "model.json").write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=message):
            load_export(folder)
    (folder / "model.json").write_text(json.dumps(record))
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if k.endswith(".weight"))  # (BatchNorm would tolerate a missing counter)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors")
    with pytest.raises(UsageError, match="weights do not fit the model"):
        load_export(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        load_export(folder)
    with pytest.raises(ValueError, match="models package"):
        model_record(torch.nn.Linear, in_features=2, out_features=2)


def test_load_export_of_a_checkpoint_strips_wrapper_prefixes(tmp_path, accelerator):
    from safetensors.torch import save_file

    from training.export import load_export

    folder, net = _export_of(tmp_path, accelerator)
    step = tmp_path / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    save_file({f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}, step / "model.safetensors")
    (step / "COMPLETE").touch()
    export = load_export(step)
    assert export.weights == step / "model.safetensors" and export.metrics == {}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in export.model.state_dict().items())


def test_train_meter_logs_the_design_keys_once_per_window(accelerator, caplog):
    from training.summary import TrainMeter

    meter = TrainMeter(accelerator, logging.getLogger("meter"))
    for batch in meter.timed([1, 2, 3, 4]):
        meter.add(torch.tensor(float(batch)), {"loss/a": torch.tensor(2.0 * batch)}, batch_size=8)
    with caplog.at_level(logging.INFO, logger="meter"):
        logs = meter.write(step=4, lr=1e-3, grad_norm=torch.tensor(0.5))
    assert set(logs) == {"train/loss", "train/lr", "train/grad_norm", "train/a", "perf/samples_per_s",
                         "perf/data_time_frac"}
    assert logs["train/loss"] == pytest.approx(2.5) and logs["train/a"] == pytest.approx(5.0)
    assert logs["train/grad_norm"] == 0.5 and 0 <= logs["perf/data_time_frac"] <= 1 and logs["perf/samples_per_s"] > 0
    assert "update 4  loss 2.5000" in caplog.text
    assert meter.micro == 0 and meter.samples == 0 and not meter.parts  # a new window


def test_remaining_batches_sets_the_epoch_and_moves_it_on(accelerator):
    """The epoch reaches sampler and dataset (when it has set_epoch); a used-up epoch advances state.epoch."""
    class Data(torch.utils.data.Dataset):
        epochs: list = []

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return i

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    dl = accelerator.prepare(torch.utils.data.DataLoader(Data(), batch_size=2))
    ckpt = Checkpointer(accelerator, _run(Path(".")), monitor="val/acc")
    state = TrainState(epoch=1, step_in_epoch=1)
    seen = list(ckpt.remaining_batches(dl, state))
    assert len(seen) == 2 and (state.epoch, state.step_in_epoch) == (2, 0) and set(Data.epochs) == {1}
    plain = accelerator.prepare(torch.utils.data.DataLoader(list(range(4)), batch_size=2))  # no set_epoch
    assert len(list(ckpt.remaining_batches(plain, state))) == 2 and state.epoch == 3


def test_check_finite_stops_with_exit_1_and_a_line(tmp_path, accelerator, caplog):
    ckpt = Checkpointer(accelerator, _run(tmp_path), monitor="val/acc")
    ckpt.check_finite(torch.tensor(3.0), TrainState())
    with caplog.at_level(logging.ERROR, logger="test"), pytest.raises(SystemExit) as stop:
        ckpt.check_finite(torch.tensor(float("nan")), TrainState(global_step=6))
    assert stop.value.code == 1 and "non-finite loss at update 7" in caplog.text


def test_early_stopping_stays_stopped_after_resume():
    stopper = EarlyStopping("val/acc", mode="max", patience=2)
    for value in (0.5, 0.4, 0.4):
        stopper.step({"val/acc": value})
    assert stopper.stopped
    resumed = EarlyStopping("val/acc", mode="max", patience=2)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.stopped and not EarlyStopping("val/acc", patience=0).stopped


def test_fp16_skips_are_tolerated_until_they_never_end(tmp_path, accelerator, caplog, monkeypatch):
    """Under fp16 the scaler skips overflowing steps (norm inf): a few are normal, a NaN loss skips forever."""
    from training import checkpoint

    ckpt = Checkpointer(accelerator, _run(tmp_path), monitor="val/acc")
    monkeypatch.setattr(type(accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    for _ in range(checkpoint.MAX_SKIPPED_IN_A_ROW - 1):
        ckpt.check_finite(torch.tensor(float("inf")), TrainState())
    ckpt.check_finite(torch.tensor(2.0), TrainState())  # a finite update resets the count
    for _ in range(checkpoint.MAX_SKIPPED_IN_A_ROW - 1):
        ckpt.check_finite(torch.tensor(float("inf")), TrainState())
    with caplog.at_level(logging.ERROR, logger="test"), pytest.raises(SystemExit):
        ckpt.check_finite(torch.tensor(float("nan")), TrainState(global_step=40))
    assert "non-finite loss at update 41" in caplog.text


def test_export_refuses_incomplete_checkpoints_and_init_weights_that_do_not_fit(tmp_path, accelerator):
    from safetensors.torch import save_file

    from models.sigma_munet import SigmaMUNet
    from training.export import check_weights_fit, export_weights, load_export, model_record

    folder, net = _export_of(tmp_path, accelerator)
    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    save_file(net.state_dict(), step / "model.safetensors")  # no COMPLETE: interrupted while saving
    with pytest.raises(UsageError, match="incomplete checkpoint"):
        load_export(step)
    weights, source = export_weights(tmp_path)
    check_weights_fit(json.loads((folder / "model.json").read_text()), weights, source)
    wider = model_record(SigmaMUNet, n_frames=3, depth_shared=1, depth_union=1, initial_features=8, inter_features=4)
    with pytest.raises(UsageError, match="of another shape"):
        check_weights_fit(wider, weights, source)
    deeper = model_record(SigmaMUNet, n_frames=3, depth_shared=2, depth_union=1, initial_features=4, inter_features=4)
    with pytest.raises(UsageError, match="missing"):
        check_weights_fit(deeper, weights, source)
