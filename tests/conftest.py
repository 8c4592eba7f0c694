"""Shared fixtures: small real images (Colin27 from Debian's mricron-data) on coarse grids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')

MRICRON = Path('/usr/share/mricron/templates')
CH2 = MRICRON / 'ch2.nii.gz'
CH2BET = MRICRON / 'ch2bet.nii.gz'


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f'{path} is missing: install Debian package mricron-data '
                    '(scripts/install.sh does)')
    return path


def coarse(path: Path, resolution: float) -> nb.Nifti1Image:
    """A real image resampled to ``resolution`` mm (float32, RAS)."""
    from keyprep.pipeline.io import conform, load_image
    from keyprep.pipeline.targets import resample_isotropic

    return conform(resample_isotropic(conform(load_image(_require(path))), resolution))


def rotated_copy(img: nb.Nifti1Image, angle_deg: float, axis: int = 2,
                 shift=(0.0, 0.0, 0.0)) -> nb.Nifti1Image:
    """The same voxels with a rotated (and shifted) affine: a known rigid motion."""
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    rot = np.eye(4)
    i, j = [k for k in range(3) if k != axis]
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    center = img.affine @ np.r_[(np.array(img.shape[:3]) - 1) / 2.0, 1.0]
    to_c, back = np.eye(4), np.eye(4)
    to_c[:3, 3] = -center[:3]
    back[:3, 3] = center[:3] + np.asarray(shift)
    aff = back @ rot @ to_c @ img.affine
    out = nb.Nifti1Image(np.asanyarray(img.dataobj), aff)
    out.set_qform(aff, 1)
    out.set_sform(aff, 1)
    return out


@pytest.fixture(scope='session')
def small_brains(tmp_path_factory) -> dict[str, Path]:
    """Fixed = Colin27 brain at 4 mm; moving = the same brain rotated 12 deg and shifted."""
    root = tmp_path_factory.mktemp('brains')
    fixed = coarse(CH2BET, 4.0)
    moving = rotated_copy(fixed, 12.0, axis=2, shift=(4.0, -3.0, 2.0))
    out = {'fixed': root / 'fixed.nii.gz', 'moving': root / 'moving.nii.gz'}
    fixed.to_filename(out['fixed'])
    moving.to_filename(out['moving'])
    return out


def write_bids(root: Path, subjects: dict[str, nb.Nifti1Image | bytes | None],
               name: str = 'test') -> Path:
    """A BIDS dataset with one T1w per subject (bytes: written raw, None: no anat)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / 'dataset_description.json').write_text(
        json.dumps({'Name': name, 'BIDSVersion': '1.9.0', 'DatasetType': 'raw'}))
    (root / 'participants.tsv').write_text(
        'participant_id\n' + ''.join(f'sub-{s}\n' for s in subjects))
    for sub, img in subjects.items():
        anat = root / f'sub-{sub}' / 'anat'
        anat.mkdir(parents=True, exist_ok=True)
        if img is None:  # a participant with diffusion data only
            anat.rmdir()
            dwi = root / f'sub-{sub}' / 'dwi'
            dwi.mkdir()
            nb.Nifti1Image(np.ones((4, 4, 4, 2), 'f4'), np.eye(4)).to_filename(
                dwi / f'sub-{sub}_dwi.nii.gz')
            # valid BIDS: the official validator requires the gradient files
            (dwi / f'sub-{sub}_dwi.bval').write_text('0 1000\n')
            (dwi / f'sub-{sub}_dwi.bvec').write_text('0 1\n0 0\n0 0\n')
            continue
        f = anat / f'sub-{sub}_T1w.nii.gz'
        if isinstance(img, bytes):
            f.write_bytes(img)
        else:
            img.to_filename(f)
        (anat / f'sub-{sub}_T1w.json').write_text('{}')
    return root


def train_tiny_keymorph(image: Path, out: Path, *, n_keypoints: int = 48, steps: int = 1000,
                        max_rotation_deg: float = 20.0, seed: int = 0) -> Path:
    """A small KeyMorph detector pretrained on ONE brain (about a minute on one CPU thread).

    KeyMorph's self-supervised keypoint pretraining (paper section 3.5) on a single image:
    ``n_keypoints`` target points spread over the brain (farthest-point sampling of its
    voxels on the detector grid); each step rotates (up to ``max_rotation_deg`` about a
    random axis) and shifts the conformed image, and the detector learns to put its
    keypoints where the same motion puts the targets. The result localises those points in
    rotated copies of this brain, which is what the registration tests need until the
    shipped weights exist; it is not a model for other brains.
    """
    import math

    import torch
    import torch.nn.functional as F

    from keyprep.pipeline.keymorph.keypoints import farthest_point_subset
    from keyprep.pipeline.keymorph.network import (
        FORMAT,
        DetectorConfig,
        KeypointDetector,
        conform,
    )

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = DetectorConfig(n_keypoints=n_keypoints, features=(8, 16, 16, 32),
                         pool_after=(1, 2, 3), res_mm=4.0, shape=(48, 48, 48))
    x0 = conform(nb.load(str(image)), cfg).tensor
    vox = np.argwhere(x0[0, 0].numpy() > 0.1).astype(float)
    targets = torch.as_tensor(vox[farthest_point_subset(vox, n_keypoints)], dtype=torch.float32)
    det = KeypointDetector(cfg)
    opt = torch.optim.Adam(det.parameters(), lr=2e-3)
    n = torch.tensor(cfg.shape, dtype=torch.float32)
    c = (n - 1) / 2
    ii = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in cfg.shape],
                                    indexing='ij'), -1)
    for step in range(steps):
        xs, ts = [], []
        for _ in range(2):
            axis = torch.randn(3, generator=gen)
            axis = axis / axis.norm()
            angle = float((torch.rand(1, generator=gen) * 2 - 1) * math.radians(max_rotation_deg))
            skew = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]],
                                 [-axis[1], axis[0], 0.0]])
            rot = torch.linalg.matrix_exp(skew * angle)
            shift = (torch.rand(3, generator=gen) * 2 - 1)
            src = (ii - c - shift) @ rot + c  # output voxel q samples rot^T (q - c - t) + c
            xs.append(F.grid_sample(x0, (2 * src / (n - 1) - 1).flip(-1)[None],
                                    align_corners=True))
            ts.append((targets - c) @ rot.T + c + shift)
        pred = det(torch.cat(xs))['points']
        loss = ((pred - torch.stack(ts)) ** 2).sum(-1).mean()
        for group in opt.param_groups:
            group['lr'] = 2e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'format': FORMAT, 'detector': cfg.to_dict(), 'state_dict': det.state_dict(),
                'note': 'tests/conftest.py: train_tiny_keymorph'}, out)
    return out


@pytest.fixture(scope='session')
def keymorph_weights(request, small_brains) -> Path:
    """A tiny detector pretrained on the fixed test brain (:func:`train_tiny_keymorph`,
    cached in pytest's cache folder).

    The engine tests check geometry (fits, exported transforms both ways, inverses, files)
    with a detector known to work on the test brain. The shipped weights are checked by
    ``tests/test_keymorph_network.py::test_shipped_weights`` and measured by the benchmark
    (their accuracy is in their model card), not used here: the undertrained shipped
    detector would make these tests measure the model instead of the engine."""
    from keyprep.pipeline.keymorph.network import FORMAT

    path = Path(request.config.cache.mkdir(f'keymorph-tiny-{FORMAT}-v1')) / 'tiny.pt'
    if not path.is_file():  # atomic: test workers (pytest-xdist) may train it at once
        part = path.with_name(f'{path.name}.{os.getpid()}.part')
        train_tiny_keymorph(small_brains['fixed'], part)
        os.replace(part, path)
    return path
