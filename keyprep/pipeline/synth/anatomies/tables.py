"""The three anatomies together: the list the synthesizer takes, their mapping tables and
label volumes (``python -m keyprep.pipeline.synth.anatomies`` writes the tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..generator import LabelMap
from ..labels import OUTPUT_LABELS, OUTPUT_NAMES
from .colin27 import _colin27, colin27_label_map
from .common import MAPPING_DIR, _to_output
from .icbm import _icbm2009a, icbm_label_map
from .jhu189 import _jhu189, jhu189_label_map

__all__ = [
    'extra_label_maps', 'label_volumes', 'mapping_table', 'read_volume_table',
    'synthseg_mean_volumes', 'write_mapping_tables',
]


def extra_label_maps() -> list[LabelMap]:
    """The three extra anatomies, in a fixed order (Colin27, jhu189, ICBM 2009a)."""
    return [colin27_label_map(), jhu189_label_map(), icbm_label_map()]


_TABLE_COLUMNS = ('source', 'source_label', 'source_name', 'generation_label', 'output_label',
                  'output_name', 'voxels', 'purity', 'notes')


_ANATOMIES = {'colin27': ('colin27_aal.tsv', _colin27), 'jhu189': ('jhu189.tsv', _jhu189),
              'icbm2009a': ('icbm.tsv', _icbm2009a)}


def mapping_table(name: str) -> list[dict]:
    """Rows (source label -> generation/output label, voxels, purity, notes) of one anatomy."""
    if name not in _ANATOMIES:
        raise ValueError(f'unknown anatomy {name!r}; known: {", ".join(_ANATOMIES)}')
    return [dict(r) for r in _ANATOMIES[name][1]()['table']]


def _tsv(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ['\t'.join(columns)]
    for r in rows:
        lines.append('\t'.join(str(r.get(c, '')).replace('\t', ' ') for c in columns))
    return '\n'.join(lines) + '\n'


def label_volumes(labels: np.ndarray, affine: np.ndarray) -> dict[int, float]:
    """Volume (mm^3) of every output label of a generation-label (or output-label) array."""
    out = _to_output(labels)
    vox = abs(float(np.linalg.det(np.asarray(affine)[:3, :3])))
    counts = np.bincount(out.ravel().astype(np.int64), minlength=max(OUTPUT_LABELS) + 1)
    return {lab: float(counts[lab] * vox) for lab in OUTPUT_LABELS}


def synthseg_mean_volumes(folder: str | Path) -> dict[int, tuple[float, float]]:
    """Mean and SD of every output label's volume (mm^3) over SynthSeg's training label maps."""
    import nibabel as nib

    vols = []
    for path in sorted(Path(folder).glob('*.nii*')):
        img = nib.load(str(path))
        data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
        vols.append(label_volumes(data, img.affine))
    if not vols:
        raise FileNotFoundError(f'no label maps in {folder}')
    return {lab: (float(np.mean([v[lab] for v in vols])), float(np.std([v[lab] for v in vols])))
            for lab in OUTPUT_LABELS}


def read_volume_table(path: str | Path | None = None) -> dict[int, dict[str, str]]:
    """The committed ``synthseg_volumes.tsv`` (or ``path``) as {output label: row}."""
    path = Path(path) if path else MAPPING_DIR / 'synthseg_volumes.tsv'
    lines = path.read_text().splitlines()
    head = lines[0].split('\t')
    rows = [dict(zip(head, line.split('\t'))) for line in lines[1:] if line.strip()]
    return {int(r['output_label']): r for r in rows}


def write_mapping_tables(outdir: str | Path = MAPPING_DIR, synthseg_dir: str | Path | None = None
                         ) -> list[Path]:
    """Write the mapping tables (``colin27_aal.tsv``, ``jhu189.tsv``, ``icbm.tsv``) and
    ``volumes.tsv`` (each anatomy's output-label volumes and their ratio to the SynthSeg mean).

    ``synthseg_dir`` (SynthSeg's training label maps) recomputes ``synthseg_volumes.tsv``;
    without it the committed one is used.
    """
    from ...io import atomic_write_text

    outdir = Path(outdir)
    written = []
    for name, (fname, getter) in _ANATOMIES.items():
        written.append(atomic_write_text(outdir / fname, _tsv(getter()['table'], _TABLE_COLUMNS)))
    ref_path = outdir / 'synthseg_volumes.tsv'
    if synthseg_dir is not None:
        ref = synthseg_mean_volumes(synthseg_dir)
        n = len(list(Path(synthseg_dir).glob('*.nii*')))
        rows = [{'output_label': lab, 'output_name': OUTPUT_NAMES[lab], 'mean_mm3': f'{m:.0f}',
                 'sd_mm3': f'{s:.0f}', 'n_maps': n} for lab, (m, s) in ref.items()]
        written.append(atomic_write_text(ref_path, _tsv(rows, ('output_label', 'output_name',
                                                                'mean_mm3', 'sd_mm3', 'n_maps'))))
    ref_rows = read_volume_table(ref_path if ref_path.exists() else None)
    vols = {name: label_volumes(getter()['labels'], getter()['affine'])
            for name, (_, getter) in _ANATOMIES.items()}
    rows = []
    for lab in OUTPUT_LABELS:
        mean = float(ref_rows[lab]['mean_mm3'])
        row = {'output_label': lab, 'output_name': OUTPUT_NAMES[lab], 'synthseg_mean_mm3': f'{mean:.0f}'}
        for name in _ANATOMIES:
            row[f'{name}_mm3'] = f'{vols[name][lab]:.0f}'
            # background depends on the grid, not the anatomy: no ratio
            row[f'{name}_ratio'] = f'{vols[name][lab] / mean:.2f}' if mean > 0 and lab else ''
        rows.append(row)
    cols = ['output_label', 'output_name', 'synthseg_mean_mm3'] + [
        f'{n}_{k}' for n in _ANATOMIES for k in ('mm3', 'ratio')]
    written.append(atomic_write_text(outdir / 'volumes.tsv', _tsv(rows, cols)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keyprep.pipeline.synth.anatomies``: build (or load) the anatomies, write tables."""
    import argparse

    ap = argparse.ArgumentParser(prog='python -m keyprep.pipeline.synth.anatomies',
                                 description=main.__doc__)
    ap.add_argument('--outdir', default=str(MAPPING_DIR))
    ap.add_argument('--synthseg', default=None,
                    help="SynthSeg's training label maps, to recompute the reference volumes")
    args = ap.parse_args(argv)
    for path in write_mapping_tables(args.outdir, args.synthseg):
        print(path)
    return 0
