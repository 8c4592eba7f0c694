"""The engine-facing DIO call: two arrays on one grid in, a transformation per representation out.

:func:`register_arrays` takes a fixed and a moving 3-D array **already on the same voxel grid**
(the engine resamples the affinely pre-aligned moving image onto the fixed grid), brain-masked,
of any intensity scale, any shape and (``spacing_mm``) any voxel size. It

1. normalises each image's intensities (the 0.5 and 99.5 percentiles of the voxels above the
   image minimum to [0, 1], clipped; :func:`keyprep.pipeline.keymorph.network.robust_normalise`);
2. resamples both onto the **working grid**: isotropic voxels of the network's ``res_mm``
   (2 mm for the shipped model) covering the input's field of view from the same corner, the
   size rounded up to a multiple of the network's divisor (the extra voxels are background);
   going to a coarser grid is anti-aliased. An input already at ``res_mm`` with sizes divisible
   by the divisor is used as it is;
3. computes the multi-scale features of each image **once**;
4. runs the inner solver (:mod:`.solver`) for every requested representation on those same
   features, and maps each result back onto the input grid.

Displacement convention (every ``disp_*`` returned)
---------------------------------------------------
``disp_fwd`` is a ``float32`` array ``(3, X, Y, Z)`` on the input grid, in **voxels of that
grid**, component ``a`` along array axis ``a``. For every voxel ``x`` (integer index vector),
``moving`` sampled at the continuous voxel position ``x + disp_fwd[:, x]`` matches ``fixed``
at ``x``: the warped moving image is ``moving(x + disp_fwd(x))`` (a pull-back, as
``scipy.ndimage.map_coordinates(moving, grid + disp_fwd)``). ``disp_inv`` is the inverse map
in the same units, ``fixed`` sampled at ``y + disp_inv(y)`` matches ``moving`` at ``y``, given
exactly for ``'diffeo'`` (``exp(-v)`` of the stationary velocity ``v``) and ``'affine'`` (the
inverse matrix), and for ``'ffd'`` by fixed-point inversion of the displacement on the working
grid (:func:`.solver.invert_displacement`; its convergence and residual in ``'inverse'``).
``affine_vox`` (``'affine'`` only) is the 4x4 matrix of input-grid voxel coordinates with
``moving voxel = affine_vox @ [x, 1]`` (so ``disp_fwd(x) = affine_vox @ [x, 1] - x``).
Physical units: multiply component ``a`` by ``spacing_mm[a]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..synth.generator import gaussian_blur, identity_grid
from .network import DioFeatureNet, load_dio
from .solver import (
    REPRESENTATIONS, SolverConfig, affine_to_voxel_matrix, integrate_velocity,
    invert_displacement, principal_channels, sample, solve, upsample_field, with_iterations,
)

__all__ = ['DEFAULT_SOLVER', 'register_arrays', 'normalise_intensity', 'intensity_features',
           'working_shape', 'to_working', 'field_to_input', 'warp_array', 'label_pyramids']


#: The solver settings of a registration (every representation of the engines, and the
#: trainer's validation): the four principal components of each scale's features (on
#: held-out brains 99.9 % of the variance at full resolution, 98.5-99.7 % at 1/4 and 1/2)
#: and, for ``'diffeo'``, the velocity's gradient taken at the displacement. On 4 held-out
#: pairs (``benchmarks/results/dio-solver/``) this gave dioDiffeo the same T1->T1 Dice as
#: every channel and the exact gradient (0.6726 vs 0.6723) and 1.7 points more T2->T1, in
#: 2.4x less time. The velocity keeps its 1-voxel smoothing: 0.5 raised dioDiffeo's Dice
#: (held-out synthetic pairs, the real head) by making the warp irregular (real head: std of
#: log J 0.29 -> 0.67, over keyprep's QC limit of 0.5; antsSyN 0.20), not by aligning
#: better (``benchmarks/results/dio-svf-smoothing/``). The gradient is smoothed at 2 voxels
#: (4 mm on the 2 mm working grid) instead of 1, chosen with the image term on (weight 4,
#: labels off for one contrast): real ``field`` pair AAL Dice 93.9 / 94.4 / 94.7 at 1 / 2 / 3
#: voxels (antsSyN 94.2), four held-out synthetic 1 mm pairs 77.4, 76.1, 75.25, 73.8 at 1,
#: 77.4, 75.7, 74.9, 73.7 at 2 and 76.2, 74.4, 73.85, 72.5 at 3
#: (``benchmarks/results/dio-auto-labels/explore/``). The trainer's inner solves keep
#: :class:`SolverConfig`'s exact defaults.
DEFAULT_SOLVER = SolverConfig(svf_gradient='displacement', channels=4, sigma_grad=2.0)


def normalise_intensity(x: torch.Tensor) -> torch.Tensor:
    """The 0.5/99.5 percentiles of the voxels above the minimum -> [0, 1], clipped (the
    minimum and maximum when those percentiles coincide, e.g. a binary image)."""
    from ..keymorph.network import apply_window, intensity_window

    x = x.float()
    lo, hi = intensity_window(x)
    if hi - lo <= 1e-6 * max(float(x.max() - x.min()), 1e-12):
        lo, hi = float(x.min()), float(x.max())
    return apply_window(x, (lo, hi))


def intensity_features(x: torch.Tensor, scales: Sequence[int] = (4, 2, 1)) -> list[torch.Tensor]:
    """The image itself as a one-channel 'feature' at each scale (average-pooled): the
    classical intensity registration DIO replaces (baseline of the tests)."""
    return [F.avg_pool3d(x, s) if s > 1 else x for s in scales]


def working_shape(shape: Sequence[int], spacing: Sequence[float], res_mm: float,
                  divisor: int) -> tuple[int, int, int]:
    """Voxels of the working grid: the field of view at ``res_mm``, rounded up to a multiple
    of ``divisor``."""
    out = []
    for n, sp in zip(shape, spacing):
        m = max(1, math.ceil(n * sp / res_mm - 1e-6))
        out.append(int(math.ceil(m / divisor) * divisor))
    return tuple(out)


def _coords(out_shape, src_spacing, dst_spacing, device, dtype) -> torch.Tensor:
    """Source-grid voxel coordinates ``[1, 3, *out_shape]`` of the centres of a grid of
    ``dst_spacing`` voxels sharing the source grid's corner."""
    base = identity_grid(out_shape, device, dtype)
    ratio = torch.tensor([d / s for d, s in zip(dst_spacing, src_spacing)], device=device,
                         dtype=dtype).view(3, 1, 1, 1)
    return ((base + 0.5) * ratio - 0.5)[None]


def to_working(img: torch.Tensor, spacing: Sequence[float], res_mm: float,
               shape: Sequence[int]) -> torch.Tensor:
    """``img [1, 1, *input]`` resampled (trilinear, zero outside) onto the working grid
    ``shape`` of ``res_mm`` voxels; identity when the grids coincide."""
    if tuple(img.shape[2:]) == tuple(shape) and all(abs(s - res_mm) < 1e-6 for s in spacing):
        return img
    factors = [res_mm / s for s in spacing]
    if any(f > 2.0 for f in factors):  # trilinear at half-voxel offsets already averages 2
        img = gaussian_blur(img, [0.42 * f if f > 2.0 else 0.0 for f in factors])
    coords = _coords(shape, spacing, (res_mm,) * 3, img.device, img.dtype)
    return sample(img, coords, padding_mode='zeros')


def field_to_input(disp: torch.Tensor, res_mm: float, spacing: Sequence[float],
                   shape: Sequence[int]) -> torch.Tensor:
    """A working-grid displacement ``[1, 3, *working]`` (working voxels) as a displacement on
    the input grid (``shape``, ``spacing``) in input voxels ``[3, *shape]``."""
    sp = torch.tensor(list(spacing), device=disp.device, dtype=disp.dtype).view(3, 1, 1, 1)
    same = tuple(disp.shape[2:]) == tuple(shape) and all(abs(s - res_mm) < 1e-6 for s in spacing)
    if not same:
        coords = _coords(shape, (res_mm,) * 3, spacing, disp.device, disp.dtype)
        disp = sample(disp, coords, padding_mode='border')
    return disp[0] * res_mm / sp


def warp_array(moving: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """``moving(x + disp(x))`` (module convention) with scipy; ``order=0`` for labels."""
    from scipy.ndimage import map_coordinates

    grid = np.indices(moving.shape, dtype=np.float64)
    return map_coordinates(moving, grid + disp, order=order, mode='nearest')


def label_pyramids(fixed_labels: np.ndarray, moving_labels: np.ndarray,
                   spacing: Sequence[float], res_mm: float, work: Sequence[int],
                   scales: Sequence[int], device) -> tuple[list, list, int]:
    """The label-fidelity channels of a prompted solve: for every structure labelled in both
    maps (label 0 is background), the fraction of each voxel it covers, resampled onto the
    working grid (anti-aliased like the images) and average-pooled to every scale. Returns
    the fixed and moving pyramids (``[1, K, *grid_s]``, coarsest first) and ``K``."""
    fixed_labels = np.asarray(fixed_labels)
    moving_labels = np.asarray(moving_labels)
    if fixed_labels.shape != moving_labels.shape:
        raise ValueError(f'label maps {fixed_labels.shape} and {moving_labels.shape} must be '
                         'on one grid')
    fixed_labels = np.rint(fixed_labels).astype(np.int64)
    moving_labels = np.rint(moving_labels).astype(np.int64)
    ids = sorted((set(np.unique(fixed_labels).tolist()) & set(np.unique(moving_labels).tolist()))
                 - {0})
    out = []
    for arr in (fixed_labels, moving_labels):
        lab = torch.as_tensor(np.ascontiguousarray(arr), device=device)
        chans = [to_working((lab == k).float()[None, None], spacing, res_mm, work)
                 for k in ids]
        full = torch.cat(chans, 1) if chans else torch.zeros(1, 0, *work, device=device)
        out.append([F.avg_pool3d(full, s) if s > 1 else full for s in scales])
    return out[0], out[1], len(ids)


def _energy(x: torch.Tensor) -> float:
    """Mean squared deviation from the channel means, summed over channels, per voxel."""
    flat = x.reshape(x.shape[1], -1)
    return float((flat - flat.mean(1, keepdim=True)).square().sum(0).mean())


def _resolve_model(model_or_weights, device):
    """(feature function, scales, res_mm or None, divisor, default iterations or None)."""
    if model_or_weights is None or isinstance(model_or_weights, (str, Path)):
        model_or_weights = load_dio(model_or_weights, device)
    if isinstance(model_or_weights, DioFeatureNet):
        model = model_or_weights.to(device)
        cfg = model.config
        return model, cfg.scales, cfg.res_mm, cfg.divisor, cfg.iterations
    if callable(model_or_weights):
        fn: Callable = model_or_weights
        scales = tuple(getattr(fn, 'scales', (4, 2, 1)))
        return fn, scales, getattr(fn, 'res_mm', None), max(scales), None
    raise TypeError('model_or_weights must be a DioFeatureNet, a weights path, None (the '
                    'shipped weights) or a feature function')


def register_arrays(fixed: np.ndarray, moving: np.ndarray, model_or_weights=None, *,
                    representations: Sequence[str] = ('ffd', 'diffeo', 'affine'),
                    device: str | torch.device = 'cpu', seed: int = 0,
                    iterations: int | Sequence[int] | None = None,
                    spacing_mm: Sequence[float] | None = None,
                    solver: SolverConfig | None = None, res_mm: float | None = None,
                    labels: tuple[np.ndarray, np.ndarray] | None = None,
                    label_weight: float = 0.0, prompt_channels: int = 6,
                    image_weight: float = 0.0, image_window: int = 5) -> dict:
    """Register ``moving`` to ``fixed`` (3-D arrays on one grid) with DIO; see the module
    docstring for the conventions.

    ``model_or_weights``: a :class:`~.network.DioFeatureNet`, a weights path, ``None`` (the
    shipped weights) or a function image ``[1, 1, *grid]`` -> list of feature maps (coarsest
    first; its ``scales`` and ``res_mm`` attributes are used when present). ``iterations``:
    solver iterations per level (an int: every level); default the model's. ``spacing_mm``:
    voxel size of the grid (default 1 mm). ``solver``: solver settings (default
    :data:`DEFAULT_SOLVER`); ``res_mm``: override the working resolution.

    Label prompting (``paper_dio.md``: the inner loss ``MSE(F_f, F_m o phi) + lambda
    D(S_f, S_m o phi)`` at test time, no retraining): with ``labels`` (fixed and moving
    structure label maps on the input grid) and ``label_weight`` ``lambda > 0``, every
    structure labelled in both maps becomes one more channel of both feature pyramids (its
    voxel fraction, :func:`label_pyramids`), scaled at each scale so that the label channels
    carry ``lambda`` times the energy (variance about the channel means, summed over
    channels) of the fixed image's features: ``lambda = 1`` weighs the two terms alike
    (features without variance count as unit energy). With ``solver.channels`` set, the
    prompted pyramids are reduced together to ``max(solver.channels, prompt_channels)``
    principal components (12 keep 95-97 % of their variance on a held-out T2->T1 pair).
    The default 6, with the image term on: on four held-out T2->T1 pairs at 1 mm (two with
    1x1x5 mm moving images) structure Dice within 0.3 of 12 components (72.7 / 71.0 /
    74.7 / 73.75 against 73.0 / 71.1 / 74.9 / 73.7) and about 8 s less per pair
    (``benchmarks/results/dio-auto-labels/``).

    Image prompting (keyprep's addition): with ``image_weight`` ``mu > 0`` the normalised
    images themselves are registered alongside the features, by the local squared normalised
    cross-correlation in an ``image_window``-voxel box at every scale
    (:func:`.solver.image_loss`; the feature term is made dimensionless by the fixed features'
    energy, so ``mu = 1`` weighs a perfect feature match and a perfect local correlation
    alike). ``mu = 0`` (default) is DIO's feature objective alone.

    Returns ``{rep: {'disp_fwd', 'disp_inv', 'affine_vox' (affine only), 'iterations' (per
    level), 'loss' (final feature MSE per voxel), 'seconds'}, 'timings': {...},
    'label_channels': K, 'kept_variance': [...], 'solver_channels': n}`` (``K`` structures
    prompted, 0 without prompting; per scale, the fraction of the (prompted) features'
    variance kept by the principal components, 1.0 with every channel; ``n`` channels
    registered). ``'loss'`` is measured on the channels registered (projected, and with the
    label channels when prompted).
    """
    t_start = time.perf_counter()
    fixed = np.asarray(fixed)
    moving = np.asarray(moving)
    if fixed.ndim != 3 or fixed.shape != moving.shape:
        raise ValueError(f'fixed {fixed.shape} and moving {moving.shape} must be 3-D arrays on '
                         'one grid')
    unknown = [r for r in representations if r not in REPRESENTATIONS]
    if unknown:
        raise ValueError(f'unknown representation(s) {unknown}; choose from {REPRESENTATIONS}')
    spacing = tuple(float(s) for s in (spacing_mm if spacing_mm is not None else (1.0,) * 3))
    dev = torch.device(device)
    torch.manual_seed(seed)
    model, scales, model_res, divisor, model_iters = _resolve_model(model_or_weights, dev)
    res = float(res_mm or model_res or min(spacing))
    cfg = solver or DEFAULT_SOLVER
    if iterations is None and model_iters is not None:
        iterations = model_iters
    cfg = with_iterations(cfg, iterations)
    shape_in = fixed.shape
    work = working_shape(shape_in, spacing, res, divisor)
    timings: dict[str, float] = {}
    with torch.inference_mode(False), torch.no_grad():
        t0 = time.perf_counter()
        imgs = []
        for arr in (fixed, moving):
            x = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32), device=dev)
            x = normalise_intensity(x)[None, None]
            imgs.append(to_working(x, spacing, res, work))
        timings['prepare_s'] = time.perf_counter() - t0
        t0 = time.perf_counter()
        was_training = getattr(model, 'training', False)
        if hasattr(model, 'eval'):
            model.eval()
        try:
            feats_f = [f.float() for f in model(imgs[0])]
            feats_m = [f.float() for f in model(imgs[1])]
        finally:
            if hasattr(model, 'train'):
                model.train(was_training)
        timings['features_s'] = time.perf_counter() - t0
        out: dict = {'label_channels': 0, 'kept_variance': [1.0] * len(feats_f),
                     'solver_channels': feats_f[0].shape[1]}
        channels = cfg.channels
        if labels is not None and label_weight > 0:
            t0 = time.perf_counter()
            lab_f, lab_m, k = label_pyramids(labels[0], labels[1], spacing, res, work, scales,
                                             dev)
            if k:  # per scale, the two terms' energies made equal at label_weight 1
                for i in range(len(feats_f)):
                    e_feat = _energy(feats_f[i]) or 1.0  # features without variance: unit
                    a = math.sqrt(label_weight * e_feat / max(_energy(lab_f[i]), 1e-12))
                    feats_f[i] = torch.cat([feats_f[i], a * lab_f[i]], 1)
                    feats_m[i] = torch.cat([feats_m[i], a * lab_m[i]], 1)
                channels = max(channels, prompt_channels) if channels else 0
            out['label_channels'] = k
            timings['labels_s'] = time.perf_counter() - t0
        if channels > 0:  # principal components of each scale's (prompted) features
            t0 = time.perf_counter()
            reduced = [principal_channels(f, m, channels) for f, m in zip(feats_f, feats_m)]
            feats_f, feats_m, kept = (list(x) for x in zip(*reduced))
            out['kept_variance'] = [round(v, 6) for v in kept]
            out['solver_channels'] = feats_f[0].shape[1]
            timings['channels_s'] = time.perf_counter() - t0
        cfg = replace(cfg, channels=0)
        images = None
        if image_weight > 0:
            images = tuple(intensity_features(x, scales) for x in imgs)
        out['image_weight'] = float(image_weight)
        out['image_window'] = int(image_window)
        for rep in representations:
            t0 = time.perf_counter()
            result = solve(feats_f, feats_m, rep, cfg, tuple(scales), res, images=images,
                           image_weight=image_weight, image_window=image_window)
            entry = _to_input(rep, result, work, res, spacing, shape_in)
            entry['iterations'] = result.iterations
            entry['loss'] = result.final.loss
            entry['seconds'] = time.perf_counter() - t0
            timings[f'{rep}_s'] = entry['seconds']
            out[rep] = entry
    timings['total_s'] = time.perf_counter() - t_start
    out['timings'] = timings
    return out


def _to_input(rep: str, result, work, res: float, spacing, shape_in) -> dict:
    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().astype(np.float32)

    if rep == 'affine':
        mw = affine_to_voxel_matrix(result.final.field, work, res)
        s = torch.eye(4, dtype=torch.float64)  # input voxel -> working voxel
        for a in range(3):
            s[a, a] = spacing[a] / res
            s[a, 3] = 0.5 * spacing[a] / res - 0.5
        mat = torch.linalg.inv(s) @ mw @ s
        grid = identity_grid(shape_in, 'cpu', torch.float64).reshape(3, -1)
        fwd = (mat[:3, :3] @ grid + mat[:3, 3:] - grid).reshape(3, *shape_in)
        inv_mat = torch.linalg.inv(mat)
        inv = (inv_mat[:3, :3] @ grid + inv_mat[:3, 3:] - grid).reshape(3, *shape_in)
        return {'disp_fwd': np32(fwd), 'disp_inv': np32(inv), 'affine_vox': mat.numpy()}
    field = result.final.field  # on the working grid, or a coarser one (last scale, control)
    if rep == 'ffd':  # inverted on the working grid, where the solver's field lives
        fwd = upsample_field(field, work)
        inv, info = invert_displacement(fwd)
        return {'disp_fwd': np32(field_to_input(fwd, res, spacing, shape_in)),
                'disp_inv': np32(field_to_input(inv, res, spacing, shape_in)),
                'inverse': info}
    # integrated on the solver's own grid (as the solver did), then upsampled
    fwd = upsample_field(integrate_velocity(field), work)
    inv = upsample_field(integrate_velocity(-field), work)
    return {'disp_fwd': np32(field_to_input(fwd, res, spacing, shape_in)),
            'disp_inv': np32(field_to_input(inv, res, spacing, shape_in))}
