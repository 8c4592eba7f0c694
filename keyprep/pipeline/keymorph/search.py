"""Pose search: KeyMorph from any starting orientation with a detector trained on a limited
rotation range.

The detector learns rotation robustness from augmentation, and a small network trained on a
CPU budget learns it only over a limited range (the shipped one: +-45 deg about each axis).
Any rotation is within 62.8 deg (the covering radius of the 24 rotations of the cube) of one
of the cube's 24 proper rotations, so detecting the moving image's keypoints on 24 turned
copies of the detector grid and keeping the best fit covers every pose with residual rotations
the detector was trained on:

1. the moving image is resampled once per candidate rotation ``R`` onto the detector grid
   turned by ``R`` about its centre (:meth:`~keyprep.pipeline.keymorph.network.Conformer.grid`);
   keypoints found on a turned grid map straight back to the moving image's own world
   millimetres, so no candidate changes the meaning of the result;
2. each candidate's keypoints are fitted to the fixed keypoints in closed form (rigid or
   affine);
3. the candidate whose fit gives the highest normalised mutual information between the fixed
   image and the moving image warped by that fit (both on the detector grid, inside the union
   of the two brains) wins. NMI works across contrasts and needs no labels.

The candidates' forward passes are batched. With ``candidates='none'`` only the axis-aligned
grid is used (the plain KeyMorph of the papers).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ['POSE_SEARCH', 'PoseSearch', 'cube_rotations', 'normalised_mutual_information',
           'rotation_angle_deg', 'search_pose']

#: Values of the engines' ``pose_search`` parameter.
POSE_SEARCH = ('none', 'cube')


def cube_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube (signed permutation matrices of determinant +1),
    identity first: ``[24, 3, 3]`` float64."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for row, col in enumerate(perm):
                m[row, col] = signs[row]
            if np.linalg.det(m) > 0:
                mats.append(m)
    mats.sort(key=lambda m: -np.trace(m))  # identity (trace 3) first, then by angle
    return np.stack(mats)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle of a rotation matrix (degrees, 0-180)."""
    c = (np.trace(np.asarray(rotation)[:3, :3]) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def normalised_mutual_information(a: torch.Tensor, b: torch.Tensor,
                                  mask: torch.Tensor | None = None, bins: int = 32) -> float:
    """Studholme's NMI ``(H(A) + H(B)) / H(A, B)`` (1: independent, 2: identical) of two
    images with intensities in [0, 1], from their joint histogram inside ``mask``."""
    ia = (a.clamp(0, 1) * (bins - 1)).round().long().flatten()
    ib = (b.clamp(0, 1) * (bins - 1)).round().long().flatten()
    if mask is not None:
        sel = mask.flatten()
        ia, ib = ia[sel], ib[sel]
    if ia.numel() == 0:
        return 0.0
    joint = torch.bincount(ia * bins + ib, minlength=bins * bins).double().view(bins, bins)
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    h_ab = entropy(p)
    if h_ab <= 0:
        return 2.0
    return (entropy(p.sum(1)) + entropy(p.sum(0))) / h_ab


@dataclass
class PoseSearch:
    """Outcome of :func:`search_pose`: the chosen candidate's detection (as
    :meth:`KeyMorphModel.detect_conformed` returns it), its index and rotation, every
    candidate's score and the time taken."""

    detection: dict
    index: int
    rotation: np.ndarray
    scores: list[float] = field(default_factory=list)
    time_s: float = 0.0

    @property
    def angle_deg(self) -> float:
        return rotation_angle_deg(self.rotation)

    def extras(self) -> dict:
        """Entries for a registration's QC extras."""
        return {'pose_search': 'cube' if len(self.scores) > 1 else 'none',
                'pose_candidates': len(self.scores),
                'pose_candidate': int(self.index),
                'pose_angle_deg': round(self.angle_deg, 1),
                'pose_nmi': round(float(self.scores[self.index]), 5),
                'pose_nmi_identity': round(float(self.scores[0]), 5),
                'pose_search_time_s': round(self.time_s, 3)}


def _warp_to(fixed_conf, moving_conf, mat: np.ndarray) -> torch.Tensor:
    """The moving conformed tensor resampled on the fixed conformed grid through ``mat``
    (``[3, 4]``, fixed mm -> moving mm): the moving grid seen from fixed space has the
    voxel-to-world matrix ``mat^-1 @ moving.vox2ras``."""
    from .network import _sample

    t = np.eye(4)
    t[:3] = mat
    return _sample(moving_conf.tensor, np.linalg.inv(t) @ moving_conf.vox2ras,
                   fixed_conf.tensor.shape[2:], fixed_conf.vox2ras)


def search_pose(model, fixed_detection: dict, conformer, fit: str = 'affine',
                candidates: str = 'cube', index=None, batch: int = 8) -> PoseSearch:
    """Detect the moving keypoints on each candidate orientation of the detector grid and keep
    the one whose closed-form fit (``fit``: ``'rigid'`` or ``'affine'``) to the fixed keypoints
    gives the highest NMI (see the module docstring).

    ``fixed_detection``: the fixed image's detection; ``conformer``: the moving image's
    :class:`~keyprep.pipeline.keymorph.network.Conformer`; ``index``: keypoint subset used in the
    fit (default all); ``candidates``: ``'cube'`` (24) or ``'none'``."""
    from .aligners import fit_affine, fit_rigid
    from .network import pair_weights

    if candidates not in POSE_SEARCH:
        raise ValueError(f'pose search must be one of {POSE_SEARCH}, not {candidates!r}')
    t0 = time.perf_counter()
    rots = cube_rotations() if candidates == 'cube' else np.eye(3)[None]
    confs = [conformer.grid(None if i == 0 else r) for i, r in enumerate(rots)]
    dets = model.detect_batch(confs, batch)
    if len(dets) == 1:
        return PoseSearch(dets[0], 0, rots[0], [float('nan')], time.perf_counter() - t0)
    fconf = fixed_detection['conformed']
    sel = slice(None) if index is None else index
    src = torch.as_tensor(fixed_detection['points_mm'][sel], dtype=torch.float64)
    fitter = fit_rigid if fit == 'rigid' else fit_affine
    weighted = model.cfg.weighted != 'none'
    fmask = fconf.tensor > 0
    scores = []
    for det in dets:
        dst = torch.as_tensor(det['points_mm'][sel], dtype=torch.float64)
        w = pair_weights(torch.as_tensor(fixed_detection['weights'][sel]),
                         torch.as_tensor(det['weights'][sel])) if weighted else None
        mat = fitter(src, dst, w).numpy()
        if not np.isfinite(mat).all():
            scores.append(float('-inf'))
            continue
        warped = _warp_to(fconf, det['conformed'], mat)
        scores.append(normalised_mutual_information(fconf.tensor, warped, fmask | (warped > 0)))
    best = int(np.argmax(scores))
    return PoseSearch(dets[best], best, rots[best], scores, time.perf_counter() - t0)
