"""Derivative file names: the living specification of keyprep's output layout.

Names are built with pybids' ``build_path`` from the entities of the raw source file,
with patterns that extend the NiPreps ones (``seg-`` and ``desc-`` on anatomical
transforms, ``.nii.gz`` displacement fields, a ``qc`` suffix for the QC tables).

>>> src = 'sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz'
>>> derivative_name(src, desc='preproc', extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-preproc_T1w.nii.gz'
>>> derivative_name(src, desc='brain', suffix='mask', extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-brain_mask.nii.gz'
>>> derivative_name(src, seg='tissue', suffix='dseg', extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_seg-tissue_dseg.nii.gz'
>>> derivative_name(src, **{'from': 'T1w', 'to': 'MNI152NLin2009aSym'}, mode='image',
...                 desc='antsSyN', suffix='xfm', extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_from-T1w_to-MNI152NLin2009aSym_mode-image_desc-antsSyN_xfm.nii.gz'
>>> derivative_name(src, space='MNI152NLin2009aSym', seg='tissue', desc='antsSyN',
...                 suffix='dseg', extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_space-MNI152NLin2009aSym_seg-tissue_desc-antsSyN_dseg.nii.gz'
>>> derivative_name(src, seg='synthseg', suffix='dseg', extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_seg-synthseg_dseg.nii.gz'
>>> derivative_name(src, space='MNI152NLin2009aSym', desc='antsSyN', suffix='jacobian',
...                 extension='.nii.gz')
'sub-01/ses-1/anat/sub-01_ses-1_run-1_space-MNI152NLin2009aSym_desc-antsSyN_jacobian.nii.gz'
>>> derivative_name(src, datatype='figures', desc='antsSyN', space='MNI152NLin2009aSym',
...                 extension='.png')
'sub-01/figures/sub-01_ses-1_run-1_space-MNI152NLin2009aSym_desc-antsSyN_T1w.png'

Derivatives of a T2w, PDw or FLAIR image whose suffix no longer names the contrast (masks,
label maps, Jacobian maps and their figures) carry it in an entity, so that the images of
one participant never share a file name: ``space-<contrast>`` on the image's own grid,
``from-<contrast>`` next to the target's ``space-`` (the T1w's names are unchanged):

>>> t2 = 'sub-01/anat/sub-01_T2w.nii.gz'
>>> derivative_name(t2, desc='brain', suffix='mask', extension='.nii.gz')
'sub-01/anat/sub-01_space-T2w_desc-brain_mask.nii.gz'
>>> derivative_name(t2, seg='synthseg', suffix='dseg', extension='.nii.gz')
'sub-01/anat/sub-01_space-T2w_seg-synthseg_dseg.nii.gz'
>>> derivative_name(t2, space='MNI152NLin2009aSym', seg='synthseg', desc='antsSyN',
...                 suffix='dseg', extension='.nii.gz')
'sub-01/anat/sub-01_from-T2w_space-MNI152NLin2009aSym_seg-synthseg_desc-antsSyN_dseg.nii.gz'
>>> derivative_name(t2, space='MNI152NLin2009aSym', desc='antsSyN', extension='.nii.gz')
'sub-01/anat/sub-01_space-MNI152NLin2009aSym_desc-antsSyN_T2w.nii.gz'
>>> derivative_name('sub-01/anat/sub-01_echo-2_T1w.nii.gz', desc='brain', suffix='mask',
...                 extension='.nii.gz')
'sub-01/anat/sub-01_echo-2_desc-brain_mask.nii.gz'

QC tables, one per participant (and session):

>>> qc_table_name('01', '1', 'registration')
'sub-01/ses-1/anat/sub-01_ses-1_desc-registration_qc.tsv'
>>> qc_table_name('01', None, 'registrationsummary')
'sub-01/anat/sub-01_desc-registrationsummary_qc.tsv'
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ['PATTERNS', 'bids_uri', 'derivative_name', 'qc_table_name', 'source_entities',
           'target_figure_name', 'target_stem']

_ENTITIES = ('[_ses-{session}][_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}]'
             '[_run-{run}][_echo-{echo}][_part-{part}][_chunk-{chunk}]'
             '[_from-{from}][_to-{to}][_mode-{mode}][_space-{space}][_seg-{seg}]'
             '[_desc-{desc}]')

#: Contrasts of the raw images keyprep processes.
CONTRASTS = ('T1w', 'T2w', 'PDw', 'FLAIR')

#: The contrast whose derivatives need no entity for it (the anatomical reference, as in
#: the NiPreps).
REFERENCE_CONTRAST = 'T1w'

PATTERNS = [
    'sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}' + _ENTITIES
    + '_{suffix<T1w|T2w|PDw|FLAIR|mask|dseg|probseg|xfm|jacobian|qc>}'
      '{extension<.nii|.nii.gz|.json|.txt|.h5|.tsv>}',
    'sub-{subject}/{datatype<figures>}/sub-{subject}' + _ENTITIES
    + '_{suffix<T1w|T2w|PDw|FLAIR|mask|dseg|jacobian|qc>}{extension<.png|.svg|.html|.json>}',
]


def source_entities(source_file: str | Path) -> dict:
    """BIDS entities of a raw file name (subject, session, acquisition, run, suffix...)."""
    return dict(_parsed_entities(str(source_file)))


@functools.lru_cache(maxsize=4096)
def _parsed_entities(source_file: str) -> tuple:
    from bids.layout import parse_file_entities

    ents = parse_file_entities(source_file)
    ents.pop('extension', None)
    ents.setdefault('datatype', 'anat')
    return tuple(ents.items())


def derivative_name(source_file: str | Path, **entities) -> str:
    """Relative path of a derivative of ``source_file`` with ``entities`` overriding the
    source's (``None`` removes an entity)."""
    from bids.layout.writing import build_path

    ents = source_entities(source_file)
    contrast = ents.get('suffix')
    for key, value in entities.items():
        if value is None:
            ents.pop(key, None)
        else:
            ents[key] = value
    if ents.get('datatype') != 'figures':
        ents['datatype'] = 'anat'
    _name_contrast(ents, contrast)
    for key in ('space', 'desc', 'seg', 'from', 'to'):
        if key in ents and not re.fullmatch(r'[A-Za-z0-9]+', str(ents[key])):
            raise ValueError(f'entity {key}-{ents[key]} is not a BIDS alphanumeric label')
    path = build_path(ents, PATTERNS, strict=False)
    if path is None:
        raise ValueError(f'no derivative pattern matches entities {ents}')
    return path


def _name_contrast(ents: dict, contrast: str | None) -> None:
    """Put the source's contrast into ``ents`` when the suffix no longer carries it (see the
    module docstring): ``space-<contrast>`` without a space, else ``from-<contrast>``."""
    if (contrast not in CONTRASTS or contrast == REFERENCE_CONTRAST
            or ents.get('suffix') in (contrast, 'xfm', 'qc')):
        return
    if 'space' not in ents:
        ents['space'] = contrast
    elif 'from' not in ents and ents['space'] != contrast:
        ents['from'] = contrast


def qc_table_name(subject: str, session: str | None, desc: str, extension: str = '.tsv') -> str:
    """Relative path of a participant's QC table."""
    ses = f'_ses-{session}' if session else ''
    ses_dir = f'/ses-{session}' if session else ''
    return f'sub-{subject}{ses_dir}/anat/sub-{subject}{ses}_desc-{desc}_qc{extension}'


def target_stem(name: str, resolution: float | None = None) -> str:
    """Relative path stem of the target's files (``tpl-<name>/tpl-<name>[_res-N]``).

    >>> target_stem('MNI152NLin2009aSym', 4.0)
    'tpl-MNI152NLin2009aSym/tpl-MNI152NLin2009aSym_res-4'
    >>> target_stem('sub01', 1.5)
    'tpl-sub01/tpl-sub01_res-1p5'
    """
    res = f'_res-{resolution:g}'.replace('.', 'p') if resolution else ''
    return f'tpl-{name}/tpl-{name}{res}'


def target_figure_name(name: str, resolution: float | None = None) -> str:
    """Relative path of the figure of the target's labels (label network).

    >>> target_figure_name('MNI152NLin2009aSym', 4.0)
    'tpl-MNI152NLin2009aSym/figures/tpl-MNI152NLin2009aSym_res-4_desc-synthseg_dseg.png'
    """
    folder, base = target_stem(name, resolution).split('/')
    return f'{folder}/figures/{base}_desc-synthseg_dseg.png'


def bids_uri(path: str | Path, bids_dir: str | Path, dataset: str = 'raw') -> str:
    """A BIDS URI (``bids:raw:sub-01/anat/...``) for a file of the input dataset.

    >>> bids_uri('/data/ds/sub-01/anat/sub-01_T1w.nii.gz', '/data/ds')
    'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    """
    return f'bids:{dataset}:{Path(path).relative_to(bids_dir).as_posix()}'
