"""Inverting displacement fields, and measuring how well two fields invert each other.

A deformable engine should return its own inverse (ANTs SyN and the diffeomorphic engines
have one by construction). One that does not gets one here: the fixed-point inversion of
its displacement field (Chen et al. 2008, "A simple fixed-point approach to invert a
deformation field"), as ITK's ``InvertDisplacementFieldImageFilter`` does. For the mapping
``x -> x + u(x)`` on a grid, the inverse ``y -> y + v(y)`` on the same grid satisfies
``v(y) = -u(y + v(y))``; iterating this from ``v = 0`` converges where the mapping is a
contraction-friendly diffeomorphism (``|grad u| < 1``), which is the case of any smooth
registration field that does not fold. Where it folds there is no inverse; the residual
left says so, and is recorded.

The inverse-consistency error of a pair (forward field on the fixed grid, inverse on the
moving grid) is ``|u(x) + v(x + u(x))|``: the distance between ``x`` and its round trip.

All fields here are RAS displacements in mm, ``(X, Y, Z, 3)``, with the voxel-to-RAS
affine of their grid (:func:`keyprep.pipeline.transforms.read_displacement_field`).
Sampling is trilinear; outside its grid a field takes the value of its border.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ['invert_displacement', 'invert_field_file', 'inverse_consistency', 'sample_field']


def _grid_points(shape, affine) -> np.ndarray:
    """RAS mm coordinates of the voxel centres of a grid, ``shape + (3,)``."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape[:3]],
                               indexing='ij'), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def sample_field(u_ras: np.ndarray, affine: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    """The field ``u`` (on the grid of ``affine``) at RAS points ``(..., 3)``, trilinear,
    clamped to the border outside the grid."""
    import torch
    import torch.nn.functional as F

    shape = u_ras.shape[:3]
    inv = np.linalg.inv(affine)
    ijk = points_ras @ inv[:3, :3].T + inv[:3, 3]
    # grid_sample's normalised coordinates (align_corners=True), last axis ordered (W, H, D)
    norm = np.stack([2.0 * ijk[..., a] / max(shape[a] - 1, 1) - 1.0 for a in (2, 1, 0)], -1)
    field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u_ras, -1, 0),
                                                  dtype=np.float32))[None]
    grid = torch.from_numpy(norm.reshape(1, -1, 1, 1, 3).astype(np.float32))
    with torch.no_grad():
        out = F.grid_sample(field, grid, mode='bilinear', padding_mode='border',
                            align_corners=True)
    return out[0, :, :, 0, 0].T.numpy().astype(np.float64).reshape(points_ras.shape)


def invert_displacement(u_ras: np.ndarray, affine: np.ndarray, *, iterations: int = 50,
                        tol_mm: float = 1e-3) -> tuple[np.ndarray, dict]:
    """Fixed-point inverse ``v`` of the field ``u`` (both on the grid of ``affine``).

    Iterates ``v <- -u(y + v)`` until the largest update is below ``tol_mm`` or after
    ``iterations`` steps. Returns ``v`` (float32) and ``{'iterations', 'converged',
    'residual_mean_mm', 'residual_max_mm'}``, the residual being ``|v(y) + u(y + v(y))|``
    over the grid.
    """
    u_ras = np.asarray(u_ras, dtype=np.float64)
    y = _grid_points(u_ras.shape, affine)
    v = np.zeros_like(u_ras)
    converged, step = False, 0
    for step in range(1, int(iterations) + 1):
        new = -sample_field(u_ras, affine, y + v)
        change = float(np.max(np.linalg.norm(new - v, axis=-1))) if v.size else 0.0
        v = new
        if change < tol_mm:
            converged = True
            break
    residual = np.linalg.norm(v + sample_field(u_ras, affine, y + v), axis=-1)
    info = {'method': 'fixed-point inversion of the forward displacement field',
            'iterations': step, 'converged': converged,
            'residual_mean_mm': round(float(residual.mean()), 5) if residual.size else 0.0,
            'residual_max_mm': round(float(residual.max()), 5) if residual.size else 0.0}
    return v.astype(np.float32), info


def invert_field_file(path: str | Path, out_path: str | Path, **kwargs) -> dict:
    """Invert the ITK displacement field in ``path`` on its own grid; write it to
    ``out_path`` (same format); return :func:`invert_displacement`'s information."""
    from .transforms import read_displacement_field, write_itk_displacement_field

    u, affine = read_displacement_field(path)
    v, info = invert_displacement(u, affine, **kwargs)
    write_itk_displacement_field(v, affine, out_path)
    return info


def inverse_consistency(fwd_field: str | Path, inv_field: str | Path,
                        mask: str | Path | None = None) -> dict:
    """Round-trip error of a forward field (on the fixed grid) and its inverse (on the
    moving grid), in mm: ``|u(x) + v(x + u(x))|`` at the fixed grid's voxels (inside
    ``mask``, a fixed-grid image, when given). Returns ``{'mean_mm', 'p99_mm', 'max_mm'}``.
    """
    import nibabel as nb

    from .transforms import read_displacement_field

    u, aff_u = read_displacement_field(fwd_field)
    v, aff_v = read_displacement_field(inv_field)
    x = _grid_points(u.shape, aff_u)
    err = np.linalg.norm(u + sample_field(v, aff_v, x + u), axis=-1)
    if mask is not None:
        m = np.asanyarray(nb.load(str(mask)).dataobj).reshape(err.shape) > 0
        if m.any():
            err = err[m]
    err = err.ravel()
    if not err.size:
        return {'mean_mm': float('nan'), 'p99_mm': float('nan'), 'max_mm': float('nan')}
    return {'mean_mm': round(float(err.mean()), 4),
            'p99_mm': round(float(np.percentile(err, 99)), 4),
            'max_mm': round(float(err.max()), 4)}
