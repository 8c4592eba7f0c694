"""Known-truth registration pairs: move a real image and its label maps by a known transform.

A registration test or benchmark is only honest when the answer is known. This module
takes a real image (e.g. Colin27) with its label maps, moves the head by a known
similarity (rotation about any axis up to 180 degrees, translation, scaling), optionally
composed with a real nonlinear displacement field, resamples everything onto a new grid
(own voxel size, anisotropic, oblique, any voxel order) and changes the intensities
(bias field, gamma, noise). Because the labels move with the image, the moved labels are
exact ground truth for Dice, and the transform is exported as an ITK file that
``ants.apply_transforms`` applies.

Conventions
-----------
All points are RAS world coordinates in mm (NIfTI convention); matrices are 4x4 and act
on homogeneous column vectors.

* The *motion* ``S`` is what happens to the head: a point ``p`` of the source image
  moves to ``S p``.
* A :class:`KnownTransform` is stored as its *pull* mapping ``T`` from the moved
  (subject) space to the source space, ``T(y) = D(S^-1 y)``, where ``D(x) = x + u(x)``
  is an optional deformation of the source (a displacement field ``u`` in source space).
  The moved image is ``I_moved(y) = I_source(T(y))``.
* In keyprep's naming (see :mod:`keyprep.pipeline.transforms`) ``T`` is the transform
  ``from-<source>_to-<moved>``: it maps the moved image's points to the source's, so
  ``ants.apply_transforms(fixed=moved, moving=source, transformlist=[T])`` resamples the
  source onto the moved grid. Its inverse ``T^-1 = S o D^-1`` (:meth:`KnownTransform.push`)
  is what a registration of the moved image (moving) to the source (fixed) must find as
  its forward transform.
* ITK files are in LPS: the RAS matrix ``M`` becomes ``F M F`` with ``F = diag(-1, -1, 1)``,
  and displacement vectors have their x and y components negated.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> s = random_similarity(rng, 90.0, 10.0, (0.9, 1.1), center=(0.0, -18.0, 18.0))
>>> t = KnownTransform(s)
>>> p = np.array([[10.0, 20.0, 30.0]])
>>> bool(np.allclose(t.pull(t.push(p)), p))
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import NamedTuple

import nibabel as nb
import numpy as np
from scipy import ndimage as ndi

from .io import make_image
from .transforms import write_itk_affine, write_itk_displacement_field

__all__ = [
    'NITRANSFORMS_FSL_FIELD',
    'DisplacementField',
    'Grid',
    'KnownTransform',
    'add_noise',
    'apply_gamma',
    'apply_known_transform',
    'bias_field',
    'center_of_mass',
    'describe_similarity',
    'fitting_grid',
    'foreground_points',
    'grid_points',
    'load_fsl_displacement_field',
    'nitransforms_field_path',
    'random_axis',
    'random_similarity',
    'resample',
    'rotation_about_axis',
    'similarity_matrix',
]

#: The real nonlinear displacement field shipped with nitransforms' tests (OASIS template to
#: a ds005 subject, FSL convention, mm, 2 mm grid), relative to the nitransforms package.
NITRANSFORMS_FSL_FIELD = 'tests/data/ds-005_sub-01_from-OASIS_to-T1_warp_fsl.nii.gz'

_CHUNK = 1_000_000


# --------------------------------------------------------------------------------------
# Rotations and similarities
# --------------------------------------------------------------------------------------

def rotation_about_axis(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """The 3x3 rotation by ``angle_deg`` (right-hand rule) about ``axis`` (Rodrigues).

    >>> r = rotation_about_axis((0, 0, 1), 90.0)
    >>> np.round(r @ [1.0, 0.0, 0.0], 12).tolist()
    [0.0, 1.0, 0.0]
    >>> bool(np.isclose(np.linalg.det(rotation_about_axis((1, 2, 3), 137.0)), 1.0))
    True
    """
    a = np.asarray(axis, dtype=float)
    norm = np.linalg.norm(a)
    if a.shape != (3,) or norm == 0:
        raise ValueError(f'axis must be a non-zero 3-vector, got {axis!r}')
    a = a / norm
    theta = np.deg2rad(angle_deg)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


def random_axis(rng: np.random.Generator) -> np.ndarray:
    """A unit vector drawn uniformly on the sphere.

    >>> bool(np.isclose(np.linalg.norm(random_axis(np.random.default_rng(1))), 1.0))
    True
    """
    v = rng.normal(size=3)
    while np.linalg.norm(v) < 1e-8:  # pragma: no cover - probability zero
        v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def similarity_matrix(rotation: np.ndarray, translation: Sequence[float] = (0.0, 0.0, 0.0),
                      scale: float = 1.0,
                      center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 matrix of ``p -> c + scale * R (p - c) + t``: rotate and scale about ``center``,
    then translate.

    >>> m = similarity_matrix(rotation_about_axis((0, 0, 1), 90), (1, 0, 0), 2.0, (5, 5, 0))
    >>> np.round(m @ [5.0, 5.0, 0.0, 1.0], 9).tolist()  # the centre moves by the translation
    [6.0, 5.0, 0.0, 1.0]
    """
    c = np.asarray(center, dtype=float)
    out = np.eye(4)
    out[:3, :3] = float(scale) * np.asarray(rotation, dtype=float)
    out[:3, 3] = c - out[:3, :3] @ c + np.asarray(translation, dtype=float)
    return out


def random_similarity(rng: np.random.Generator, max_rotation_deg: float = 180.0,
                      max_translation_mm: float = 10.0,
                      scale_range: tuple[float, float] = (0.9, 1.1), *,
                      center: Sequence[float] = (0.0, 0.0, 0.0),
                      axis: Sequence[float] | None = None,
                      angle_deg: float | None = None) -> np.ndarray:
    """A random similarity (4x4 RAS motion) about ``center``.

    The rotation axis is uniform on the sphere (or ``axis``), the angle uniform in
    ``[0, max_rotation_deg]`` (or exactly ``angle_deg``), the translation has a uniform
    random direction and a length uniform in ``[0, max_translation_mm]``, and the
    isotropic scale is uniform in ``scale_range``. Pass the image's centre of mass as
    ``center`` so that the head turns in place and stays in view.

    >>> m1 = random_similarity(np.random.default_rng(3), 60.0)
    >>> m2 = random_similarity(np.random.default_rng(3), 60.0)
    >>> bool(np.array_equal(m1, m2))
    True
    >>> d = describe_similarity(random_similarity(np.random.default_rng(3), 0.0, 0.0, (1, 1)))
    >>> d['angle_deg'], d['scale']
    (0.0, 1.0)
    """
    ax = random_axis(rng) if axis is None else np.asarray(axis, dtype=float)
    angle = float(rng.uniform(0.0, max_rotation_deg)) if angle_deg is None else float(angle_deg)
    direction = random_axis(rng)
    length = float(rng.uniform(0.0, max_translation_mm))
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    return similarity_matrix(rotation_about_axis(ax, angle), direction * length, scale, center)


def describe_similarity(matrix: np.ndarray,
                        center: Sequence[float] = (0.0, 0.0, 0.0)) -> dict[str, object]:
    """Decompose a similarity into scale, rotation axis and angle, and the translation of
    ``center`` (JSON-friendly, rounded).

    >>> m = similarity_matrix(rotation_about_axis((0, 1, 0), 150.0), (0, 0, 3), 1.1)
    >>> d = describe_similarity(m)
    >>> d['angle_deg'], d['axis'], d['scale'], d['translation_mm']
    (150.0, [0.0, 1.0, 0.0], 1.1, [0.0, 0.0, 3.0])
    """
    m = np.asarray(matrix, dtype=float)
    lin = m[:3, :3]
    scale = float(np.cbrt(np.linalg.det(lin)))
    rot = lin / scale
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.degrees(np.arccos(cos)))
    skew = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if np.linalg.norm(skew) > 1e-6:
        axis = skew / np.linalg.norm(skew)
    else:  # 0 or 180 degrees: the eigenvector of eigenvalue 1
        w, v = np.linalg.eigh((rot + rot.T) / 2.0)
        axis = v[:, int(np.argmax(w))]
        axis = axis * (1.0 if axis[np.argmax(np.abs(axis))] > 0 else -1.0)
        if angle < 1e-6:
            axis = np.array([0.0, 0.0, 1.0])
    c = np.asarray(center, dtype=float)
    trans = m[:3, :3] @ c + m[:3, 3] - c

    def clean(x: np.ndarray, nd: int) -> list[float]:
        return [float(v) + 0.0 for v in np.round(x, nd)]

    return {
        'angle_deg': round(angle, 6) + 0.0,
        'axis': clean(axis, 6),
        'scale': round(scale, 6),
        'translation_mm': clean(trans, 4),
        'center_mm': clean(c, 4),
    }


# --------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------

class Grid(NamedTuple):
    """A voxel grid: its shape and voxel-to-RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel sizes in mm."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))

    @classmethod
    def of(cls, img: nb.spatialimages.SpatialImage) -> Grid:
        """The grid of an image."""
        return cls(tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=float))


def grid_points(grid: Grid, start: int = 0, stop: int | None = None) -> np.ndarray:
    """RAS coordinates of voxel centres ``start:stop`` (C order) of a grid, as (N, 3).

    >>> g = Grid((2, 1, 1), np.diag([2.0, 1.0, 1.0, 1.0]))
    >>> grid_points(g).tolist()
    [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
    """
    n = int(np.prod(grid.shape))
    stop = n if stop is None else min(stop, n)
    ijk = np.stack(np.unravel_index(np.arange(start, stop), grid.shape), axis=1).astype(float)
    return ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def _direction_from_axcodes(axcodes: str) -> np.ndarray:
    ornt = nb.orientations.axcodes2ornt(tuple(axcodes))
    direction = np.zeros((3, 3))
    for k, (world_axis, sign) in enumerate(ornt):
        direction[int(world_axis), k] = sign
    return direction


def fitting_grid(points: np.ndarray, voxel_size: Sequence[float] | float, *,
                 rotation: np.ndarray | None = None, orientation: str = 'RAS',
                 margin_mm: float = 5.0) -> Grid:
    """The smallest grid with the given voxel sizes and axes that contains ``points``.

    Parameters
    ----------
    points
        (N, 3) RAS coordinates that must lie inside the field of view (e.g. the moved
        head's foreground voxels).
    voxel_size
        Voxel sizes in mm along the grid's voxel axes (a number for isotropic voxels).
    rotation
        A 3x3 rotation applied to the grid axes (an oblique acquisition), or ``None``.
    orientation
        Voxel order (``'RAS'``, ``'LAS'``, ``'LIA'``...) before the rotation.
    margin_mm
        Extra space on every side.

    >>> pts = np.array([[0.0, 0.0, 0.0], [10.0, 20.0, 30.0]])
    >>> g = fitting_grid(pts, (1.0, 2.0, 3.0), margin_mm=0.0)
    >>> g.shape, g.zooms
    ((11, 11, 11), (1.0, 2.0, 3.0))
    >>> g = fitting_grid(pts, 2.0, orientation='LPI', margin_mm=0.0)
    >>> nb.aff2axcodes(g.affine), g.shape
    (('L', 'P', 'I'), (6, 11, 16))
    """
    zooms = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)).copy()
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
    lin = rot @ _direction_from_axcodes(orientation) @ np.diag(zooms)
    ijk = (np.asarray(points, dtype=float) @ np.linalg.inv(lin).T)
    margin = margin_mm / zooms
    lo = np.floor(ijk.min(axis=0) - margin)
    hi = np.ceil(ijk.max(axis=0) + margin)
    shape = tuple(int(n) for n in (hi - lo + 1))
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = lin @ lo
    return Grid(shape, affine)


def foreground_points(img: nb.spatialimages.SpatialImage, threshold: float | None = None,
                      step: int = 1) -> np.ndarray:
    """RAS coordinates of voxels above ``threshold`` (default: the image minimum), every
    ``step`` voxels along each axis.

    >>> x = np.zeros((4, 4, 4)); x[1, 2, 3] = 5
    >>> foreground_points(nb.Nifti1Image(x, np.eye(4))).tolist()
    [[1.0, 2.0, 3.0]]
    """
    data = np.asanyarray(img.dataobj)
    thr = float(np.min(data)) if threshold is None else float(threshold)
    sub = data[::step, ::step, ::step]
    ijk = np.argwhere(sub > thr).astype(float) * step
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]


def center_of_mass(img: nb.spatialimages.SpatialImage) -> np.ndarray:
    """Intensity-weighted centre of mass (RAS mm) of the non-negative part of an image.

    >>> x = np.zeros((5, 5, 5)); x[1, 2, 3] = 1.0; x[3, 2, 3] = 1.0
    >>> center_of_mass(nb.Nifti1Image(x, np.diag([2.0, 2.0, 2.0, 1.0]))).tolist()
    [4.0, 4.0, 6.0]
    """
    data = np.clip(np.asanyarray(img.dataobj).astype(np.float64), 0, None)
    ijk = np.asarray(ndi.center_of_mass(data), dtype=float)
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


# --------------------------------------------------------------------------------------
# Displacement fields
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DisplacementField:
    """A dense displacement field ``u`` in RAS mm on a grid: it maps ``x -> x + u(x)``.

    Values between voxel centres are interpolated trilinearly; outside the grid the
    displacement is zero (as in nitransforms).

    Attributes
    ----------
    data
        (X, Y, Z, 3) RAS displacements in mm.
    affine
        Voxel-to-RAS affine of the grid.
    """

    data: np.ndarray
    affine: np.ndarray

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """Interpolated ``u`` at (N, 3) RAS points."""
        pts = np.asarray(points, dtype=float)
        inv = np.linalg.inv(self.affine)
        ijk = pts @ inv[:3, :3].T + inv[:3, 3]
        out = np.empty_like(pts)
        for k in range(3):
            out[:, k] = ndi.map_coordinates(self.data[..., k], ijk.T, order=1, mode='constant',
                                            cval=0.0, prefilter=False)
        return out

    def map(self, points: np.ndarray) -> np.ndarray:
        """``x + u(x)`` at (N, 3) RAS points."""
        pts = np.asarray(points, dtype=float)
        return pts + self.displacement(pts)

    def inverse_map(self, points: np.ndarray, n_iter: int = 60, tol: float = 1e-4) -> np.ndarray:
        """Solve ``x + u(x) = p`` for each point by fixed-point iteration ``x <- p - u(x)``
        (converges where the field's Jacobian is well away from folding)."""
        p = np.asarray(points, dtype=float)
        x = p - self.displacement(p)
        active = np.arange(len(p))
        for _ in range(n_iter):
            new = p[active] - self.displacement(x[active])
            moved = np.max(np.abs(new - x[active]), axis=1) if len(active) else new[:, 0]
            x[active] = new
            active = active[moved >= tol]
            if not len(active):
                break
        return x

    def scaled(self, factor: float) -> DisplacementField:
        """The field multiplied by ``factor``."""
        return DisplacementField((self.data * float(factor)).astype(np.float32), self.affine)

    def support_centroid(self) -> np.ndarray:
        """RAS centroid of the voxels where the displacement is non-zero."""
        nz = np.argwhere(np.any(self.data != 0, axis=-1)).astype(float)
        ijk = nz.mean(axis=0) if nz.size else (np.asarray(self.data.shape[:3]) - 1) / 2.0
        return self.affine[:3, :3] @ ijk + self.affine[:3, 3]

    def recentred(self, center: Sequence[float]) -> DisplacementField:
        """The same displacement pattern translated so that its support is centred on
        ``center`` (to use a field estimated in another space on a new image)."""
        affine = self.affine.copy()
        affine[:3, 3] += np.asarray(center, dtype=float) - self.support_centroid()
        return DisplacementField(self.data, affine)

    def jacobian_determinant(self) -> np.ndarray:
        """Determinant of ``I + du/dx`` on the field's grid (finite differences)."""
        lin = self.affine[:3, :3]
        inv = np.linalg.inv(lin)
        grads = np.empty(self.data.shape[:3] + (3, 3))
        for k in range(3):
            g = np.gradient(self.data[..., k].astype(np.float64))  # d u_k / d index_j
            for j in range(3):
                grads[..., k, j] = g[j]
        jac = np.einsum('...kj,jl->...kl', grads, inv) + np.eye(3)  # d u_k / d x_l
        return np.linalg.det(jac)


def nitransforms_field_path() -> Path:
    """Path of the real displacement field shipped with nitransforms."""
    import nitransforms

    path = Path(nitransforms.__file__).parent / NITRANSFORMS_FSL_FIELD
    if not path.exists():
        from .errors import MissingInputError

        raise MissingInputError(f'nitransforms test field not found: {path}')
    return path


def load_fsl_displacement_field(path: str | os.PathLike | None = None) -> DisplacementField:
    """Read an FSL relative displacement field (mm) as a RAS :class:`DisplacementField`.

    The conversion is nitransforms' own reader (``FSLDisplacementsField``): FSL stores
    displacements in its "scaled voxel" coordinates, whose x axis runs opposite to RAS x
    for a neurological (det > 0) voxel order and along voxel ``i`` (which then points
    left) for a radiological one, so in both cases RAS displacement = FSL displacement with
    x negated. The field is defined on the reference grid and maps reference points
    ``x -> x + u(x)`` into the moving space (the pull convention of ITK and nitransforms).
    Defaults to nitransforms' real OASIS-to-subject field.
    """
    from nitransforms.io.fsl import FSLDisplacementsField

    path = nitransforms_field_path() if path is None else Path(path)
    img = FSLDisplacementsField.from_image(nb.load(str(path)))
    data = np.asanyarray(img.dataobj).astype(np.float32).reshape(img.shape[:3] + (3,))
    return DisplacementField(data, np.asarray(img.affine, dtype=float))


# --------------------------------------------------------------------------------------
# Known transforms
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class KnownTransform:
    """A known-truth transform: the motion ``S`` of the head, after an optional deformation.

    ``pull(y) = D(S^-1 y)`` maps moved-space points to source points (the moved image is
    the source sampled there) and ``push(p) = S D^-1(p)`` maps source points to where they
    end up. See the module docstring for the conventions.

    >>> t = KnownTransform(similarity_matrix(rotation_about_axis((0, 0, 1), 90.0)))
    >>> np.round(t.push(np.array([[1.0, 0.0, 0.0]])), 12).tolist()
    [[0.0, 1.0, 0.0]]
    >>> t.is_linear, round(t.volume_ratio, 12)
    (True, 1.0)
    """

    motion: np.ndarray = dc_field(default_factory=lambda: np.eye(4))
    field: DisplacementField | None = None

    @property
    def is_linear(self) -> bool:
        """True without a deformation field."""
        return self.field is None

    @property
    def volume_ratio(self) -> float:
        """Volume change of the motion (moved volume / source volume): ``det S``."""
        return float(np.linalg.det(self.motion[:3, :3]))

    def pull(self, points: np.ndarray) -> np.ndarray:
        """Moved-space points -> source points, (N, 3) RAS."""
        pts = np.asarray(points, dtype=float)
        inv = np.linalg.inv(self.motion)
        x = pts @ inv[:3, :3].T + inv[:3, 3]
        return x if self.field is None else self.field.map(x)

    def push(self, points: np.ndarray) -> np.ndarray:
        """Source points -> moved-space points, (N, 3) RAS."""
        x = np.asarray(points, dtype=float)
        if self.field is not None:
            x = self.field.inverse_map(x)
        return x @ self.motion[:3, :3].T + self.motion[:3, 3]

    def pull_matrix(self) -> np.ndarray:
        """The 4x4 RAS matrix of :meth:`pull` (linear transforms only)."""
        if not self.is_linear:
            raise ValueError('a transform with a deformation field has no matrix')
        return np.linalg.inv(self.motion)

    def write_itk(self, path: str | os.PathLike, *, grid: Grid | None = None,
                  inverse: bool = False) -> Path:
        """Write the transform as an ITK file for ``ants.apply_transforms``.

        Without ``inverse`` the file holds :meth:`pull` (``from-<source>_to-<moved>``: it
        resamples a source image onto the moved grid); with ``inverse`` it holds
        :meth:`push` (resamples a moved image onto a source grid). A linear transform is
        written as an ITK affine (``.txt``); a deformable one as an ITK displacement field
        (``.nii.gz``) on ``grid``, the grid of the images it will resample onto.
        """
        if self.is_linear:
            mat = self.motion if inverse else np.linalg.inv(self.motion)
            return write_itk_affine(mat, path)
        if grid is None:
            raise ValueError('a deformable transform needs the grid to write its field on')
        mapping = self.push if inverse else self.pull
        disp = np.empty((int(np.prod(grid.shape)), 3), dtype=np.float32)
        for start in range(0, disp.shape[0], _CHUNK):
            pts = grid_points(grid, start, start + _CHUNK)
            disp[start:start + len(pts)] = mapping(pts) - pts
        return write_itk_displacement_field(disp.reshape(grid.shape + (3,)), grid.affine, path)


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------

def _antialias(data: np.ndarray, affine: np.ndarray, grid: Grid, scale: float) -> np.ndarray:
    """Gaussian pre-smoothing before sampling onto coarser voxels (FWHM = voxel size)."""
    src = np.linalg.norm(affine[:3, :3], axis=0)
    dst = float(np.mean(grid.zooms)) * abs(scale) ** (1.0 / 3.0)
    fwhm = np.sqrt(np.clip(dst ** 2 - src ** 2, 0.0, None))
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / src
    if np.all(sigma < 0.2):
        return data
    return ndi.gaussian_filter(data.astype(np.float32), sigma, mode='nearest')


def resample(data: np.ndarray, affine: np.ndarray, grid: Grid,
             transform: KnownTransform | None = None, *, order: int = 1, cval: float = 0.0,
             antialias: bool = False) -> np.ndarray:
    """Sample a source array on ``grid`` through a known transform (:meth:`~KnownTransform.pull`).

    ``order`` is the spline order: 0 (nearest neighbour, for label maps: the dtype is
    kept), 1 (linear) or 3 (cubic, clipped to the source range). Non-label outputs are
    float32. As in ITK, a point within half a voxel of the source grid is inside (edge
    values are extended there) and gets ``cval`` beyond. ``antialias`` smooths the source
    first when the target voxels are larger.

    >>> src = np.arange(27.0).reshape(3, 3, 3)
    >>> shift = KnownTransform(similarity_matrix(np.eye(3), (1.0, 0.0, 0.0)))
    >>> out = resample(src, np.eye(4), Grid((3, 3, 3), np.eye(4)), shift, order=0)
    >>> out[1:, :, :].tolist() == src[:2, :, :].tolist(), bool(np.all(out[0] == 0))
    (True, True)
    """
    transform = transform or KnownTransform()
    src = np.asarray(data)
    if antialias and order > 0:
        src = _antialias(src, affine, grid, transform.volume_ratio)
    if order > 0:
        src = src.astype(np.float32, copy=False)
    out_dtype = src.dtype if order == 0 else np.float32
    inv_src = np.linalg.inv(affine)
    # Like ITK: a point is inside the source when its continuous index lies within half a
    # voxel of the grid, and interpolation there uses the edge values.
    mode = 'grid-constant' if order == 0 else 'nearest'
    if transform.is_linear:
        vox = inv_src @ transform.pull_matrix() @ grid.affine
        out = ndi.affine_transform(src, vox[:3, :3], offset=vox[:3, 3], output_shape=grid.shape,
                                   order=order, mode=mode, cval=cval, output=out_dtype)
        if order > 0:
            inside = ndi.affine_transform(np.ones(src.shape, np.uint8), vox[:3, :3],
                                          offset=vox[:3, 3], output_shape=grid.shape, order=0,
                                          mode='grid-constant', cval=0)
            out[inside == 0] = cval
    else:
        prefiltered = ndi.spline_filter(src, order=order, mode='nearest') if order > 1 else src
        n = int(np.prod(grid.shape))
        out = np.empty(n, dtype=out_dtype)
        upper = np.asarray(src.shape, dtype=float) - 0.5
        for start in range(0, n, _CHUNK):
            pts = transform.pull(grid_points(grid, start, start + _CHUNK))
            ijk = pts @ inv_src[:3, :3].T + inv_src[:3, 3]
            vals = ndi.map_coordinates(prefiltered, ijk.T, order=order, mode=mode, cval=cval,
                                       prefilter=False)
            if order > 0:
                vals[~np.all((ijk >= -0.5) & (ijk < upper), axis=1)] = cval
            out[start:start + len(pts)] = vals
        out = out.reshape(grid.shape)
    if order > 1:
        out = np.clip(out, min(float(src.min()), cval), max(float(src.max()), cval))
    return out


def apply_known_transform(image: nb.spatialimages.SpatialImage, transform: KnownTransform,
                          grid: Grid, *, labels: Sequence[nb.spatialimages.SpatialImage] = (),
                          order: int = 1, antialias: bool = True
                          ) -> tuple[nb.Nifti1Image, list[nb.Nifti1Image]]:
    """Move an image and its label maps by ``transform`` onto a new ``grid``.

    The image is interpolated with spline ``order`` (1: linear, 3: cubic) and returned as
    float32; each label map (on its own grid, which may differ from the image's) with
    nearest neighbour, keeping its integer dtype. Everything outside the source is 0.

    >>> img = nb.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype('f4'), np.eye(4))
    >>> lab = nb.Nifti1Image((np.asanyarray(img.dataobj) > 0.5).astype('u1'), np.eye(4))
    >>> moved, (mlab,) = apply_known_transform(img, KnownTransform(), Grid.of(img), labels=[lab])
    >>> bool(np.allclose(moved.get_fdata(), img.get_fdata())), mlab.get_data_dtype().name
    (True, 'uint8')
    """
    moved = resample(np.asanyarray(image.dataobj), image.affine, grid, transform, order=order,
                     antialias=antialias)
    out_labels = []
    for lab in labels:
        data = np.asanyarray(lab.dataobj)
        if not np.issubdtype(data.dtype, np.integer):
            data = np.rint(data).astype(np.int32)
        out_labels.append(make_image(resample(data, lab.affine, grid, transform, order=0),
                                 grid.affine))
    return make_image(moved, grid.affine), out_labels


# --------------------------------------------------------------------------------------
# Intensity changes
# --------------------------------------------------------------------------------------

def bias_field(rng: np.random.Generator, shape: Sequence[int], zooms: Sequence[float] = (1, 1, 1),
               *, strength: float = 0.3, spacing_mm: float = 80.0) -> np.ndarray:
    """A smooth multiplicative bias field ``exp(strength * f)`` with ``max |f| = 1``.

    ``f`` is a cubic interpolation of normal random values on a coarse control grid with
    about ``spacing_mm`` between control points, so the field varies on the scale of the
    head whatever the voxel size.

    >>> b = bias_field(np.random.default_rng(0), (20, 30, 10), (2.0, 2.0, 3.0), strength=0.2)
    >>> b.shape, bool(b.min() >= np.exp(-0.2) - 1e-6 and b.max() <= np.exp(0.2) + 1e-6)
    ((20, 30, 10), True)
    """
    shape = tuple(int(n) for n in shape)
    fov = np.asarray(shape, dtype=float) * np.asarray(zooms, dtype=float)
    ctrl = tuple(int(max(2, np.ceil(f / spacing_mm) + 1)) for f in fov)
    coarse = rng.normal(size=ctrl)
    # grid_mode=False aligns the first and last samples with the first and last control
    # points, i.e. samples at np.linspace(0, c - 1, n) along each axis.
    f = ndi.zoom(coarse, [n / c for n, c in zip(shape, ctrl)], order=3, mode='nearest',
                 grid_mode=False)
    f = f / max(float(np.max(np.abs(f))), 1e-12)
    return np.exp(strength * f).astype(np.float32)


def apply_gamma(data: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma change of contrast on the image range: ``lo + (hi - lo) * x**gamma`` with
    ``x`` the intensity normalised to [0, 1].

    >>> apply_gamma(np.array([0.0, 1.0, 4.0]), 0.5).tolist()
    [0.0, 2.0, 4.0]
    """
    x = np.asarray(data, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x.copy()
    return (lo + (hi - lo) * ((x - lo) / (hi - lo)) ** float(gamma)).astype(np.float32)


def add_noise(rng: np.random.Generator, data: np.ndarray, sigma: float, *,
              rician: bool = True) -> np.ndarray:
    """Additive noise of standard deviation ``sigma`` (in image units).

    Rician (the magnitude of a complex signal with Gaussian noise on both channels, as in
    MR magnitude images) by default, otherwise Gaussian.

    >>> x = np.full(100_000, 100.0, dtype='f4')
    >>> y = add_noise(np.random.default_rng(0), x, 5.0)
    >>> bool(abs(y.std() - 5.0) < 0.2), bool(y.min() >= 0)
    (True, True)
    """
    x = np.asarray(data, dtype=np.float32)
    n1 = rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
    if not rician:
        return x + n1
    n2 = rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
    return np.sqrt((x + n1) ** 2 + n2 ** 2)
