"""data.captcha.halve_canvas (the half-size batch of progressive resizing) and benchmarks/captcha_profile.py
end to end on a tiny setting (every part and lever measured, every parameter counted in exactly one part)."""
import json

import torch

from conftest import run_python
from data.captcha import halve_canvas as halve
from models.lite_hrnet import LiteHRNet18FPN


def test_halve_downsamples_the_image_and_halves_every_label():
    image = torch.rand(2, 4, 256, 512)
    image[:, 3] = 1.0
    image[0, 3, :, 301:] = 0.0        # padding from column 301: the half-size column 150 mixes real and padding
    batch = {"image": image, "gap": torch.tensor([[100.0, 60.0], [7.0, 9.0]]),
             "slider": torch.tensor([[20.5, 61.0], [3.0, 5.0]]), "fake_gaps": torch.ones(2, 2, 2) * 40,
             "fake_mask": torch.tensor([[True, False], [False, False]]), "angle": torch.zeros(2)}
    small = halve(batch)
    assert small["image"].shape == (2, 4, 128, 256)
    assert torch.allclose(small["image"][:, :3], image[:, :3].reshape(2, 3, 128, 2, 256, 2).mean((3, 5)))
    mask = small["image"][0, 3]
    assert mask[:, :150].eq(1).all() and mask[:, 150:].eq(0).all()   # real only where all four pixels were
    assert small["image"][1, 3].eq(1).all()
    assert torch.equal(small["gap"], batch["gap"] / 2) and torch.equal(small["slider"], batch["slider"] / 2)
    assert torch.equal(small["fake_gaps"], batch["fake_gaps"] / 2)
    assert small["fake_mask"] is batch["fake_mask"] and batch["image"] is image   # the input batch is untouched


def test_profile_benchmark_measures_every_part_and_lever(tmp_path):
    proc = run_python("benchmarks/captcha_profile.py", "--batch_size", "1", "--steps", "1", "--warmup", "0",
                      "--rounds", "1", "--batches", "1", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile, levers = json.loads((tmp_path / "captcha_profile.json").read_text())["tables"]
    parts = {r["part"]: r for r in profile["rows"]}
    network = [r for name, r in parts.items() if name.startswith(("stem", "stage", "FPN", "heads"))]
    assert len(network) == 6 and all(r["forward ms"] > 0 and r["backward ms"] > 0 for r in network)
    model = LiteHRNet18FPN(in_chans=4, fpn_channels=32, head_channels=32)
    # every parameter belongs to exactly one part of the network
    assert sum(r["params"] for r in network) == sum(p.numel() for p in model.parameters())
    assert parts["sum of the parts"]["share %"] == 100.0 and parts["full update (measured)"]["total ms"] > 0
    variants = [r["variant"] for r in levers["rows"]]
    assert len(variants) == 7 and variants[0].startswith("preset") and levers["rows"][0]["speed-up"] == 1.0
    assert all(r["samples/s"] > 0 for r in levers["rows"])
    assert "canvas 256x128 (progressive resizing, phase 1)" in variants
    assert "--input_scale 2 (the model pools the 512x256 canvas)" in variants


def test_profile_benchmark_rejects_bad_flags():
    proc = run_python("benchmarks/captcha_profile.py", "--steps", "0")
    assert proc.returncode == 2 and "--steps" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
