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
            continue
        f = anat / f'sub-{sub}_T1w.nii.gz'
        if isinstance(img, bytes):
            f.write_bytes(img)
        else:
            img.to_filename(f)
        (anat / f'sub-{sub}_T1w.json').write_text('{}')
    return root
