"""Registration targets: the bundled template, a user NIfTI, or a subject of the dataset.

The default target, ``MNI152NLin2009aSym``, is the ICBM 2009a nonlinear symmetric T1w
template (already brain-extracted, 1 mm) read from the files that the ``nilearn``
package ships, so it needs no download. ``:res-N`` resamples it to N mm.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from .errors import MissingInputError, UsageError

__all__ = ['GROUPWISE_NAME', 'TEMPLATES', 'TargetSpec', 'parse_target', 'resample_isotropic',
           'template_file', 'MRICRON_DIR', 'mricron_file']

#: Templates bundled through packaged files. Keys are TemplateFlow identifiers.
TEMPLATES: dict[str, dict] = {
    'MNI152NLin2009aSym': {
        'package': 'nilearn',
        'files': {
            'T1w': 'datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz',
            'GM': 'datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz',
            'WM': 'datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz',
        },
        'brain_extracted': True,
        'description': 'ICBM 2009a Nonlinear Symmetric T1w template (Fonov et al. 2009, 2011)',
        'citation': 'fonov2011',
    },
}


@dataclass(frozen=True)
class TargetSpec:
    """What ``--target`` resolved to.

    Attributes
    ----------
    kind
        ``'template'``, ``'file'``, ``'subject'`` or ``'groupwise'`` (a keypoint-mean
        template of the participants of the run, built by the workflow).
    name
        The BIDS label used in ``to-``/``space-`` entities (alphanumeric).
    path
        The image file (``None`` for a subject until the dataset is queried).
    subject
        For ``kind == 'subject'``, the participant label (no ``sub-``).
    resolution
        Isotropic resampling in mm, or ``None`` to keep the native grid.
    """

    kind: str
    name: str
    path: Path | None = None
    subject: str | None = None
    resolution: float | None = None

    @property
    def brain_extracted(self) -> bool | None:
        """True when the target is known to be brain-only (``None``: detect)."""
        if self.kind == 'template':
            return TEMPLATES[self.name]['brain_extracted']
        if self.kind == 'groupwise':
            return True
        return None


#: Name (``tpl-`` label) of the ``--target groupwise`` template.
GROUPWISE_NAME = 'keyprepGroupwise'

#: Colin27, its brain masks and the MNI-space atlases of Debian's ``mricron-data``.
MRICRON_DIR = Path(os.environ.get('KEYPREP_MRICRON_DIR', '/usr/share/mricron/templates'))


def mricron_file(name: str) -> Path:
    """A file of ``mricron-data`` (Colin27 ``ch2*.nii.gz``, ``aal.nii.gz``, ``jhu189.nii.gz``...);
    a clear error where the package is not installed."""
    path = MRICRON_DIR / name
    if not path.exists():
        raise MissingInputError(f'{path} not found: install the Debian package mricron-data '
                                '(scripts/install.sh does)')
    return path


def template_file(name: str, which: str = 'T1w') -> Path:
    """Path of a bundled template file.

    >>> template_file('MNI152NLin2009aSym').name
    'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'
    """
    import importlib

    try:
        entry = TEMPLATES[name]
    except KeyError:
        raise UsageError(f'unknown template {name!r}; bundled: {", ".join(TEMPLATES)}') from None
    pkg = importlib.import_module(entry['package'])
    path = Path(pkg.__file__).parent / entry['files'][which]
    if not path.exists():
        raise MissingInputError(
            f'template file missing: {path} (reinstall the {entry["package"]} package)')
    return path


def parse_target(spec: str) -> TargetSpec:
    """Parse the ``--target`` option.

    >>> parse_target('MNI152NLin2009aSym')
    TargetSpec(kind='template', name='MNI152NLin2009aSym', path=PosixPath('...'), subject=None, resolution=None)
    >>> parse_target('MNI152NLin2009aSym:res-2').resolution
    2.0
    >>> parse_target('sub-03')
    TargetSpec(kind='subject', name='sub03', path=None, subject='03', resolution=None)
    >>> parse_target('groupwise:res-2')
    TargetSpec(kind='groupwise', name='keyprepGroupwise', path=None, subject=None, resolution=2.0)
    """
    spec = spec.strip()
    resolution = None
    m = re.match(r'^(.*?):res-([0-9.]+)$', spec)
    if m:
        spec, resolution = m.group(1), float(m.group(2))
        if not 0.2 <= resolution <= 10:
            raise UsageError(f'target resolution {resolution} mm is outside 0.2-10 mm')
    if spec in TEMPLATES:
        return TargetSpec('template', spec, template_file(spec), None, resolution)
    if spec == 'groupwise':
        return TargetSpec('groupwise', GROUPWISE_NAME, None, None, resolution)
    m = re.match(r'^sub-([A-Za-z0-9]+)$', spec)
    if m:
        return TargetSpec('subject', f'sub{m.group(1)}', None, m.group(1), resolution)
    path = Path(spec).expanduser()
    if path.suffix in ('.nii', '.gz') or path.exists() or '/' in spec:
        if not path.exists():
            raise MissingInputError(f'target image not found: {path}')
        if not path.is_file():
            raise MissingInputError(f'target is not a file: {path}')
        stem = path.name.split('.')[0]
        label = re.sub(r'[^A-Za-z0-9]', '', stem) or 'custom'
        return TargetSpec('file', label, path.resolve(), None, resolution)
    raise UsageError(
        f'--target {spec!r} is neither a bundled template ({", ".join(TEMPLATES)}), '
        'a NIfTI file, sub-<label>, nor groupwise')


def resample_isotropic(img: nb.Nifti1Image, resolution: float, order: int = 1) -> nb.Nifti1Image:
    """Resample an image to isotropic voxels of ``resolution`` mm covering the same field of view.

    >>> img = nb.Nifti1Image(np.ones((10, 10, 10), 'f4'), np.eye(4))
    >>> [float(z) for z in resample_isotropic(img, 2.0).header.get_zooms()]
    [2.0, 2.0, 2.0]
    """
    from nibabel.processing import resample_to_output

    out = resample_to_output(img, voxel_sizes=(resolution,) * 3, order=order, mode='constant',
                             cval=float(np.min(np.asanyarray(img.dataobj))))
    return nb.Nifti1Image(np.asanyarray(out.dataobj).astype(np.float32), out.affine)
