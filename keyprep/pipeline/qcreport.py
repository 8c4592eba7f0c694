"""The QC tables: their columns (with descriptions for the JSON sidecars) and how the rows of
one engine on one image are computed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from . import qc

__all__ = ['LONG_COLUMNS', 'SUMMARY_COLUMNS', 'concat_tables', 'registration_qc_rows',
           'table_sidecar']

LONG_COLUMNS: dict[str, str] = {
    'participant_id': 'Participant (sub-<label>)',
    'session_id': 'Session (ses-<label>), n/a without sessions',
    'source': 'BIDS URI of the registered (moving) image',
    'method': 'Registration engine',
    'label_set': 'Label set the Dice is measured on (tissue: 1=GM 2=WM 3=CSF)',
    'label_index': 'Label index in the label set',
    'label_name': 'Label name',
    'dice': ('Dice overlap between the target labels and the moving labels carried onto the '
             'target by the engine transform (genericLabel interpolation)'),
}

SUMMARY_COLUMNS: dict[str, str] = {
    'participant_id': LONG_COLUMNS['participant_id'],
    'session_id': LONG_COLUMNS['session_id'],
    'source': LONG_COLUMNS['source'],
    'method': LONG_COLUMNS['method'],
    'target': 'Registration target (to-/space- label)',
    'transform_kind': 'linear (one affine) or deformable (displacement field)',
    'label_set': LONG_COLUMNS['label_set'],
    'dice_mean': 'Mean Dice over the labels of the label set',
    'dice_min': 'Lowest Dice over the labels of the label set',
    'jac_min': 'Minimum Jacobian determinant of the forward transform inside the target brain',
    'jac_max': 'Maximum Jacobian determinant inside the target brain',
    'jac_mean': 'Mean Jacobian determinant inside the target brain',
    'jac_neg_frac': 'Fraction of target-brain voxels with a Jacobian determinant <= 0 (folding)',
    'logjac_std': 'Standard deviation of log(Jacobian determinant) inside the target brain',
    'runtime_s': 'Wall time of the engine registration (s), transform export excluded',
    'peak_mem_mb': 'Peak resident memory of the process during the registration (MiB)',
    'peak_gpu_mb': 'Peak allocated GPU memory (MiB), n/a on CPU',
    'device': 'Device the engine ran on',
    'threads': 'Threads given to the engine',
    'seed': 'Random seed',
    'versions': 'Software versions (keyprep, antspyx, torch, nipype, nibabel, numpy...)',
    'status': (f'pass, warn or fail: fail if mean Dice < {qc.DICE_FAIL} or > '
               f'{qc.NEG_FAIL:.0%} folding; warn if mean Dice < {qc.DICE_WARN}, any folding, '
               f'or std(log J) > {qc.LOGJAC_WARN}'),
    'status_reason': 'Why the status is not pass',
}


def registration_qc_rows(*, target_dseg: str, warped_dseg: str, target_mask: str, jacobian: str,
                         record: str | dict, label_set: str, lut: dict[int, str], subject: str,
                         session: str | None, source: str,
                         target: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long (per-label) and summary (per-engine) QC rows of one registration."""
    rec = record if isinstance(record, dict) else json.loads(Path(record).read_text())
    ref = np.asanyarray(nb.load(target_dseg).dataobj).astype(np.int32)
    test = np.asanyarray(nb.load(warped_dseg).dataobj).astype(np.int32)
    if test.ndim > ref.ndim:
        test = test.reshape(ref.shape)
    labels = sorted(lut)
    dice = qc.dice_per_label(ref, test, labels)
    ids = {'participant_id': f'sub-{subject}',
           'session_id': f'ses-{session}' if session else 'n/a',
           'source': source, 'method': rec['method']}
    long = pd.DataFrame([{**ids, 'label_set': label_set, 'label_index': k, 'label_name': lut[k],
                          'dice': round(dice[k], 4)} for k in labels],
                        columns=list(LONG_COLUMNS))
    mask = np.asanyarray(nb.load(target_mask).dataobj) > 0
    jac = np.asanyarray(nb.load(jacobian).dataobj)
    jstats = qc.jacobian_stats(jac, mask)
    values = np.array([dice[k] for k in labels], dtype=float)
    dice_mean = float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')
    dice_min = float(np.nanmin(values)) if np.isfinite(values).any() else float('nan')
    status, reason = qc.qc_status(dice_mean, jstats)
    versions = rec.get('versions', {})
    row = {
        **ids, 'target': target, 'transform_kind': rec['transform_kind'],
        'label_set': label_set, 'dice_mean': round(dice_mean, 4), 'dice_min': round(dice_min, 4),
        **{k: round(v, 5) for k, v in jstats.items()},
        'runtime_s': rec['runtime_s'], 'peak_mem_mb': rec['peak_mem_mb'],
        'peak_gpu_mb': rec.get('peak_gpu_mb'), 'device': rec['device'],
        'threads': rec['threads'], 'seed': rec['seed'],
        'versions': ', '.join(f'{k} {v}' for k, v in versions.items()),
        'status': status, 'status_reason': reason,
    }
    summary = pd.DataFrame([row], columns=list(SUMMARY_COLUMNS))
    return long, summary


def concat_tables(files: list[str | Path]) -> pd.DataFrame:
    """Concatenate TSV tables (``n/a`` as missing), keeping the column order of the first."""
    frames = [pd.read_csv(f, sep='\t', na_values='n/a', keep_default_na=False) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def table_sidecar(columns: dict[str, str], description: str) -> dict:
    """BIDS-style JSON sidecar describing a TSV table's columns."""
    out = {'Description': description}
    for col, text in columns.items():
        out[col] = {'Description': text}
    return out
