"""Find a head's orientation from any starting pose, cheaply, before labelling it.

The label network is trained on roughly canonical heads (rotations up to about 20 degrees,
like SynthSeg). Scanner headers normally give that pose, but images moved in world space
(keyprep's demo subjects are rotated by up to 90 degrees) do not. :func:`estimate_pose` finds
the rigid pose of the image relative to the bundled MNI template by a global search over the
24 axis-aligned rotations times a few translations, then a local coordinate search, scoring
the Pearson correlation of the template's brain voxels with the (blurred) image at 6 mm. The
network then runs on a grid aligned with the template, and its labels are resampled to the
image's own grid: nothing in the image is resampled twice.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ['Pose', 'estimate_pose', 'cube_rotations', 'template_points']

SPACING_MM = 6.0


def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes.

    >>> rots = cube_rotations()
    >>> len(rots), all(abs(np.linalg.det(r) - 1) < 1e-9 for r in rots)
    (24, True)
    """
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            r = np.zeros((3, 3))
            for row, (col, s) in enumerate(zip(perm, signs)):
                r[row, col] = s
            if np.linalg.det(r) > 0:
                out.append(r)
    return out


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@lru_cache(maxsize=4)
def template_points(name: str = 'MNI152NLin2009aSym', kind: str = 'intensity'
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of the template at 6 mm (world mm), their standardised blurred values, and the
    brain's centre of mass.

    ``kind='intensity'``: the brain voxels and their T1w intensities (for a head or brain
    image of T1-like contrast). ``kind='mask'``: the brain and a 12 mm shell around it, and
    the blurred brain mask (for matching a brain mask: independent of the contrast)."""
    from ..targets import template_file

    img = nib.load(str(template_file(name)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    if kind == 'mask':
        data = (data > 0).astype(np.float32)
    smooth = ndimage.gaussian_filter(data, 0.42 * SPACING_MM / zooms)
    step = np.maximum(1, np.round(SPACING_MM / zooms)).astype(int)
    sub = smooth[::step[0], ::step[1], ::step[2]]
    brain = data[::step[0], ::step[1], ::step[2]] > 0
    sel = ndimage.binary_dilation(brain, iterations=2) if kind == 'mask' else brain
    ijk = np.argwhere(sel) * step
    pts = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    vals = sub[sel]
    vals = (vals - vals.mean()) / (vals.std() + 1e-6)
    centre = (np.argwhere(brain) * step) @ img.affine[:3, :3].T + img.affine[:3, 3]
    return pts, vals, centre.mean(0)


@dataclass
class Pose:
    """Rigid map from template world points to image world points (4x4) and its score."""

    matrix: np.ndarray
    score: float
    identity_score: float
    #: the other refined candidates (4x4 matrices), best first
    alternatives: tuple = ()


class _Sampler:
    def __init__(self, img: nib.spatialimages.SpatialImage, foreground: str = 'percentile'):
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim > 3:
            data = data[..., 0]
        data = np.nan_to_num(data)
        zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
        step = np.maximum(1, np.floor(SPACING_MM / 2 / zooms)).astype(int)  # ~3 mm sampling grid
        self.data = ndimage.gaussian_filter(data, 0.42 * SPACING_MM / zooms)[::step[0], ::step[1], ::step[2]]
        aff = img.affine.copy()
        aff[:3, :3] = img.affine[:3, :3] * step
        self.inv = np.linalg.inv(aff)
        fg = self.data > (0.5 if foreground == 'mask' else np.percentile(self.data, 60))
        if not fg.any() or not np.isfinite(self.data).all():
            raise ValueError('the image has no foreground to find its pose from')
        idx = np.argwhere(fg)
        w = self.data[fg]
        self.com = (aff[:3, :3] @ (idx * w[:, None]).sum(0) / w.sum()) + aff[:3, 3]

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        ijk = pts @ self.inv[:3, :3].T + self.inv[:3, 3]
        return ndimage.map_coordinates(self.data, ijk.T, order=1, mode='constant', cval=0.0)


def _score(sampler: _Sampler, pts, vals, rot, centre_t, centre_i) -> float:
    x = (pts - centre_t) @ rot.T + centre_i
    v = sampler(x)
    sd = v.std()
    return float((v - v.mean()) @ vals / (len(v) * sd)) if sd > 0 else -1.0


def estimate_pose(img: nib.spatialimages.SpatialImage, template: str = 'MNI152NLin2009aSym',
                  candidates: int = 4, mask: nib.spatialimages.SpatialImage | None = None) -> Pose:
    """Rigid pose of a head or brain image relative to the template (see module docstring).

    With ``mask`` (a brain mask of the image, e.g. deepbet's), the brain mask is matched to
    the template's instead of the intensities: this works for any contrast."""
    if mask is not None:
        pts, vals, c_t = template_points(template, 'mask')
        mdata = (np.asarray(mask.dataobj) > 0).astype(np.float32)
        if not mdata.any():
            raise ValueError('the brain mask is empty')
        sampler = _Sampler(nib.Nifti1Image(mdata, mask.affine), foreground='mask')
    else:
        pts, vals, c_t = template_points(template)
        sampler = _Sampler(img)
    c_i = sampler.com
    # global stage: 24 axis-aligned rotations, each tilted by 0 or +-35 degrees about each
    # axis (168 candidates, no rotation is more than about 35 degrees from one of them), and
    # the brain's centre shifted 0-30 mm towards the top of the head from the image's centre
    # of mass; scored on a sparser subset of the template points.
    sparse = slice(None, None, 4)
    tilts = [np.eye(3)] + [_rot(a, sgn * 35.0) for a in range(3) for sgn in (1, -1)]
    ident = _score(sampler, pts, vals, np.eye(3), c_t, c_i)
    found = []
    for base in cube_rotations():
        for tilt in tilts:
            rot = base @ tilt
            for k in (0.0, 15.0, 30.0):
                centre = c_i + k * rot[:, 2]
                found.append((_score(sampler, pts[sparse], vals[sparse], rot, c_t, centre), rot, centre))
    found.sort(key=lambda item: -item[0])
    # local refinement of the best few: coordinate search on rotations (deg) and translations (mm)
    refined = []
    for _, rot, centre in found[:candidates]:
        score = _score(sampler, pts, vals, rot, c_t, centre)
        for rstep, tstep in ((20.0, 10.0), (10.0, 5.0), (5.0, 2.5), (2.5, 1.25)):
            improved = True
            while improved:
                improved = False
                for axis in range(3):
                    for sign in (1, -1):
                        cand = rot @ _rot(axis, sign * rstep)
                        s = _score(sampler, pts, vals, cand, c_t, centre)
                        if s > score + 1e-4:
                            score, rot, improved = s, cand, True
                        delta = np.zeros(3)
                        delta[axis] = sign * tstep
                        s = _score(sampler, pts, vals, rot, c_t, centre + delta)
                        if s > score + 1e-4:
                            score, centre, improved = s, centre + delta, True
        mat = np.eye(4)
        mat[:3, :3] = rot
        mat[:3, 3] = centre - rot @ c_t
        refined.append((score, mat))
    refined.sort(key=lambda item: -item[0])
    distinct = [refined[0]]
    for score, mat in refined[1:]:  # drop candidates that converged to the same pose
        if all(_angle(mat[:3, :3], m[:3, :3]) > 15.0 for _, m in distinct):
            distinct.append((score, mat))
    return Pose(matrix=distinct[0][1], score=distinct[0][0], identity_score=ident,
                alternatives=tuple(m for _, m in distinct[1:]))


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation between two rotation matrices."""
    c = (np.trace(a.T @ b) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))
