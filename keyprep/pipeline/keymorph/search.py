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

``candidates='labels'`` (the engines' default when both images have structure labels): the
head's pose has already been found once per image by keyprep's label network (its own pose
handling and self-check), so it is not searched again. A similarity map is fitted in closed form
to the centroids (world mm) of the structures both label maps share (:func:`label_pose`),
and the moving keypoints are detected ONCE, on the detector grid turned by that rotation.
When a label map is missing or the centroid fit is implausible (too few structures, large
residual, a scale far from 1) the engine falls back to the cube search.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ['POSE_SEARCH', 'LabelPose', 'PoseSearch', 'cube_rotations', 'label_centroids',
           'label_pose', 'normalised_mutual_information', 'rotation_angle_deg', 'search_pose']

#: Values of the engines' ``pose_search`` parameter.
POSE_SEARCH = ('none', 'cube', 'labels')

#: Structures not used by :func:`label_pose`: background and extra-cerebral CSF (its extent
#: depends on the skull stripping, not on the head's pose).
LABEL_POSE_IGNORE = (0, 24)
#: A structure is used by :func:`label_pose` when it has at least this volume (mm^3) in both
#: label maps (small or barely present structures have noisy centroids).
LABEL_POSE_MIN_MM3 = 200.0
#: The centroid fit is trusted with at least this many structures...
LABEL_POSE_MIN_STRUCTURES = 8
#: ... a mean residual (mm) of the similarity fit below this...
LABEL_POSE_MAX_RESIDUAL_MM = 8.0
#: ... and a similarity scale within this range. Measured on the inter-subject benchmark's
#: held-out brains (label network's labels, 18 rotated pairs, 2 mm): right poses (rotation
#: error 1-2 deg) fitted with residuals of 1.6-3.5 mm and scales 0.94-1.06; the two wrong
#: ones (a 90 deg head the label network labelled in its header pose, rotation error about
#: 100 deg) with 11.0 and 12.5 mm and scales 0.74 and 0.69, which the earlier bounds (12 mm,
#: 0.6-1.6) let through.
LABEL_POSE_SCALE_RANGE = (0.8, 1.25)


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

    #: ``'cube'``, ``'none'`` or ``'labels'``.
    mode: str = ''
    #: With ``mode='labels'``: the centroid fit (:class:`LabelPose`); with a fallback to the
    #: cube: why the labels were not used.
    label_fit: 'LabelPose | None' = None
    fallback: str = ''

    @property
    def angle_deg(self) -> float:
        return rotation_angle_deg(self.rotation)

    def extras(self) -> dict:
        """Entries for a registration's QC extras."""
        mode = self.mode or ('cube' if len(self.scores) > 1 else 'none')
        out = {'pose_search': mode,
               'pose_candidates': len(self.scores),
               'pose_candidate': int(self.index),
               'pose_angle_deg': round(self.angle_deg, 1)}
        if mode == 'cube':
            out.update({'pose_nmi': round(float(self.scores[self.index]), 5),
                        'pose_nmi_identity': round(float(self.scores[0]), 5)})
        if self.label_fit is not None:
            out.update(self.label_fit.extras())
        if self.fallback:
            out['pose_labels_fallback'] = self.fallback
        out['pose_search_time_s'] = round(self.time_s, 3)
        return out


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

    if candidates not in ('none', 'cube'):
        raise ValueError(f"pose search must be 'none' or 'cube' here, not {candidates!r} "
                         '(labels: pose_from_labels)')
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


# ---------------------------------------------------------------------------- labels
def label_centroids(labels, min_mm3: float = LABEL_POSE_MIN_MM3,
                    ignore=LABEL_POSE_IGNORE) -> dict[int, tuple[np.ndarray, float]]:
    """``{label: (centroid in world mm [3], volume mm^3)}`` of the structures of a label map
    (a nibabel image on any grid) with at least ``min_mm3``, less ``ignore``."""
    data = np.asarray(labels.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    if not np.issubdtype(data.dtype, np.integer):  # float label maps: NaN is background
        data = np.rint(np.nan_to_num(data, nan=0.0))
    aff = np.asarray(labels.affine, dtype=float)
    voxel_mm3 = abs(float(np.linalg.det(aff[:3, :3])))
    ijk = np.nonzero(data > 0)  # labelled voxels only: a brain is a few % of a head's grid
    if not ijk[0].size:
        return {}
    lab = data[ijk].astype(np.int64)
    counts = np.bincount(lab)
    # voxel-index sums per label, then the centroid in world mm
    sums = np.stack([np.bincount(lab, weights=i.astype(np.float64), minlength=counts.size)
                     for i in ijk], axis=1)
    out = {}
    for v in np.nonzero(counts)[0]:
        if int(v) in ignore or counts[v] * voxel_mm3 < min_mm3:
            continue
        c = sums[v] / counts[v]
        out[int(v)] = (aff[:3, :3] @ c + aff[:3, 3], float(counts[v] * voxel_mm3))
    return out


@dataclass
class LabelPose:
    """A similarity map ``moving_mm = scale * R @ fixed_mm + t`` fitted to the centroids of
    the structures shared by two label maps (:func:`label_pose`)."""

    rotation: np.ndarray
    scale: float
    translation: np.ndarray
    residual_mm: float
    structures: list[int]
    time_s: float = 0.0
    #: Why the fit is not trusted (empty when it is).
    problem: str = ''
    #: The fitted centroids (world mm, ``[len(structures), 3]``) of the fixed and the moving
    #: label map, and their normalised weights (cube root of the smaller volume, sum 1): the
    #: anatomical keypoints of the KeyMorph engines' ``keypoint_source`` ``labels``/``both``.
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    point_weights: np.ndarray | None = None

    @property
    def plausible(self) -> bool:
        return not self.problem

    @property
    def matrix(self) -> np.ndarray:
        """``[3, 4]`` fixed mm -> moving mm."""
        return np.concatenate([self.scale * self.rotation, self.translation[:, None]], axis=1)

    def extras(self) -> dict:
        return {'pose_label_residual_mm': round(float(self.residual_mm), 3),
                'pose_label_structures': len(self.structures),
                'pose_label_structure_list': ' '.join(str(v) for v in self.structures),
                'pose_label_scale': round(float(self.scale), 4),
                'pose_label_angle_deg': round(rotation_angle_deg(self.rotation), 1),
                'pose_label_fit_time_s': round(self.time_s, 3)}


def label_pose(fixed_labels, moving_labels, min_mm3: float = LABEL_POSE_MIN_MM3) -> LabelPose:
    """Fit ``moving_mm ~ s R fixed_mm + t`` in closed form (weighted Procrustes with a scale,
    :func:`~keyprep.pipeline.keymorph.aligners.fit_rigid` on the centroids) to the centroids
    of the structures present in both label maps (nibabel images, FreeSurfer numbering; any
    grids), each weighted by the cube root of its smaller volume (large structures have
    steadier centroids). The fit's ``problem`` says why it is not to be trusted: fewer than
    :data:`LABEL_POSE_MIN_STRUCTURES` shared structures, a mean residual above
    :data:`LABEL_POSE_MAX_RESIDUAL_MM` or a scale outside :data:`LABEL_POSE_SCALE_RANGE`."""
    from .aligners import fit_rigid

    t0 = time.perf_counter()
    fc, mc = label_centroids(fixed_labels, min_mm3), label_centroids(moving_labels, min_mm3)
    shared = sorted(set(fc) & set(mc))
    eye = np.eye(3)
    if len(shared) < max(3, LABEL_POSE_MIN_STRUCTURES):
        return LabelPose(eye, 1.0, np.zeros(3), float('nan'), shared,
                         time.perf_counter() - t0,
                         f'{len(shared)} structures shared by the two label maps '
                         f'(at least {LABEL_POSE_MIN_STRUCTURES} needed)')
    src = np.stack([fc[k][0] for k in shared])
    dst = np.stack([mc[k][0] for k in shared])
    w = np.cbrt(np.minimum([fc[k][1] for k in shared], [mc[k][1] for k in shared]))
    w = w / w.sum()
    mat = fit_rigid(torch.as_tensor(src), torch.as_tensor(dst), torch.as_tensor(w)).numpy()
    rot = mat[:, :3]
    sc, dc = w @ src, w @ dst
    xs, xd = src - sc, dst - dc
    scale = float((w * ((xs @ rot.T) * xd).sum(1)).sum() / max((w * (xs ** 2).sum(1)).sum(), 1e-9))
    t = dc - scale * rot @ sc
    resid = float(np.linalg.norm(scale * src @ rot.T + t - dst, axis=1) @ w)
    problem = ''
    lo, hi = LABEL_POSE_SCALE_RANGE
    if not np.isfinite(resid) or resid > LABEL_POSE_MAX_RESIDUAL_MM:
        problem = (f'centroid residual {resid:.1f} mm (at most {LABEL_POSE_MAX_RESIDUAL_MM:g} '
                   'mm trusted)')
    elif not lo <= scale <= hi:
        problem = f'centroid scale {scale:.2f} outside {lo:g}-{hi:g}'
    return LabelPose(rot, scale, t, resid, shared, time.perf_counter() - t0, problem,
                     src, dst, w)


def pose_from_labels(model, conformer, fit: LabelPose) -> PoseSearch:
    """The moving keypoints detected once, on the detector grid turned by the centroid fit's
    rotation (see the module docstring): ``candidates=1``."""
    t0 = time.perf_counter()
    det = model.detect_batch([conformer.grid(fit.rotation)], 1)[0]
    return PoseSearch(det, 0, np.asarray(fit.rotation, dtype=float), [float('nan')],
                      time.perf_counter() - t0 + fit.time_s, mode='labels', label_fit=fit)
