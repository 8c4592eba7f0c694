"""A keypoint-mean template of a group of brains (``--target groupwise``).

1. The keypoints of every brain are detected (one forward pass each).
2. The keypoint clouds are aligned to a common frame by generalised Procrustes analysis
   (Gower 1975) with KeyMorph's closed forms: each cloud is fitted to the current mean, the
   mean of the aligned clouds is recomputed, until it stops changing
   (:func:`procrustes_mean`). The freedom such an iteration leaves (the gauge) is fixed so
   that the template lives in the first brain's world space and pose, at the group's average
   size, and, for affine fits, with maps from the brains that average to the identity.
3. The template image is the mean of the brains resampled onto an axis-aligned grid of that
   frame through their fitted maps (each brain's intensities divided by its 95th percentile
   inside its brain mask first); the template mask is the voxels inside at least half of the
   resampled masks (:func:`build_template`).

Nothing here runs Nipype; :class:`keyprep.interfaces.groupwise.GroupwiseTemplate` wraps it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ['GroupwiseTemplate', 'ProcrustesResult', 'build_template', 'procrustes_mean']


@dataclass
class ProcrustesResult:
    """Output of :func:`procrustes_mean`.

    Attributes
    ----------
    mean
        ``[N, 3]`` mean keypoint cloud (mm, template frame).
    transforms
        ``[S, 3, 4]`` maps from each brain's world mm to the template frame.
    residual_mm
        ``[S]`` mean distance between each aligned cloud and the mean.
    iterations
        Iterations run; ``converged``: whether the mean moved less than ``tol_mm``.
    """

    mean: np.ndarray
    transforms: np.ndarray
    residual_mm: np.ndarray
    iterations: int
    converged: bool


def _rms_size(points: np.ndarray) -> float:
    c = points - points.mean(0)
    return float(np.sqrt((c ** 2).sum(1).mean()))


def procrustes_mean(points, weights=None, kind: str = 'affine', n_iter: int = 30,
                    tol_mm: float = 1e-3) -> ProcrustesResult:
    """Generalised Procrustes mean of ``points [S, N, 3]`` (mm) with rigid or affine fits.

    ``weights [N]`` (optional) weigh the keypoints in every fit. Rigid stage: each cloud is
    fitted rigidly to the current mean; the new mean (the average of the aligned clouds) is
    scaled about its centroid to the clouds' average RMS size and rigidly aligned to the
    first cloud. Affine stage (``kind='affine'``), in that common pose: each cloud is fitted
    affinely to the mean, and the new mean is the average of the aligned clouds mapped by the
    inverse of the average of the affine maps, so that the maps average to the identity (the
    template sits in the middle of the group, not at one brain's size or shear). With one
    cloud the mean is that cloud and its map the identity.
    """
    import torch

    from .aligners import affine_inverse, apply_affine, fit_affine, fit_rigid

    if kind not in ('rigid', 'affine'):
        raise ValueError(f"kind must be 'rigid' or 'affine', not {kind!r}")
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 3 or pts.shape[-1] != 3 or pts.shape[1] < 4:
        raise ValueError(f'points must be [S, N >= 4, 3], not {pts.shape}')
    n_sub = pts.shape[0]
    p = torch.as_tensor(pts, dtype=torch.float64)
    w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=float)
                                                     ).expand(n_sub, pts.shape[1])
    size = float(np.mean([_rms_size(c) for c in pts]))
    ref = p[0]
    mean = ref.clone()
    converged, iterations = False, 0
    for _ in range(n_iter):
        iterations += 1
        new = apply_affine(fit_rigid(p, mean.expand_as(p), w), p).mean(0)
        centre = new.mean(0, keepdim=True)
        new = centre + (new - centre) * (size / max(_rms_size(new.numpy()), 1e-9))
        new = apply_affine(fit_rigid(new, ref, None if w is None else w[0]), new)
        moved = float(torch.linalg.vector_norm(new - mean, dim=1).max())
        mean = new
        if moved < tol_mm:
            converged = True
            break
    fit = fit_rigid
    if kind == 'affine':
        fit = fit_affine
        converged = False
        # in the common pose, where averaging the maps' matrices is meaningful
        posed = apply_affine(fit_rigid(p, mean.expand_as(p), w), p)
        for _ in range(n_iter):
            iterations += 1
            mats = fit_affine(posed, mean.expand_as(p), w)
            new = apply_affine(affine_inverse(mats.mean(0)), apply_affine(mats, posed).mean(0))
            moved = float(torch.linalg.vector_norm(new - mean, dim=1).max())
            mean = new
            if moved < tol_mm:
                converged = True
                break
    mats = fit(p, mean.expand_as(p), w)
    residual = torch.linalg.vector_norm(apply_affine(mats, p) - mean, dim=-1).mean(-1)
    return ProcrustesResult(mean=mean.numpy(), transforms=mats.numpy(),
                            residual_mm=residual.numpy(), iterations=iterations,
                            converged=converged)


@dataclass
class GroupwiseTemplate:
    """Files written by :func:`build_template` and what they were built from."""

    template: str
    mask: str
    keypoints: str
    report: str
    sources: list[str] = field(default_factory=list)
    procrustes: dict = field(default_factory=dict)


def _load(path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nb

    img = nb.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    return np.nan_to_num(data), np.asarray(img.affine, dtype=float)


def _sample(data: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int) -> np.ndarray:
    """``data`` at RAS points ``world [M, 3]`` (zero outside)."""
    from scipy import ndimage as ndi

    inv = np.linalg.inv(affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    return ndi.map_coordinates(data, vox.T, order=order, mode='constant', cval=0.0)


def build_template(brains: list, masks: list, out_dir: str | os.PathLike, *,
                   weights: str | os.PathLike | None = None, kind: str = 'affine',
                   resolution: float = 1.0, margin_mm: float = 10.0,
                   device: str = 'cpu') -> GroupwiseTemplate:
    """Build the keypoint-mean template of skull-stripped ``brains`` (and their ``masks``).

    Parameters
    ----------
    brains, masks
        NIfTI files, one brain per participant (any grids).
    out_dir
        Where ``template.nii.gz``, ``template_mask.nii.gz``, ``template_keypoints.tsv`` and
        ``template.json`` (sources, Procrustes iterations and residuals) are written.
    weights
        KeyMorph weights (default: the shipped model).
    kind
        ``'affine'`` or ``'rigid'`` Procrustes fits (the image average uses the same maps).
    resolution
        Voxel size of the template grid (mm).

    Returns
    -------
    :class:`GroupwiseTemplate`.
    """
    import nibabel as nb
    import torch

    from ..io import make_image
    from .keypoints import write_keypoints
    from .network import KeyMorphModel, conform

    if len(brains) != len(masks) or len(brains) < 2:
        raise ValueError('a groupwise template needs at least two brains, each with its mask')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = KeyMorphModel.load(weights, torch.device(device))
    clouds, kweights = [], []
    for brain, mask in zip(brains, masks):
        det = model.detect_conformed(conform(nb.load(str(brain)), model.cfg,
                                             nb.load(str(mask)), model.device))
        clouds.append(det['points_mm'])
        kweights.append(det['weights'])
    clouds = np.stack(clouds)
    mean_w = np.mean(kweights, axis=0)
    weighted = model.cfg.weighted != 'none'
    gpa = procrustes_mean(clouds, mean_w if weighted else None, kind=kind)

    # template grid: every brain's mask mapped into the template frame, plus a margin
    corners = []
    for mask, mat in zip(masks, gpa.transforms):
        m, aff = _load(mask)
        idx = np.argwhere(m > 0)
        if idx.size == 0:
            raise ValueError(f'empty brain mask: {mask}')
        box = np.array([[a, b, c] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max())
                        for c in (idx[:, 2].min(), idx[:, 2].max())], dtype=float)
        world = box @ aff[:3, :3].T + aff[:3, 3]
        corners.append(world @ mat[:, :3].T + mat[:, 3])
    corners = np.concatenate(corners)
    lo, hi = corners.min(0) - margin_mm, corners.max(0) + margin_mm
    shape = tuple(int(v) for v in np.ceil((hi - lo) / resolution).astype(int) + 1)
    gaff = np.diag([resolution] * 3 + [1.0])
    gaff[:3, 3] = lo
    n_vox = int(np.prod(shape))
    total = np.zeros(n_vox, dtype=np.float64)
    inside = np.zeros(n_vox, dtype=np.float64)
    chunk = 1 << 20
    for brain, mask, mat in zip(brains, masks, gpa.transforms):
        full = np.vstack([mat, [0, 0, 0, 1]])
        back = np.linalg.inv(full) @ gaff  # template voxel -> this brain's mm
        data, aff = _load(brain)
        m, maff = _load(mask)
        scale = np.percentile(data[m > 0] if (m.shape == data.shape and (m > 0).any())
                              else data[data > 0], 95)
        data = data / max(float(scale), 1e-6)
        mfloat = (m > 0).astype(np.float32)
        for start in range(0, n_vox, chunk):
            ijk = np.stack(np.unravel_index(np.arange(start, min(start + chunk, n_vox)), shape),
                           1).astype(float)
            y = ijk @ back[:3, :3].T + back[:3, 3]
            total[start:start + len(y)] += _sample(data, aff, y, 1)
            inside[start:start + len(y)] += _sample(mfloat, maff, y, 1)
    n = len(brains)
    tpl = (total / n).reshape(shape).astype(np.float32)
    tmask = (inside / n >= 0.5).reshape(shape)
    tpl = np.where(tmask, tpl, 0).astype(np.float32)
    tpl_path = out / 'template.nii.gz'
    mask_path = out / 'template_mask.nii.gz'
    make_image(tpl, gaff).to_filename(str(tpl_path))
    make_image(tmask.astype(np.uint8), gaff).to_filename(str(mask_path))
    kp_path = write_keypoints(out / 'template_keypoints.tsv', gpa.mean, mean_w)
    info = {
        'Description': 'keyprep groupwise template: mean of the brains on the generalised '
                       f'Procrustes ({kind}) mean of their KeyMorph keypoints',
        'Sources': [str(b) for b in brains],
        'ProcrustesKind': kind,
        'ProcrustesIterations': gpa.iterations,
        'ProcrustesConverged': gpa.converged,
        'KeypointResidualMm': [round(float(r), 4) for r in gpa.residual_mm],
        'NumberOfKeypoints': int(gpa.mean.shape[0]),
        'ResolutionMm': float(resolution),
        'ModelSha256': model.sha256,
        'SubjectToTemplate': [np.round(t, 6).tolist() for t in gpa.transforms],
    }
    report = out / 'template.json'
    report.write_text(json.dumps(info, indent=2) + '\n')
    res = GroupwiseTemplate(template=str(tpl_path), mask=str(mask_path), keypoints=str(kp_path),
                            report=str(report), sources=[str(b) for b in brains])
    res.procrustes = {k: v for k, v in info.items() if k not in ('Sources', 'Description')}
    return res


def template_summary(result: GroupwiseTemplate) -> dict:
    """The result as a JSON-serialisable dict."""
    return asdict(result)
