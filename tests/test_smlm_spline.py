"""Cubic-spline PSF of data/smlm/psf.py: coefficient indexing and axes, a spline built from the astigmatic Gaussian
against the Gaussian itself, SMAP .mat files (v5 and v7.3), config validation and simulation end to end."""
import dataclasses

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from data.smlm import (Emitters, SimConfig, SMLMSimDataset, load_sim_config, load_smap_spline, psf_sigmas, render,
                       save_smap_spline, simulate_movie, spline_from_psf_stack)

ROI, DZ_NM, Z_HALF_NM, SIGMA0 = 27, 20.0, 460.0, 1.3


def _emitters(xyz, phot, frame_ix=None):
    xyz = torch.as_tensor(xyz, dtype=torch.float64).reshape(-1, 3)
    n = xyz.shape[0]
    frame_ix = torch.arange(n) if frame_ix is None else torch.as_tensor(frame_ix)
    return Emitters(frame_ix, xyz, torch.as_tensor(phot, dtype=torch.float64).expand(n).clone(), torch.arange(n))


@pytest.fixture(scope="module")
def gauss_calib(tmp_path_factory):
    """SMAP-like .mat of the astigmatic Gaussian (sigma0 1.3 px), sampled per pixel on a 27 x 27 ROI and every
    20 nm over z in [-460, 460]; returns (path, stack (Nz, 27, 27))."""
    z = np.arange(-Z_HALF_NM, Z_HALF_NM + DZ_NM / 2, DZ_NM)
    centre = (ROI - 1) // 2
    cfg = SimConfig(img_size=(ROI, ROI), psf="astigmatic", sigma0_px=SIGMA0)
    stack = render(_emitters([[centre, centre, v] for v in z], 1.0), len(z), cfg).numpy()
    path = tmp_path_factory.mktemp("calib") / "gauss_3dcal.mat"
    save_smap_spline(path, spline_from_psf_stack(stack), x0=centre + 1, z0=int(np.argmin(np.abs(z))), dz_nm=DZ_NM)
    return path, stack


def test_single_coefficient_gives_the_monomial_on_its_pixel(tmp_path):
    # Nx != Ny and an off-centre emitter: a swapped x/y axis or a wrong a + 4b + 16c index lands elsewhere.
    # x0 = 3 (reference 2 px), z0 = 1, dz = 50 nm; emitter (x, y, z) = (10.25, 7.5, 30 nm):
    # u = 2 + col - 10.25 is in voxel 1 at col 10 (du 0.75); v = 2 + row - 7.5 in voxel 2 at row 8 (dv 0.5);
    # w = 1 + 30 / 50 = 1.6 is in slice 1 (dw 0.6).
    for (a, b, c), value in [((1, 2, 3), 0.75 * 0.5**2 * 0.6**3), ((3, 0, 1), 0.75**3 * 0.6), ((0, 0, 0), 1.0)]:
        coeff = np.zeros((5, 4, 3, 64), dtype=np.float32)
        coeff[1, 2, 1, a + 4 * b + 16 * c] = 1.0
        path = tmp_path / f"one_{a}{b}{c}.mat"
        save_smap_spline(path, coeff, x0=3, z0=1, dz_nm=50.0)
        cfg = SimConfig(img_size=(16, 20), psf="spline", spline_calib=str(path), z_range_nm=(-50.0, 100.0))
        img = render(_emitters([[10.25, 7.5, 30.0]], 1000.0), 1, cfg)[0]
        expected = torch.zeros(16, 20, dtype=torch.float64)
        expected[8, 10] = 1000.0 * value
        torch.testing.assert_close(img, expected, rtol=1e-6, atol=1e-4)


def test_spline_of_the_gaussian_matches_the_gaussian_render(gauss_calib):
    path, stack = gauss_calib
    sp = load_smap_spline(path)
    assert load_smap_spline(path) is sp                                   # read once per process
    assert sp.coeff.shape == (ROI - 1, ROI - 1, stack.shape[0] - 1, 64)
    assert sp.z_range_nm == pytest.approx((-Z_HALF_NM, Z_HALF_NM))
    size = (40, 48)
    spline_cfg = SimConfig(img_size=size, psf="spline", spline_calib=str(path), z_range_nm=(-400.0, 400.0))
    gauss_cfg = SimConfig(img_size=size, psf="astigmatic", sigma0_px=SIGMA0)
    gen = torch.Generator().manual_seed(0)
    n = 40
    # Half the emitters anywhere (ROIs clipped at the border), half >= 14 px inside (whole 26 px ROI in frame).
    lo = torch.tensor([-0.5, -0.5, -400.0], dtype=torch.float64)
    span = torch.tensor([size[1], size[0], 800.0], dtype=torch.float64)
    anywhere = lo + span * torch.rand(n // 2, 3, generator=gen, dtype=torch.float64)
    inner = torch.tensor([14.0, 14.0, -400.0], dtype=torch.float64) + torch.tensor(
        [size[1] - 29.0, size[0] - 29.0, 800.0], dtype=torch.float64) * torch.rand(n // 2, 3, generator=gen,
                                                                                    dtype=torch.float64)
    em = _emitters(torch.cat([anywhere, inner]), 1000.0)
    spline_img, gauss_img = render(em, n, spline_cfg), render(em, n, gauss_cfg)
    # Interpolating tricubic spline of a per-pixel sampled Gaussian: measured max error 0.30 % of the peak.
    err = (spline_img - gauss_img).abs().amax((1, 2)) / gauss_img.amax((1, 2))
    assert err.max().item() < 5e-3
    # Inside the frame the spline keeps the photons the 27 x 27 sampling kept (>= 99.986 % at |z| <= 460 nm).
    sums = spline_img[n // 2:].sum((1, 2))
    assert torch.all(sums <= 1000.0 * (1 + 1e-5)) and torch.all(sums >= 1000.0 * stack.sum((1, 2)).min() - 1e-2)


@pytest.mark.parametrize("cell", [False, True])
def test_matlab_v5_cell_and_v73_hdf5_files_load_the_same_spline(gauss_calib, tmp_path, cell):
    path, _ = gauss_calib
    ref = load_smap_spline(path)
    coeff = ref.coeff.numpy()
    v5 = tmp_path / "v5.mat"
    wrapped = np.empty((1, 1), dtype=object)
    wrapped[0, 0] = coeff
    scipy.io.savemat(v5, {"SXY": {"cspline": {"coeff": wrapped if cell else coeff, "x0": ref.x0, "z0": ref.z0,
                                                "dz": ref.dz_nm}}})
    # MATLAB v7.3: HDF5 behind a 512-byte header, arrays column-major (h5py sees reversed axes), scalars 1 x 1,
    # a cell as a dataset of object references into #refs#.
    v73 = tmp_path / "v73.mat"
    with h5py.File(v73, "w", userblock_size=512) as f:
        cspline = f.create_group("SXY").create_group("cspline")
        if cell:
            target = f.create_group("#refs#").create_dataset("a", data=coeff.T)
            refs = cspline.create_dataset("coeff", shape=(1, 1), dtype=h5py.ref_dtype)
            refs[0, 0] = target.ref
        else:
            cspline.create_dataset("coeff", data=coeff.T)
        for key, value in (("x0", ref.x0), ("z0", ref.z0), ("dz", ref.dz_nm)):
            cspline.create_dataset(key, data=np.array([[value]]))
    with open(v73, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    for other in (load_smap_spline(v5), load_smap_spline(v73)):
        assert torch.equal(other.coeff, ref.coeff)
        assert (other.x0, other.z0, other.dz_nm) == (ref.x0, ref.z0, ref.dz_nm)


def test_config_validation_names_the_key_and_the_file(gauss_calib, tmp_path):
    path, _ = gauss_calib
    with pytest.raises(ValueError, match="spline_calib must be the path"):
        SimConfig(psf="spline")
    with pytest.raises(ValueError, match="missing.mat.*not found"):
        SimConfig(psf="spline", spline_calib=str(tmp_path / "missing.mat"))
    with pytest.raises(ValueError, match="spline_calib is only used by psf 'spline'"):
        SimConfig(psf="astigmatic", spline_calib=str(path))
    with pytest.raises(ValueError, match=f"z_range_nm .*-460, 460.*{path.name}"):
        SimConfig(psf="spline", spline_calib=str(path), z_range_nm=(-500.0, 400.0))
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="junk.mat.*SXY.cspline"):
        SimConfig(psf="spline", spline_calib=str(tmp_path / "junk.mat"), z_range_nm=(0.0, 0.0))
    yaml_path = tmp_path / "smlm.yaml"
    yaml_path.write_text(f"simulation:\n  psf: spline\n  spline_calib: {tmp_path / 'gone.mat'}\n")
    with pytest.raises(ValueError, match=f"{yaml_path}.*gone.mat"):
        load_sim_config(yaml_path)
    cfg = SimConfig(psf="spline", spline_calib=str(path), z_range_nm=(-400.0, 400.0))
    assert SimConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="z range"):
        render(_emitters([[5.0, 5.0, 600.0]], 100.0), 1, cfg)
    assert all(torch.isnan(s).all() for s in psf_sigmas(torch.zeros(2), cfg))


def test_simulation_with_the_spline_psf_is_deterministic(gauss_calib):
    path, _ = gauss_calib
    cfg = SimConfig(img_size=(16, 16), emitter_av=5.0, psf="spline", spline_calib=str(path),
                    z_range_nm=(-400.0, 400.0))
    a = simulate_movie(cfg, 4, torch.Generator().manual_seed(11))
    b = simulate_movie(cfg, 4, torch.Generator().manual_seed(11))
    assert a.frames.shape == (4, 16, 16) and torch.isfinite(a.frames).all() and len(a.emitters) > 0
    assert torch.equal(a.frames, b.frames)
    for field in dataclasses.fields(Emitters):
        assert torch.equal(getattr(a.emitters, field.name), getattr(b.emitters, field.name))
    expected = render(a.emitters, 4, cfg)
    assert expected.dtype == torch.float32 and expected.sum() > 0
    item, again = SMLMSimDataset(cfg, 2, seed=1)[1], SMLMSimDataset(cfg, 2, seed=1)[1]
    assert all(torch.equal(item[k], again[k]) for k in item)
