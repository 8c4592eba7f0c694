"""Closed-form keypoint aligners: weighted rigid, affine and thin-plate spline (TPS) fits.

Everything is batched (points ``[B, N, 3]``; an unbatched ``[N, 3]`` is accepted and the batch
dimension dropped again where the result has one), differentiable with autograd and
device-agnostic. The small solves run in float64; results come back in the input dtype.

Conventions
-----------
* Points are world RAS millimetres. A registration maps FIXED points to MOVING points,
  ``T: fixed mm -> moving mm`` (KeyMorph's convention): fit with ``src`` = fixed keypoints and
  ``dst`` = moving keypoints, evaluate ``T`` on the fixed grid and sample the moving image there.
  This is also what ``ants.apply_transforms(fixed, moving, [file])`` does with a file written by
  :func:`write_itk_affine` / :func:`write_itk_displacement_field` (which convert to ITK's LPS).
* An affine is a ``[..., 3, 4]`` matrix ``[A | t]`` with ``T(x) = A x + t``.
* A displacement field holds ``u(x) = T(x) - x`` in mm at the voxel centres of a grid given by
  its shape and voxel-to-RAS affine.

Thin-plate spline
-----------------
``T(x) = a_0 + a^T x' + sum_i w_i U(|x' - c_i|)`` where ``x' = (x - o) / scale_mm`` and
``c_i`` are the normalised source keypoints. Coefficients solve, for every ``lambda``::

    [ K + lambda D   P ] [ W ]   [ dst ]
    [ P^T            0 ] [ a ] = [  0  ]      K_ij = U(|c_i - c_j|),  P_i = (c_i, 1)

* Units of ``lambda``: with the default ``scale_mm = 128`` the keypoints live in the frame of
  the paper, whose ``[-1, 1]`` image cube spans a 256 mm field of view, so lambda in
  ``{0, 0.01, 0.1, 1, 10}`` means what it means there, whatever the voxel size of the images.
  (``K`` changes non-trivially with the length unit for ``U(r) = r^2 log r``, so lambda is tied
  to this frame; the RHS is linear in ``dst``, so the output unit, mm, does not matter, and the
  origin ``o``, the keypoint centroid, does not change the map at all.)
* ``lambda = 0`` interpolates the keypoints; ``lambda -> inf`` tends to the (weighted) affine
  least-squares fit (zero bending energy).
* ``D = diag(1 / w)`` with per-keypoint weights ``w`` normalised to mean 1 (``D = I`` without
  weights): the fit minimises ``sum_i w_i |T(c_i) - dst_i|^2 + lambda * bending``, so a
  low-weight keypoint is followed less. Weights have no effect at ``lambda = 0``, where every
  keypoint is interpolated; weights are clamped at ``min_weight`` so that ``D`` stays finite.
* Kernels: ``'r2logr'`` (``U = r^2 log r``, the paper's choice, the 2-D biharmonic kernel) and
  ``'r'`` (``U = -r``, the 3-D biharmonic kernel; the sign makes ``K`` conditionally positive
  definite so that ``K + lambda D`` is the regularised problem).
* One solve of the ``(N + 4)^2`` system per lambda (the lambdas are a batch dimension), and
  :meth:`TPSFit.evaluate` computes the lambda-independent kernel block ``U(|x - c_i|)`` once per
  chunk of points and applies every lambda's coefficients to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# the ITK writers (``write_itk_*``, re-exported from :mod:`keyprep.pipeline.transforms`) are
# imported on first use: transforms needs nibabel, which training on a bare machine lacks

__all__ = [
    'InverseField',
    'TPSFit',
    'affine_inverse',
    'apply_affine',
    'compose',
    'displacement_grid',
    'fit_affine',
    'fit_rigid',
    'fit_tps',
    'grid_world_points',
    'homogeneous',
    'invert_displacement',
    'tps_displacement_grid',
    'write_itk_affine',
    'write_itk_displacement',
    'write_itk_displacement_field',
]

Tensor = torch.Tensor

#: Points per chunk: the kernel block is chunk x N (2 MB at N = 128 in fp32, cache-friendly).
DEFAULT_CHUNK = 4096
KERNELS = ('r2logr', 'r')

#: ``write_itk_displacement``: the ITK displacement-field writer under the name used in the
#: design notes.
_FROM_TRANSFORMS = {'write_itk_affine': 'write_itk_affine',
                    'write_itk_displacement_field': 'write_itk_displacement_field',
                    'write_itk_displacement': 'write_itk_displacement_field'}


def __getattr__(name: str):
    """The ITK writers of :mod:`keyprep.pipeline.transforms`, imported on first use."""
    if name in _FROM_TRANSFORMS:
        from .. import transforms

        value = getattr(transforms, _FROM_TRANSFORMS[name])
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def _batched(points: Tensor, name: str) -> tuple[Tensor, bool]:
    """``[B, N, 3]`` (and whether a batch dimension was added to an ``[N, 3]`` input)."""
    if points.dim() == 2:
        points = points.unsqueeze(0)
        added = True
    elif points.dim() == 3:
        added = False
    else:
        raise ValueError(f'{name} must be [N, 3] or [B, N, 3], not {tuple(points.shape)}')
    if points.shape[-1] != 3:
        raise ValueError(f'{name} must have 3 coordinates, not {points.shape[-1]}')
    return points, added


def _pair(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, bool]:
    s, added = _batched(src, 'src')
    d, _ = _batched(dst, 'dst')
    if s.shape != d.shape:
        raise ValueError(f'src {tuple(s.shape)} and dst {tuple(d.shape)} differ')
    return s, d, added


def _weights(weights: Tensor | None, like: Tensor) -> Tensor:
    """``[B, N, 1]`` float64 weights summing to 1 over the keypoints."""
    b, n = like.shape[:2]
    if weights is None:
        return torch.full((b, n, 1), 1.0 / n, dtype=torch.float64, device=like.device)
    w = weights.to(torch.float64)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    w = w.expand(b, n)
    if bool((w < 0).any()):
        raise ValueError('keypoint weights must be non-negative')
    return (w / w.sum(1, keepdim=True).clamp_min(1e-300)).unsqueeze(-1)


def _as_tensor(x, device=None, dtype=torch.float64) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device if device is not None else x.device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def homogeneous(mat: Tensor) -> Tensor:
    """``[..., 3, 4]`` (or already ``[..., 4, 4]``) -> ``[..., 4, 4]`` homogeneous matrices."""
    if mat.shape[-2:] == (4, 4):
        return mat
    last = torch.zeros(mat.shape[:-2] + (1, 4), dtype=mat.dtype, device=mat.device)
    last[..., 0, 3] = 1.0
    return torch.cat([mat, last], dim=-2)


# --------------------------------------------------------------------------------------
# Rigid and affine
# --------------------------------------------------------------------------------------

def fit_rigid(src: Tensor, dst: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted least-squares rigid map ``dst ~ R src + t`` (Kabsch/Arun, proper rotation).

    Parameters
    ----------
    src, dst
        ``[B, N, 3]`` (or ``[N, 3]``) corresponding points.
    weights
        ``[B, N]`` (or ``[N]``) non-negative weights; uniform if ``None``.

    Returns
    -------
    ``[B, 3, 4]`` (or ``[3, 4]``) matrices ``[R | t]`` with ``det R = +1``: when the best
    orthogonal fit is a reflection, the last singular direction is flipped, which gives the
    best proper rotation. Gradients go through the SVD (undefined where the cross-covariance
    has repeated singular values, e.g. fewer than 3 non-collinear points).
    """
    s, d, added = _pair(src, dst)
    w = _weights(weights, s)
    s64, d64 = s.to(torch.float64), d.to(torch.float64)
    sc = (w * s64).sum(1, keepdim=True)
    dc = (w * d64).sum(1, keepdim=True)
    h = ((s64 - sc) * w).transpose(1, 2) @ (d64 - dc)  # sum_i w_i (s_i - sc)(d_i - dc)^T
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(1, 2)
    sign = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    flip = torch.ones(s.shape[0], 3, dtype=torch.float64, device=s.device)
    flip = torch.cat([flip[:, :2], sign.unsqueeze(1)], dim=1)
    rot = (v * flip.unsqueeze(1)) @ u.transpose(1, 2)
    t = dc.transpose(1, 2) - rot @ sc.transpose(1, 2)
    mat = torch.cat([rot, t], dim=2).to(src.dtype)
    return mat[0] if added else mat


def fit_affine(src: Tensor, dst: Tensor, weights: Tensor | None = None,
               ridge: float = 1e-8) -> Tensor:
    """Weighted least-squares affine map ``dst ~ A src + t``.

    Minimises ``sum_i w_i |A s_i + t - d_i|^2``. The points are centred on their weighted
    centroids, which decouples ``t``, and the 3x3 normal equations are solved with
    :func:`torch.linalg.solve` after adding a Tikhonov term ``ridge * (tr(C) / 3 + 1 mm^2)``
    to the weighted covariance ``C`` of ``src`` (relative to its mean variance, so tiny and
    scale-free; the 1 mm^2 keeps collapsed keypoints solvable). Needs at least 4 non-coplanar
    points with non-zero weight for an exact fit.

    Returns ``[B, 3, 4]`` (or ``[3, 4]``) matrices ``[A | t]`` in the dtype of ``src``.
    """
    s, d, added = _pair(src, dst)
    w = _weights(weights, s)
    s64, d64 = s.to(torch.float64), d.to(torch.float64)
    sc = (w * s64).sum(1, keepdim=True)
    dc = (w * d64).sum(1, keepdim=True)
    xs = s64 - sc
    cov = (xs * w).transpose(1, 2) @ xs
    cross = (xs * w).transpose(1, 2) @ (d64 - dc)
    reg = ridge * (torch.diagonal(cov, dim1=1, dim2=2).sum(-1) / 3.0 + 1.0)
    eye = torch.eye(3, dtype=torch.float64, device=s.device)
    a = torch.linalg.solve(cov + reg[:, None, None] * eye, cross).transpose(1, 2)
    t = dc.transpose(1, 2) - a @ sc.transpose(1, 2)
    mat = torch.cat([a, t], dim=2).to(src.dtype)
    return mat[0] if added else mat


def apply_affine(mat: Tensor, points: Tensor) -> Tensor:
    """``A x + t`` for ``mat [..., 3, 4]`` (or ``[..., 4, 4]``) and ``points [..., M, 3]``
    (broadcast over the leading dimensions)."""
    return points @ mat[..., :3, :3].transpose(-1, -2) + mat[..., :3, 3].unsqueeze(-2)


def affine_inverse(mat: Tensor) -> Tensor:
    """The inverse map ``[A^-1 | -A^-1 t]`` of ``[..., 3, 4]`` affines (computed in float64)."""
    m = mat.to(torch.float64)
    ainv = torch.linalg.inv(m[..., :3, :3])
    t = -(ainv @ m[..., :3, 3:4])
    return torch.cat([ainv, t], dim=-1).to(mat.dtype)


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """The affine ``x -> outer(inner(x))`` as ``[..., 3, 4]``."""
    a = outer[..., :3, :3] @ inner[..., :3, :3]
    t = outer[..., :3, :3] @ inner[..., :3, 3:4] + outer[..., :3, 3:4]
    return torch.cat([a, t], dim=-1)


# --------------------------------------------------------------------------------------
# Thin-plate spline
# --------------------------------------------------------------------------------------

def _sqdist(x: Tensor, c: Tensor) -> Tensor:
    """``[B, M, N]`` squared distances between ``x [B, M, 3]`` and ``c [B, N, 3]``, by direct
    differences (exactly 0 for coincident points, no cancellation; used for the small K)."""
    d2 = (x[..., :, None, 0] - c[..., None, :, 0]) ** 2
    d2 = d2 + (x[..., :, None, 1] - c[..., None, :, 1]) ** 2
    return d2 + (x[..., :, None, 2] - c[..., None, :, 2]) ** 2


#: ``U = factor * raw(d2)`` with ``raw = d2 log d2`` (so that ``U = r^2 log r``) or ``sqrt(d2)``.
_KERNEL_FACTOR = {'r2logr': 0.5, 'r': -1.0}


def _kernel_raw(d2: Tensor, kernel: str) -> Tensor:
    """``d2 log d2`` or ``sqrt(d2)``, zero at coincident points. Under autograd the value at 0
    is selected with a safe input so that the gradient there is 0 (its limit), not NaN;
    without autograd it is computed in place with few passes over the (large) block."""
    if kernel not in _KERNEL_FACTOR:
        raise ValueError(f'unknown TPS kernel {kernel!r}; expected one of {KERNELS}')
    if not (d2.requires_grad and torch.is_grad_enabled()):
        if kernel == 'r':
            return d2.clamp_min_(0.0).sqrt_()
        d2 = d2.clamp_min_(torch.finfo(d2.dtype).tiny)
        return torch.log(d2).mul_(d2)
    pos = d2 > 0
    safe = torch.where(pos, d2, torch.ones_like(d2))
    val = safe * torch.log(safe) if kernel == 'r2logr' else torch.sqrt(safe)
    return torch.where(pos, val, torch.zeros_like(val))


def _kernel(d2: Tensor, kernel: str) -> Tensor:
    """The TPS kernel ``U`` as a function of the squared distance."""
    return _KERNEL_FACTOR.get(kernel, 1.0) * _kernel_raw(d2, kernel)


@dataclass(frozen=True, eq=False)
class TPSFit:
    """Thin-plate splines fitted to one keypoint set for several lambdas (see module notes).

    Attributes
    ----------
    centers
        ``[B, N, 3]`` float64 control points in the normalised frame ``(src - origin) / scale``.
    coef
        ``[B, L, N, 3]`` float64 kernel coefficients (mm).
    affine
        ``[B, L, 4, 3]`` float64 affine part: rows for ``x', y', z'`` and the constant (mm).
    origin
        ``[B, 1, 3]`` float64 centroid of ``src`` (mm).
    lambdas
        The L regularisation weights.
    src, dst, weights
        The fitted keypoints (``[B, N, 3]``) and weights (``[B, N]`` or ``None``).
    """

    centers: Tensor
    coef: Tensor
    affine: Tensor
    origin: Tensor
    lambdas: tuple[float, ...]
    kernel: str
    scale_mm: float
    min_weight: float
    src: Tensor
    dst: Tensor
    weights: Tensor | None

    @property
    def batch_size(self) -> int:
        return int(self.centers.shape[0])

    @property
    def device(self) -> torch.device:
        return self.centers.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the fitted keypoints (that of :meth:`residuals`)."""
        return self.src.dtype

    def select(self, lam_index: int | Sequence[int] | None = None,
               batch_index: int | Sequence[int] | None = None) -> TPSFit:
        """The fit restricted to some lambdas and/or batch elements (dimensions are kept:
        an int index gives L = 1 or B = 1)."""
        lam = list(range(len(self.lambdas))) if lam_index is None else (
            [lam_index] if isinstance(lam_index, int) else list(lam_index))
        bat = list(range(self.batch_size)) if batch_index is None else (
            [batch_index] if isinstance(batch_index, int) else list(batch_index))
        li = torch.as_tensor(lam, device=self.device)
        bi = torch.as_tensor(bat, device=self.device)
        return TPSFit(
            centers=self.centers[bi], coef=self.coef[bi][:, li], affine=self.affine[bi][:, li],
            origin=self.origin[bi], lambdas=tuple(self.lambdas[i] for i in lam),
            kernel=self.kernel, scale_mm=self.scale_mm, min_weight=self.min_weight,
            src=self.src[bi], dst=self.dst[bi],
            weights=None if self.weights is None else self.weights[bi])

    def swapped(self) -> TPSFit:
        """The same lambdas and weights fitted from ``dst`` to ``src`` (an approximate inverse:
        the starting point of :func:`invert_displacement`)."""
        return fit_tps(self.dst, self.src, self.lambdas, self.weights, kernel=self.kernel,
                       scale_mm=self.scale_mm, min_weight=self.min_weight)

    def _flat(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Everything :meth:`_eval_normalised` needs, in ``dtype``, with every lambda's
        coefficients side by side for one matmul: ``-2 c^T [B, 3, N]``, ``|c|^2 [B, 1, N]``,
        ``W [B, N, 3L]`` (times the kernel factor), linear part ``[B, 3, 3L]``, constant
        ``[B, 1, 3L]``."""
        b, n_lam = self.coef.shape[:2]
        n = self.centers.shape[1]
        c = self.centers.to(dtype)
        w = self.coef.to(dtype).permute(0, 2, 1, 3).reshape(b, n, n_lam * 3)
        a = self.affine.to(dtype).permute(0, 2, 1, 3).reshape(b, 4, n_lam * 3)
        return (-2.0 * c.transpose(1, 2), (c * c).sum(-1).unsqueeze(1),
                _KERNEL_FACTOR[self.kernel] * w, a[:, :3], a[:, 3:])

    def _eval_normalised(self, xn: Tensor, flat: tuple[Tensor, ...]) -> Tensor:
        """``[B, m, 3L]`` mapped points (mm) for normalised points ``xn [B or 1, m, 3]``: the
        kernel block is computed once and multiplied by every lambda's coefficients. The
        squared distances use ``|x|^2 + |c|^2 - 2 x.c`` (one matmul; the coordinates are
        O(1) in the normalised frame, so float32 cancellation stays ~1e-7)."""
        ct2, c2, w, lin, const = flat
        b = max(xn.shape[0], ct2.shape[0])
        xb = xn.expand(b, -1, -1)
        d2 = torch.baddbmm((xn * xn).sum(-1, keepdim=True) + c2, xb, ct2.expand(b, -1, -1))
        u = _kernel_raw(d2, self.kernel)
        return torch.baddbmm(const + xb @ lin, u, w.expand(b, -1, -1))

    def evaluate(self, points: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """``T(x)`` for every lambda: ``points [B, M, 3]`` or ``[M, 3]`` in mm (a batch of 1
        on either side is broadcast), -> ``[B, L, M, 3]`` mm, in the dtype of ``points``.
        Differentiable with respect to the points and everything the fit came from."""
        pts = points.unsqueeze(0) if points.dim() == 2 else points
        if pts.dim() != 3 or pts.shape[-1] != 3:
            raise ValueError(f'points must be [M, 3] or [B, M, 3], not {tuple(points.shape)}')
        n_lam = len(self.lambdas)
        b = max(self.batch_size, pts.shape[0])
        dtype = pts.dtype
        flat = self._flat(dtype)
        origin = self.origin.to(dtype)
        outs = []
        for start in range(0, pts.shape[1], chunk):
            xn = (pts[:, start:start + chunk] - origin) / self.scale_mm
            outs.append(self._eval_normalised(xn, flat))
        out = torch.cat(outs, dim=1) if outs else pts.new_zeros(b, 0, 3 * n_lam)
        return out.reshape(b, -1, n_lam, 3).permute(0, 2, 1, 3)

    def residuals(self) -> Tensor:
        """``[B, L, N]`` distances (mm) between ``T(src)`` and ``dst`` for each lambda."""
        mapped = self.evaluate(self.src.to(torch.float64))
        return torch.linalg.vector_norm(mapped - self.dst.to(torch.float64).unsqueeze(1),
                                        dim=-1).to(self.dtype)


def fit_tps(src: Tensor, dst: Tensor, lambdas: Sequence[float] = (0.0,),
            weights: Tensor | None = None, kernel: str = 'r2logr', scale_mm: float = 128.0,
            min_weight: float = 1e-6) -> TPSFit:
    """Fit thin-plate splines ``src -> dst`` for every lambda in one batched solve.

    Parameters
    ----------
    src, dst
        ``[B, N, 3]`` (or ``[N, 3]``) corresponding keypoints in mm (fixed and moving for a
        registration), N >= 4 and not coplanar.
    lambdas
        Regularisation weights (>= 0) in the paper's normalised frame (see the module notes).
    weights
        ``[B, N]`` (or ``[N]``) non-negative keypoint weights; the kernel block becomes
        ``K + lambda diag(1 / w)`` with ``w`` normalised to mean 1 and clamped at
        ``min_weight``.
    kernel
        ``'r2logr'`` (paper) or ``'r'`` (3-D biharmonic, ``U = -r``).
    scale_mm
        Length that maps to 1 in the normalised frame (128 mm: the paper's [-1, 1] over 256 mm).

    Returns
    -------
    :class:`TPSFit` with L = ``len(lambdas)`` coefficient sets, differentiable with respect to
    ``src``, ``dst`` and ``weights``.
    """
    if kernel not in KERNELS:
        raise ValueError(f'unknown TPS kernel {kernel!r}; expected one of {KERNELS}')
    s, d, _ = _pair(src, dst)
    b, n, _ = s.shape
    if n < 4:
        raise ValueError(f'a TPS needs at least 4 keypoints, got {n}')
    lams = [float(v) for v in lambdas]
    if not lams or min(lams) < 0:
        raise ValueError(f'lambdas must be a non-empty list of values >= 0, got {lams}')
    dev, f64 = s.device, torch.float64
    s64, d64 = s.to(f64), d.to(f64)
    origin = s64.mean(1, keepdim=True).detach()  # the map does not depend on it
    centers = (s64 - origin) / float(scale_mm)
    k = _kernel(_sqdist(centers, centers), kernel)  # [B, N, N]
    w_store = None
    dinv = torch.ones(b, n, dtype=f64, device=dev)
    if weights is not None:
        w_store = weights if weights.dim() == 2 else weights.unsqueeze(0)
        w_store = w_store.expand(b, n)
        mean_one = _weights(weights, s)[..., 0] * n
        dinv = 1.0 / mean_one.clamp_min(min_weight)
    lam = torch.as_tensor(lams, dtype=f64, device=dev)
    n_lam = lam.shape[0]
    kl = k.unsqueeze(1) + torch.diag_embed(lam[None, :, None] * dinv[:, None, :])  # [B,L,N,N]
    p = torch.cat([centers, torch.ones(b, n, 1, dtype=f64, device=dev)], dim=2)  # [B, N, 4]
    top = torch.cat([kl, p.unsqueeze(1).expand(b, n_lam, n, 4)], dim=3)
    bottom = torch.cat([p.transpose(1, 2).unsqueeze(1).expand(b, n_lam, 4, n),
                        torch.zeros(b, n_lam, 4, 4, dtype=f64, device=dev)], dim=3)
    system = torch.cat([top, bottom], dim=2)  # [B, L, N + 4, N + 4]
    rhs = torch.cat([d64, torch.zeros(b, 4, 3, dtype=f64, device=dev)], dim=1)
    sol = torch.linalg.solve(system, rhs.unsqueeze(1).expand(b, n_lam, n + 4, 3))
    return TPSFit(centers=centers, coef=sol[:, :, :n], affine=sol[:, :, n:], origin=origin,
                  lambdas=tuple(lams), kernel=kernel, scale_mm=float(scale_mm),
                  min_weight=float(min_weight), src=s, dst=d, weights=w_store)


# --------------------------------------------------------------------------------------
# Dense fields
# --------------------------------------------------------------------------------------

def grid_world_points(shape: Sequence[int], grid_affine, start: int = 0, stop: int | None = None,
                      *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """RAS mm of the voxel centres ``start:stop`` (C order) of a grid, ``[M, 3]``."""
    shape = tuple(int(v) for v in shape)
    total = shape[0] * shape[1] * shape[2]
    stop = total if stop is None else min(int(stop), total)
    aff = _as_tensor(grid_affine, device=device)
    idx = torch.arange(int(start), stop, device=aff.device)
    ijk = torch.stack([idx // (shape[1] * shape[2]), (idx // shape[2]) % shape[1],
                       idx % shape[2]], dim=1).to(torch.float64)
    return (ijk @ aff[:3, :3].T + aff[:3, 3]).to(dtype)


def displacement_grid(transform, grid_affine, shape: Sequence[int],
                      lam_index: int | None = None, *, batch_index: int = 0,
                      chunk: int = DEFAULT_CHUNK, dtype: torch.dtype = torch.float32,
                      device=None) -> Tensor:
    """The displacement ``u(x) = T(x) - x`` (RAS mm) at the voxel centres of a grid.

    Parameters
    ----------
    transform
        A :class:`TPSFit`, or an affine ``[3, 4]``/``[4, 4]``/``[B, 3, 4]`` (torch or numpy).
    grid_affine, shape
        Voxel-to-RAS affine (4x4) and shape of the grid (normally the fixed image's).
    lam_index
        For a TPS: ``None`` evaluates every lambda with one kernel evaluation per chunk and
        returns ``[L, X, Y, Z, 3]``; an int returns that lambda's ``[X, Y, Z, 3]``.
    batch_index
        Which batch element of a batched transform.
    chunk
        Points per chunk; the work memory is about ``2 * chunk * N`` values plus the output.

    Returns
    -------
    ``[X, Y, Z, 3]`` (``[L, X, Y, Z, 3]`` for a TPS with ``lam_index=None``), in ``dtype``,
    without autograd history.
    """
    shape = tuple(int(v) for v in shape)
    total = shape[0] * shape[1] * shape[2]
    with torch.no_grad():
        if isinstance(transform, TPSFit):
            fit = transform.select(lam_index, batch_index)
            dev = fit.device if device is None else torch.device(device)
            n_lam = len(fit.lambdas)
            flat = fit._flat(dtype)
            flat = tuple(t.to(dev) for t in flat)
            origin = fit.origin.to(device=dev)[0, 0]
            out = torch.empty(n_lam, total, 3, dtype=dtype, device=dev)
            for start in range(0, total, chunk):
                x = grid_world_points(shape, grid_affine, start, start + chunk, device=dev)
                xn = ((x - origin) / fit.scale_mm).to(dtype).unsqueeze(0)
                mapped = fit._eval_normalised(xn, flat)[0].reshape(-1, n_lam, 3)
                out[:, start:start + x.shape[0]] = (mapped - x.to(dtype).unsqueeze(1)
                                                    ).transpose(0, 1)
            out = out.reshape((n_lam,) + shape + (3,))
            return out if lam_index is None else out[0]
        mat = _as_tensor(transform, device=device)
        if mat.dim() == 3:
            mat = mat[batch_index]
        mat = mat[:3].clone()
        mat[:, :3] -= torch.eye(3, dtype=mat.dtype, device=mat.device)  # u = (A - I) x + t
        out = torch.empty(total, 3, dtype=dtype, device=mat.device)
        for start in range(0, total, chunk):
            x = grid_world_points(shape, grid_affine, start, start + chunk, device=mat.device)
            out[start:start + x.shape[0]] = apply_affine(mat, x).to(dtype)
        return out.reshape(shape + (3,))


#: The name used in the design notes.
tps_displacement_grid = displacement_grid


@dataclass(frozen=True)
class InverseField:
    """The inverse of a TPS as a displacement field on the moving grid.

    ``T^-1(y) = y + field(y)``; ``mean_error_mm``/``max_error_mm`` are the measured
    ``|T(T^-1(y)) - y|`` (exact TPS evaluation) over the voxels of the mask (all voxels without
    one); ``unconverged_fraction`` is the fraction of those voxels whose error stayed above
    the tolerance (where ``T`` folds there is no inverse); ``iterations`` is the most
    fixed-point iterations any voxel used.
    """

    field: Tensor
    mean_error_mm: float
    max_error_mm: float
    unconverged_fraction: float
    iterations: int


def invert_displacement(fit: TPSFit, grid_affine, shape: Sequence[int], lam_index: int = 0, *,
                        batch_index: int = 0, mask=None, n_iter: int = 20,
                        tol_mm: float = 1e-3, precondition: bool = True,
                        chunk: int = DEFAULT_CHUNK, dtype: torch.dtype = torch.float32,
                        device=None) -> InverseField:
    """Invert a fitted TPS ``T`` (fixed -> moving) on a grid of the moving space.

    The start is the TPS fitted to the swapped keypoints (moving -> fixed, same lambda and
    weights): ``v_0(y) = S(y) - y``. Each voxel ``y`` then iterates on the residual
    ``r = T(y + v) - y`` until ``|r| < tol_mm`` or ``n_iter`` iterations, keeping its best
    iterate; ``u`` is evaluated exactly from the TPS (no grid interpolation).

    * ``precondition=False``: the plain fixed-point iteration ``v <- -u(y + v) = v - r``. It
      contracts only where ``|I - dT/dx| < 1``, which fails for large rotations (for a
      rotation by 60 degrees or more, ``|I - R| >= 1``) even without any folding.
    * ``precondition=True`` (default): ``v <- v - M^-1 r`` with ``M`` the linear part of the
      TPS's own affine component (a fixed-Jacobian Newton step). Same fixed point; it
      contracts with ``|I - M^-1 dT/dx|``, i.e. with the size of the non-affine part only.

    Where ``T`` folds (Jacobian determinant <= 0, possible at small lambda) there is no
    inverse: those voxels stop at ``n_iter`` and show up in the error and
    ``unconverged_fraction``.

    Parameters
    ----------
    fit
        The forward TPS; ``lam_index``/``batch_index`` pick one lambda and batch element.
    grid_affine, shape
        The moving grid (4x4 voxel-to-RAS and shape) on which the inverse field is wanted.
    mask
        Optional boolean ``[X, Y, Z]`` (numpy or torch) of the voxels where the error is
        reported (e.g. the moving brain mask); the field is computed everywhere.

    Returns
    -------
    :class:`InverseField` (``field`` ``[X, Y, Z, 3]`` RAS mm in ``dtype``).
    """
    shape = tuple(int(v) for v in shape)
    total = shape[0] * shape[1] * shape[2]
    with torch.no_grad():
        fwd = fit.select(lam_index, batch_index)
        dev = fwd.device if device is None else torch.device(device)
        start_fit = fwd.swapped()
        f_flat = tuple(t.to(dev) for t in fwd._flat(dtype))
        s_flat = tuple(t.to(dev) for t in start_fit._flat(dtype))
        f_origin = fwd.origin.to(device=dev)[0, 0]
        s_origin = start_fit.origin.to(device=dev)[0, 0]
        if precondition:  # r -> M^-1 r as a row-vector product: r @ (M^-1)^T
            jac = fwd.affine[0, 0, :3].T / fwd.scale_mm  # dT_i / dx_j of the affine part
            step = torch.linalg.inv(jac).T.to(device=dev, dtype=dtype)
        else:
            step = torch.eye(3, dtype=dtype, device=dev)

        def through(tps: TPSFit, flat: tuple[Tensor, ...], origin: Tensor, pts: Tensor):
            xn = ((pts.to(torch.float64) - origin) / tps.scale_mm).to(dtype).unsqueeze(0)
            return tps._eval_normalised(xn, flat)[0]

        field = torch.empty(total, 3, dtype=dtype, device=dev)
        error = torch.empty(total, dtype=dtype, device=dev)
        most = 0
        for start in range(0, total, chunk):
            y = grid_world_points(shape, grid_affine, start, start + chunk, device=dev)
            yd = y.to(dtype)
            v = through(start_fit, s_flat, s_origin, y) - yd
            best_v = v.clone()
            best_e = torch.full((y.shape[0],), float('inf'), dtype=dtype, device=dev)
            act = torch.arange(y.shape[0], device=dev)
            for it in range(n_iter + 1):
                if act.numel() == 0:
                    break
                res = through(fwd, f_flat, f_origin, y[act] + v[act].double()) - yd[act]
                err = torch.linalg.vector_norm(res, dim=1)
                better = err < best_e[act]
                best_e[act[better]] = err[better]
                best_v[act[better]] = v[act[better]]
                most = max(most, it)
                if it == n_iter:
                    break
                keep = err >= tol_mm
                v[act[keep]] = v[act[keep]] - res[keep] @ step
                act = act[keep]
            field[start:start + y.shape[0]] = best_v
            error[start:start + y.shape[0]] = best_e
        if mask is not None:
            m = _as_tensor(mask, device=dev, dtype=torch.bool).reshape(-1)
            if m.numel() != total:
                raise ValueError(f'mask has {m.numel()} voxels, the grid {total}')
            error = error[m]
        empty = error.numel() == 0
        mean = float('nan') if empty else float(error.double().mean())
        worst = float('nan') if empty else float(error.max())
        above = float('nan') if empty else float((error >= tol_mm).double().mean())
    return InverseField(field.reshape(shape + (3,)), mean, worst, above, most)
