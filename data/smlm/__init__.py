"""Simulated single-molecule localisation movies (DECODE recipe, smlm.md §1), vectorised in torch.

    python -m data.smlm tiff --sim_config FILE --out stack.tif    # TIFF in ADU + ground truth (.h5)

    config.py     SimConfig (every physical parameter, validated), load_sim_config, the derived scales
    psf.py        Gaussian / astigmatic widths, the pixel-integrated Gaussian, SMAP cubic-spline PSF, render
    camera.py     background, camera noise (EMCCD, sCMOS, Poisson), ADU <-> photons, EMCCD excess noise
    simulate.py   blinking emitters (Emitters), Movie, simulate_movie / simulate_acquisition
    dataset.py    input scaling, targets, frame windows, SMLMSimDataset, MovieWindowDataset, collate_smlm
    io.py         fixed movies in HDF5, TIFF stacks in ADU
    colour.py     two-colour ratiometric movies (dyes, two channels, registration, curriculum); import it as
                  data.smlm.colour (docs/smlm_colour.md)
    __main__.py   the command line

Units and conventions
    x, y      px. Pixel (row i, col j) covers x in [j - 1/2, j + 1/2) and y in [i - 1/2, i + 1/2), so its centre
              is (x, y) = (j, i) and the frame extent is [-0.5, W - 0.5] x [-0.5, H - 0.5], as in losses/smlm.py
              and DECODE's `psf_extent`. x runs along the last (W) axis, y along H. nm = px * px_size_nm.
    z         nm, 0 at the focal plane.
    time      frames; frame k is the exposure [k, k + 1). Emitter on-times are continuous.
    photons   photons reaching the camera, before the quantum efficiency: the camera detects qe x photons as
              photoelectrons, and `to_photons` divides by qe again, so frames, targets, predictions and the
              fitted output are all in photons reaching the camera (with DECODE's default qe 1, smlm.md §1.1,
              the two are the same). ThunderSTORM reports the same unit when its camera setup has the same
              quantum efficiency; with its default QE 1 it reports photoelectrons (ours x qe). An emitter's
              `flux` is its photons per full frame; a frame row of `Emitters` holds the photons it emitted in
              that frame.
    frames    (T, H, W) float32. Cameras return ADU; `to_photons` maps them back to photons with the mean
              response (smlm.md §1.5 step 9), which is what the network sees (DECODE `convert2photons: true`,
              always on here).
    bg        photons per px per frame reaching the camera, added before the camera (smlm.md §1.4).

PSFs (`psf`, smlm.md §1.3): "gaussian" and "astigmatic" are pixel-integrated Gaussians (erf); "spline" is the
cubic-spline PSF of a SMAP calibration .mat (`spline_calib`), evaluated in torch by `SplinePSF` (coefficient axes
and reference point in its docstring). `spline_from_psf_stack` and `save_smap_spline` build such a file from a
sampled PSF stack, for users without SMAP.

Sampling functions take a `torch.Generator` (its device is where tensors are made), so a movie is a pure
function of the generator's seed and runs unchanged in DataLoader workers or on an accelerator. Every draw goes
through that generator, including EM gain (own Gamma sampler; torch's Gamma takes no generator).

Training items (`SMLMSimDataset`) are the `window`-frame windows of short simulated movies: items are grouped
in blocks of `block` consecutive indices, and each block is one movie of block + window - 1 frames (its own
padded blinking history) seeded by (seed, epoch, block index), cut into overlapping windows as DECODE cuts
its per-epoch movie (`SMLMLiveDataset`, smlm.md §1.7). An epoch is a fresh set of movies; an item is a pure
function of (seed, epoch, index), whatever the worker or the order of access. Simulating a block in one
vectorised call is about ten times cheaper per window than one movie per window (see
benchmarks/smlm_throughput.py). Fixed validation and test movies are whole movies (`simulate_movie`) stored
in HDF5 (`write_movie_h5` / `read_movie_h5`) and cut into windows by `MovieWindowDataset`.
"""
from .camera import (EMCCD_EXCESS_NOISE, background_std_photons, camera_forward, counted_qe, excess_noise,
                     frame_read_sigma, load_read_sigma_map, read_noise_variance, read_noise_window,
                     sample_background, synthetic_read_sigma_map, to_photons)
from .config import CAMERA_KINDS, PSF_KINDS, SimConfig, load_sim_config
from .dataset import (MovieWindowDataset, SMLMSimDataset, collate_smlm, frame_targets, is_target, scale_frames,
                      window_indices)
from .io import read_movie_h5, write_movie_h5, write_tiff_movie
from .psf import (SplinePSF, load_smap_spline, pixel_gaussian, psf_sigmas, render, save_smap_spline,
                  spline_from_psf_stack)
from .simulate import Emitters, Movie, bin_emitters, sample_loose_emitters, simulate_acquisition, simulate_movie

__all__ = ["CAMERA_KINDS", "EMCCD_EXCESS_NOISE", "PSF_KINDS", "Emitters", "Movie", "MovieWindowDataset",
           "SMLMSimDataset", "SimConfig", "SplinePSF", "background_std_photons", "bin_emitters", "camera_forward",
           "collate_smlm", "counted_qe", "excess_noise", "frame_read_sigma", "frame_targets", "is_target",
           "load_read_sigma_map",
           "load_sim_config", "load_smap_spline", "pixel_gaussian", "psf_sigmas", "read_movie_h5",
           "read_noise_variance", "read_noise_window", "render", "sample_background", "sample_loose_emitters",
           "save_smap_spline", "scale_frames", "simulate_acquisition", "simulate_movie", "spline_from_psf_stack",
           "synthetic_read_sigma_map", "to_photons", "window_indices", "write_movie_h5", "write_tiff_movie"]
