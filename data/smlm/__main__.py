"""python -m data.smlm tiff --sim_config FILE --out stack.tif [--frames N] [--img_size H,W]
[--emitter_density D] [--seed S]
python -m data.smlm read-noise-map --out map.npy [--size H,W] [--median_e E] [--seed S]
python -m data.smlm colour-tiff --sim_config FILE --out stack.tif [--frames N] [--emitter_density D] [--seed S]"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from .camera import synthetic_read_sigma_map
from .config import load_sim_config
from .io import write_tiff_movie


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.smlm", description="SMLM simulator tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("tiff", help="simulate a TIFF stack in ADU (input of fit_smlm.py) and its ground truth")
    p.add_argument("--sim_config", required=True, help="YAML with a simulation: section, e.g. a preset or "
                                                      "<run>/simulation.yaml")
    p.add_argument("--frames", type=int, default=1000, help="frames to simulate")
    p.add_argument("--img_size", default=None, help="H,W px (default: the config's)")
    p.add_argument("--emitter_density", type=float, default=None,
                   help="emitters per um^2 per frame (default: the config's emitter_av / emitter_density)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .tif; the ground truth goes to the same name with .h5")
    m = commands.add_parser("read-noise-map", help="write a synthetic sCMOS read-noise map (.npy, e- rms per "
                                                   "pixel) for a simulation config's read_sigma_map")
    m.add_argument("--out", required=True, help="output .npy")
    m.add_argument("--size", default="512,512", help="H,W px of the sensor")
    m.add_argument("--median_e", type=float, default=1.6, help="median read noise, e- rms")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c = commands.add_parser("colour-tiff", help="simulate a two-channel TIFF stack (T, 2, H, W) in ADU (input of "
                                                "fit_smlm_colour.py) and its ground truth")
    c.add_argument("--sim_config", required=True, help="YAML with a two-colour simulation: section, e.g. "
                                                      "configs/smlm_colour_cpu.yaml or <run>/simulation.yaml")
    c.add_argument("--frames", type=int, default=1000, help="frames to simulate")
    c.add_argument("--emitter_density", type=float, default=None, help="emitters per um^2 per frame")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="output .tif; the ground truth goes to the same name with .h5")
    args = parser.parse_args(argv)

    def fail(message: str):
        sys.stderr.write(f"data.smlm: error: {message}\n")
        raise SystemExit(2)

    if args.command == "read-noise-map":
        return write_read_noise_map(args, fail)

    if args.frames < 1:
        fail(f"--frames must be >= 1, got {args.frames}")
    if args.command == "colour-tiff":
        return write_colour_stack(args, fail)
    try:
        cfg = load_sim_config(args.sim_config)
        changes = {}
        if args.img_size is not None:
            try:
                h, w = (int(v) for v in args.img_size.split(","))
            except ValueError:
                fail(f"--img_size {args.img_size!r}: expected H,W, e.g. 64,64")
            changes["img_size"] = (h, w)
        if args.emitter_density is not None:
            changes.update(emitter_density=args.emitter_density, emitter_av=None)
        cfg = dataclasses.replace(cfg, **changes) if changes else cfg
        tif, h5, info = write_tiff_movie(args.out, cfg, args.frames, args.seed)
    except ValueError as e:
        fail(str(e))
    print(f"{tif}: {info['frames']} frames of {cfg.img_size[0]}x{cfg.img_size[1]} px in ADU ({cfg.camera}), "
          f"{info['emitters']} emitter-frames, {cfg.em_avg:.1f} emitters/frame on average"
          + (f", {info['saturated_pixels']} pixels clipped at 65535" if info["saturated_pixels"] else ""))
    print(f"{h5}: ground truth (data.smlm.read_movie_h5)")
    return 0


def write_colour_stack(args, fail) -> int:
    from .colour import load_colour_config, write_colour_tiff
    try:
        cfg = load_colour_config(args.sim_config)
        if args.emitter_density is not None:
            ch1, ch2 = (dataclasses.replace(ch, emitter_density=args.emitter_density, emitter_av=None)
                        for ch in cfg.channels)
            cfg = dataclasses.replace(cfg, channel1=ch1, channel2=ch2)
        cfg = dataclasses.replace(cfg, curriculum=())
        tif, h5, clipped = write_colour_tiff(args.out, cfg, args.frames, args.seed)
    except ValueError as e:
        fail(str(e))
    print(f"{tif}: {args.frames} frames x 2 channels of {cfg.img_size[0]}x{cfg.img_size[1]} px in ADU "
          f"({cfg.channel1.camera}, {cfg.channel2.camera}), {cfg.channel1.em_avg:.1f} emitters/frame on average"
          + (f", {clipped} pixels clipped to 0..65535" if clipped else ""))
    print(f"{h5}: ground truth (data.smlm.colour.read_colour_h5)")
    return 0


def write_read_noise_map(args, fail) -> int:
    try:
        h, w = (int(v) for v in args.size.split(","))
    except ValueError:
        fail(f"--size {args.size!r}: expected H,W, e.g. 512,512")
    if h < 1 or w < 1:
        fail(f"--size {args.size!r}: expected two positive integers")
    if not (args.median_e > 0 and np.isfinite(args.median_e)):
        fail(f"--median_e must be a finite number > 0, got {args.median_e}")
    out = Path(args.out)
    if out.suffix != ".npy":
        fail(f"--out {out}: expected a .npy file name")
    if out.exists() and not args.overwrite:  # it may be a user's real calibration
        fail(f"--out {out}: already exists (pass --overwrite to replace it)")
    sigma = synthetic_read_sigma_map((h, w), median_e=args.median_e, seed=args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, sigma)
    os.replace(tmp, out)
    print(f"{out}: {h}x{w} px read-noise map, median {np.median(sigma):.2f} e-, rms {np.sqrt(np.mean(sigma**2)):.2f} "
          f"e-, max {sigma.max():.1f} e-")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
