"""Synthetic images of real label maps for registration benchmarks, with exact labels.

A label map is skull-stripped (:func:`brain_label_map`), synthesised with a named contrast
on an axis-aligned grid centred on its brain centre (:func:`synthesise`), and turned about
that centre (:func:`rotate`) by a seeded rotation of a given angle (:func:`draw_rotation`);
the labels of the turned image are sampled from the turned label map itself, so the ground
truth of a registration is exact. Used by ``benchmarks/run_intersubject_benchmark.py`` (its
protocol is in ``benchmarks/README.md``) and by the keypoint analysis
(:mod:`keyprep.pipeline.keymorph.keypoint_analysis`) through it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from pathlib import Path

import nibabel as nb
import numpy as np

from .. import perturb as pt
from ..io import make_image
from .labels import GENERATION_TO_OUTPUT, OUTPUT_LABELS, TISSUE_OF_GENERATION

__all__ = ['CSF_SHELL_MM', 'MARGIN_MM', 'brain_label_map', 'crc32', 'draw_rotation',
           'fitting_shape', 'rotate', 'rotated_label_map', 'synthesise']


#: Extra-cerebral CSF farther than this from every brain structure is removed (the SynthSeg
#: maps label CSF down the spinal canal; a skull-stripped image keeps a thin shell).
CSF_SHELL_MM = 5.0


#: Background margin around the brain on every synthetic grid.
MARGIN_MM = 6.0


def crc32(text: str) -> int:
    """A stable integer of a string (seeds that do not change between runs)."""
    return zlib.crc32(text.encode())


def brain_label_map(path: Path, shell_mm: float = CSF_SHELL_MM):
    """A SynthSeg label map, skull-stripped: extra-cerebral classes removed, and the
    extra-cerebral CSF kept only within ``shell_mm`` of a brain structure."""
    from scipy import ndimage as ndi

    from .generator import LabelMap, load_label_map

    lm = load_label_map(path)
    tissue = np.array([TISSUE_OF_GENERATION.get(lab, 'extra') for lab in lm.labels])
    keep = ~np.isin(tissue, ('extra', 'background'))
    csf = np.array([GENERATION_TO_OUTPUT.get(lab) == 24 for lab in lm.labels])
    core = (keep & ~csf)[lm.index]
    if not core.any():
        raise ValueError(f'{path}: no brain structure in the label map')
    dist = ndi.distance_transform_edt(~core, sampling=np.linalg.norm(lm.affine[:3, :3], axis=0))
    index = lm.index.copy()
    index[~keep[index]] = 0
    index[csf[index] & (dist > shell_mm)] = 0
    return LabelMap(index=index, affine=lm.affine, name=lm.name, labels=lm.labels)


def draw_rotation(seed: int, moving: str, fixed: str, level: float
                  ) -> tuple[np.ndarray, str, np.ndarray]:
    """The rotation of the moving image for one pair of subjects and one level.

    The paper chooses 1 to 3 rotation axes at random; here the number of coordinate axes
    involved is uniform in {1, 2, 3}, the axes themselves are drawn without replacement, and
    the rotation axis is a random direction (normal components) in their span, so the
    rotation turns by exactly ``level`` degrees (Euler angles of ``level`` about several axes
    would not: three 180 degree turns about x, y and z give the identity). Seeded by
    ``(seed, moving, fixed, level)`` only, so every contrast pair of two subjects sees the
    same rotation. Returns ``(R [3, 3], axes, unit axis)``.

    >>> r, axes, _ = draw_rotation(0, 'a', 'b', 135.0)
    >>> round(pt.describe_similarity(np.pad(r, ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1]))
    ...       ['angle_deg'], 6)
    135.0
    >>> draw_rotation(0, 'a', 'b', 0.0)[1]
    '-'
    """
    if level == 0:
        return np.eye(3), '-', np.array([0.0, 0.0, 1.0])
    rng = np.random.default_rng([int(seed), crc32(moving), crc32(fixed), int(round(level * 1000))])
    n_axes = int(rng.integers(1, 4))
    axes = np.sort(rng.choice(3, size=n_axes, replace=False))
    direction = np.zeros(3)
    while np.linalg.norm(direction) < 1e-6:
        direction[axes] = rng.normal(size=n_axes)
    direction /= np.linalg.norm(direction)
    return pt.rotation_about_axis(direction, level), ''.join('xyz'[a] for a in axes), direction


def rotated_label_map(lm, rotation: np.ndarray | None):
    """The label map turned by ``rotation`` about its brain centre (exact: only its
    voxel-to-world matrix changes)."""
    from .generator import LabelMap

    if rotation is None or np.allclose(rotation, np.eye(3)):
        return lm
    motion = pt.similarity_matrix(rotation, center=lm.centre_mm)
    return LabelMap(index=lm.index, affine=motion @ lm.affine, name=lm.name, labels=lm.labels,
                    centre_mm=np.asarray(lm.centre_mm, dtype=float))


def fitting_shape(lm, resolution: float, margin_mm: float = MARGIN_MM) -> tuple[int, int, int]:
    """An odd grid shape, centred on the brain centre, that holds the label map's brain."""
    ijk = np.argwhere(lm.index[::2, ::2, ::2] > 0).astype(float) * 2
    world = ijk @ lm.affine[:3, :3].T + lm.affine[:3, 3] - np.asarray(lm.centre_mm)
    half = np.abs(world).max(axis=0) + margin_mm + 2.0  # 2 mm: the subsampling
    return tuple(int(2 * math.ceil(h / resolution) + 1) for h in half)


def synthesise(lm, contrast: str, resolution: float, generator_seed: int
               ) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """One skull-stripped synthetic image of ``lm`` with a named contrast, and its labels.

    The synthesis engine runs without spatial augmentation (``SynthConfig.evaluation``);
    intensities follow its model for a fixed contrast (tissue means with a small jitter,
    Gaussian noise per label, bias field, gamma, additive noise), no acquisition-resolution
    change. The grid is axis-aligned, centred on the brain centre (world origin), at
    ``resolution`` mm.
    """
    import torch

    from .generator import SynthConfig, Synthesizer, grid_affine

    shape = fitting_shape(lm, resolution)
    cfg = replace(SynthConfig(shape=shape, res_mm=resolution).evaluation(contrast),
                  skull_strip_prob=1.0)
    sample = Synthesizer([lm], cfg).synthesize(0, torch.Generator().manual_seed(generator_seed))
    affine = grid_affine(shape, resolution)
    labels = np.asarray(OUTPUT_LABELS, dtype=np.uint8)[sample['labels'].cpu().numpy()]
    return (make_image(sample['image'].cpu().numpy().astype(np.float32), affine),
            make_image(labels, affine))


def rotate(image: nb.Nifti1Image, lm, rotation: np.ndarray, resolution: float
           ) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """A synthetic image of ``lm`` (from :func:`synthesise`) turned by ``rotation`` about the
    brain centre (the world origin), and its exact labels.

    The image is resampled (linear) onto an axis-aligned grid, centred on the origin, that
    holds the turned brain; the labels are sampled (nearest neighbour) from the turned label
    map itself, as :func:`synthesise` samples the unturned one, so the ground truth gets no
    extra interpolation.
    """
    from .generator import grid_affine

    motion = np.eye(4)
    motion[:3, :3] = rotation
    shape = fitting_shape(rotated_label_map(lm, rotation), resolution)
    grid = pt.Grid(shape, grid_affine(shape, resolution))
    data = pt.resample(np.asanyarray(image.dataobj), image.affine, grid,
                       pt.KnownTransform(motion), order=1)
    to_output = np.array([GENERATION_TO_OUTPUT[lab] for lab in lm.labels], dtype=np.uint8)
    centred = np.array(lm.affine, dtype=float)
    centred[:3, 3] -= np.asarray(lm.centre_mm)
    labels = pt.resample(to_output[lm.index], centred, grid, pt.KnownTransform(motion), order=0)
    return make_image(data.astype(np.float32), grid.affine), make_image(labels, grid.affine)
