"""The label sets of keyprep's SynthSeg-style engine.

Two levels, as in SynthSeg:

* **generation labels**: the finest classes of a training label map. Each draws its own
  Gaussian intensity (left/right homologues share one, so a synthetic brain stays
  symmetric in contrast). They include extra-cerebral classes (skull, skin, fat, eyes...)
  and sub-classes that the network never has to predict.
* **output labels**: what the label network predicts and what keyprep's QC scores: the
  32 SynthSeg structures plus extra-cerebral CSF (SynthSeg 2.0's 33-entry list with
  background), in FreeSurfer numbering and names.

The mapping between them (:data:`GENERATION_TO_OUTPUT`) follows the SynthSeg protocol's
own tables (``synthseg_segmentation_labels``): lesions become white matter, vessels and
every extra-cerebral class become background, the ventricle sub-classes 136/137 and
163/164 become the lateral and inferior lateral ventricles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    'OUTPUT_LABELS', 'OUTPUT_NAMES', 'LR_PAIRS', 'GENERATION_LABELS', 'GENERATION_TO_OUTPUT',
    'TISSUE_OF_GENERATION', 'BRAIN_OUTPUT_LABELS', 'output_index', 'flip_lut', 'lut_tsv',
    'write_lut_tsv', 'relabel', 'generation_classes', 'STRUCTURE_GROUPS',
]

#: FreeSurfer label -> FreeSurfer LUT name, in SynthSeg 2.0 order (background first).
OUTPUT_NAMES: dict[int, str] = {
    0: 'Unknown',
    2: 'Left-Cerebral-White-Matter',
    3: 'Left-Cerebral-Cortex',
    4: 'Left-Lateral-Ventricle',
    5: 'Left-Inf-Lat-Vent',
    7: 'Left-Cerebellum-White-Matter',
    8: 'Left-Cerebellum-Cortex',
    10: 'Left-Thalamus',
    11: 'Left-Caudate',
    12: 'Left-Putamen',
    13: 'Left-Pallidum',
    14: '3rd-Ventricle',
    15: '4th-Ventricle',
    16: 'Brain-Stem',
    17: 'Left-Hippocampus',
    18: 'Left-Amygdala',
    24: 'CSF',
    26: 'Left-Accumbens-area',
    28: 'Left-VentralDC',
    41: 'Right-Cerebral-White-Matter',
    42: 'Right-Cerebral-Cortex',
    43: 'Right-Lateral-Ventricle',
    44: 'Right-Inf-Lat-Vent',
    46: 'Right-Cerebellum-White-Matter',
    47: 'Right-Cerebellum-Cortex',
    49: 'Right-Thalamus',
    50: 'Right-Caudate',
    51: 'Right-Putamen',
    52: 'Right-Pallidum',
    53: 'Right-Hippocampus',
    54: 'Right-Amygdala',
    58: 'Right-Accumbens-area',
    60: 'Right-VentralDC',
}
OUTPUT_LABELS: tuple[int, ...] = tuple(OUTPUT_NAMES)
#: Output labels inside the brain mask (everything but background).
BRAIN_OUTPUT_LABELS: tuple[int, ...] = OUTPUT_LABELS[1:]

#: Left label -> right label (FreeSurfer numbering); midline structures pair with themselves.
LR_PAIRS: dict[int, int] = {
    2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52,
    17: 53, 18: 54, 26: 58, 28: 60,
    # generation-only classes
    25: 57, 30: 62, 136: 163, 137: 164,
}

#: Coarser groups used for a compact QC summary (label -> group name).
STRUCTURE_GROUPS: dict[str, tuple[int, ...]] = {
    'cerebral-wm': (2, 41), 'cerebral-cortex': (3, 42), 'lateral-ventricles': (4, 5, 43, 44),
    'cerebellum': (7, 8, 46, 47), 'thalamus': (10, 49), 'caudate': (11, 50),
    'putamen': (12, 51), 'pallidum': (13, 52), 'hippocampus': (17, 53), 'amygdala': (18, 54),
    'accumbens': (26, 58), 'ventral-dc': (28, 60), 'brainstem': (16,),
    'ventricles-3-4': (14, 15), 'csf': (24,),
}

#: Generation labels of SynthSeg's training label maps (FreeSurfer numbering).
GENERATION_LABELS: tuple[int, ...] = (
    0, 14, 15, 16, 24, 72, 85, 502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530,
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 25, 26, 28, 30, 136, 137,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 163, 164,
)

_EXTRA_CEREBRAL = (72, 85, 502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530)

#: Generation label -> output label.
GENERATION_TO_OUTPUT: dict[int, int] = {lab: lab for lab in GENERATION_LABELS if lab in OUTPUT_NAMES}
GENERATION_TO_OUTPUT.update({lab: 0 for lab in _EXTRA_CEREBRAL})
GENERATION_TO_OUTPUT.update({25: 2, 57: 41, 30: 0, 62: 0, 136: 4, 137: 5, 163: 43, 164: 44})

#: Broad tissue type of each generation label, used to build contrast-specific test images
#: (T1-, T2-, PD-, FLAIR-like) from known tissue intensities.
TISSUE_OF_GENERATION: dict[int, str] = {}
for _lab in GENERATION_LABELS:
    _out = GENERATION_TO_OUTPUT[_lab]
    if _lab == 0:
        _t = 'background'
    elif _lab in _EXTRA_CEREBRAL or _lab in (30, 62):
        _t = 'extra'
    elif _out in (4, 5, 14, 15, 24, 43, 44):
        _t = 'csf'
    elif _out in (2, 41, 7, 46, 16, 28, 60):
        _t = 'wm'
    elif _out in (13, 52):
        _t = 'pallidum'
    else:
        _t = 'gm'
    TISSUE_OF_GENERATION[_lab] = _t


def output_index() -> np.ndarray:
    """Lookup array: FreeSurfer label (0..max) -> index in :data:`OUTPUT_LABELS` (-1 if absent)."""
    lut = np.full(max(OUTPUT_LABELS) + 1, -1, dtype=np.int64)
    lut[list(OUTPUT_LABELS)] = np.arange(len(OUTPUT_LABELS))
    return lut


def flip_lut(labels: tuple[int, ...]) -> np.ndarray:
    """Index permutation that swaps left and right homologues within ``labels``.

    >>> labs = (0, 2, 14, 41)
    >>> flip_lut(labs).tolist()
    [0, 3, 2, 1]
    """
    pairs = dict(LR_PAIRS)
    pairs.update({r: l for l, r in LR_PAIRS.items()})
    pos = {lab: i for i, lab in enumerate(labels)}
    return np.array([pos.get(pairs.get(lab, lab), i) for i, lab in enumerate(labels)], dtype=np.int64)


def generation_classes(labels: tuple[int, ...] = GENERATION_LABELS) -> np.ndarray:
    """Class index per generation label: left/right homologues share one Gaussian.

    >>> cls = generation_classes((0, 2, 41, 14))
    >>> bool(cls[1] == cls[2]), bool(cls[0] != cls[3])
    (True, True)
    """
    right_to_left = {r: l for l, r in LR_PAIRS.items()}
    keys: dict[int, int] = {}
    out = []
    for lab in labels:
        key = right_to_left.get(lab, lab)
        out.append(keys.setdefault(key, len(keys)))
    return np.array(out, dtype=np.int64)


def relabel(data: np.ndarray, mapping: dict[int, int], default: int | None = None) -> np.ndarray:
    """Apply an integer label mapping with a lookup table; unmapped labels raise unless ``default``."""
    data = np.asarray(data)
    present = np.unique(data)
    missing = [int(v) for v in present if int(v) not in mapping]
    if missing and default is None:
        raise ValueError(f'labels without a mapping: {missing[:10]}')
    lut = np.full(int(max(present.max(), max(mapping))) + 1, default if default is not None else 0,
                  dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[data.astype(np.int64)]


_COLORS = {  # FreeSurferColorLUT colours of the output labels
    0: (0, 0, 0), 2: (245, 245, 245), 3: (205, 62, 78), 4: (120, 18, 134), 5: (196, 58, 250),
    7: (220, 248, 164), 8: (230, 148, 34), 10: (0, 118, 14), 11: (122, 186, 220),
    12: (236, 13, 176), 13: (12, 48, 255), 14: (204, 182, 142), 15: (42, 204, 164),
    16: (119, 159, 176), 17: (220, 216, 20), 18: (103, 255, 255), 24: (60, 60, 60),
    26: (255, 165, 0), 28: (165, 42, 42), 41: (245, 245, 245), 42: (205, 62, 78),
    43: (120, 18, 134), 44: (196, 58, 250), 46: (220, 248, 164), 47: (230, 148, 34),
    49: (0, 118, 14), 50: (122, 186, 220), 51: (236, 13, 176), 52: (13, 48, 255),
    53: (220, 216, 20), 54: (103, 255, 255), 58: (255, 165, 0), 60: (165, 42, 42),
}


def lut_tsv() -> str:
    """BIDS ``dseg.tsv`` lookup table of the output labels (index, name, abbreviation, color)."""
    lines = ['index\tname\tabbreviation\tcolor']
    for lab, name in OUTPUT_NAMES.items():
        if lab == 0:
            continue
        r, g, b = _COLORS[lab]
        abbr = ''.join(part[0] for part in name.replace('-', ' ').split())[:6].upper()
        lines.append(f'{lab}\t{name}\t{abbr}\t#{r:02x}{g:02x}{b:02x}')
    return '\n'.join(lines) + '\n'


def write_lut_tsv(path: str | Path) -> Path:
    """Write :func:`lut_tsv` atomically."""
    from ..io import atomic_write_text

    return atomic_write_text(Path(path), lut_tsv())
