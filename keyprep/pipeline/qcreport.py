"""The QC tables: their columns (with descriptions for the JSON sidecars) and how the rows of
one engine on one image are computed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from . import qc

__all__ = ['LONG_COLUMNS', 'LONG_DESCRIPTION', 'SUMMARY_COLUMNS', 'SUMMARY_DESCRIPTION',
           'labels_aligned',
           'concat_tables', 'label_set_rows', 'registration_qc_rows', 'table_sidecar']

LONG_DESCRIPTION = ('Registration QC: Dice per engine and label, for each structure of the label '
                    'network (label_set synthseg) and each tissue class (label_set tissue)')
SUMMARY_DESCRIPTION = 'Registration QC summary: one row per engine and image'

LONG_COLUMNS: dict[str, str] = {
    'participant_id': 'Participant (sub-<label>)',
    'session_id': 'Session (ses-<label>), n/a without sessions',
    'source': 'BIDS URI of the registered (moving) image',
    'method': 'Registration engine',
    'label_set': ("Label set the Dice is measured on: synthseg (the label network's 32 "
                  'structures, FreeSurfer numbering, see seg-synthseg_dseg.tsv) or tissue '
                  '(1=GM 2=WM 3=CSF, see seg-tissue_dseg.tsv)'),
    'label_index': 'Label index in the label set',
    'label_name': 'Label name (the structure, or the tissue class)',
    'dice': ('Dice overlap between the target labels and the moving labels carried onto the '
             'target by the engine transform (genericLabel interpolation); n/a if the label '
             'is absent from both, 0 if absent from one'),
    'structure_group': ('Coarser structure group (left and right together, e.g. hippocampus) '
                        'of a synthseg label; n/a for tissue classes'),
    'target_cm3': 'Volume of the label in the target (cm3)',
    'warped_cm3': 'Volume of the carried moving label on the target grid (cm3)',
}

SUMMARY_COLUMNS: dict[str, str] = {
    'participant_id': LONG_COLUMNS['participant_id'],
    'session_id': LONG_COLUMNS['session_id'],
    'source': LONG_COLUMNS['source'],
    'method': LONG_COLUMNS['method'],
    'target': 'Registration target (to-/space- label)',
    'transform_kind': 'linear (one affine) or deformable (displacement field)',
    'label_set': ('Label set of dice_mean, dice_min and the status: synthseg (structures of '
                  'the label network), or tissue where no structure labels were given'),
    'dice_mean': ('The Dice that sets the status: mean over the labels of label_set present in '
                  "the target's labels (label_set synthseg: the label network's structures, "
                  'used once the network is trusted and its self-check passed; tissue: GM, WM, '
                  'CSF otherwise)'),
    'dice_min': 'Lowest Dice over the labels of label_set present in the target',
    'n_labels': 'Number of labels averaged in dice_mean',
    'tissue_dice_mean': 'Mean Dice over the three tissue classes (GM, WM, CSF)',
    'tissue_dice_min': 'Lowest Dice over the three tissue classes',
    'structure_dice_mean': ("Mean Dice over the label network's structures present in the "
                            'target (whether or not it sets the status); n/a without them'),
    'structure_dice_min': "Lowest Dice over the label network's structures present in the target",
    'labels_in_objective': ("Whether the engine's objective contained the label network's "
                            'structure labels (DIO label prompting): then their Dice is not an '
                            'independent check and the status rests on the tissue classes'),
    'labels_check': ("The label network's self-check of the moving image's labels: ok, or "
                     'failed: <checks> (then the structure Dice does not set the status)'),
    'jac_min': 'Minimum Jacobian determinant of the forward transform inside the target brain',
    'jac_max': 'Maximum Jacobian determinant inside the target brain',
    'jac_mean': 'Mean Jacobian determinant inside the target brain',
    'jac_neg_frac': 'Fraction of target-brain voxels with a Jacobian determinant <= 0 (folding)',
    'logjac_std': 'Standard deviation of log(Jacobian determinant) inside the target brain',
    'inverse': ('Deformable transforms: where the inverse (from-<target>_to-<image>) comes '
                'from: engine (its own), or fixed-point (keyprep inverted the forward field); '
                'n/a for linear transforms (inverted exactly)'),
    'inverse_error_mean_mm': ('Deformable transforms: mean round-trip error |u(x) + '
                              'v(x + u(x))| of the forward and inverse fields inside the '
                              'target brain (mm)'),
    'inverse_error_p99_mm': '99th percentile of the round-trip error inside the target brain (mm)',
    'chain': ("The methods whose transforms make this one, starting affine first (e.g. "
              'keymorphAffine>carl)'),
    'engine_weights_sha256': "SHA-256 of a learned engine's weights file; n/a for other engines",
    'runtime_s': 'Wall time of the engine registration (s), transform export excluded',
    'peak_mem_mb': 'Peak resident memory of the process during the registration (MiB)',
    'peak_gpu_mb': 'Peak allocated GPU memory (MiB), n/a on CPU',
    'device': 'Device the engine ran on',
    'threads': 'Threads given to the engine',
    'seed': 'Random seed',
    'versions': 'Software versions (keyprep, antspyx, torch, nipype, nibabel, numpy...)',
    'synthseg_weights_sha256': "SHA-256 of the label network's weights file",
    'synthseg_weights_step': "Training step of the label network's weights",
    'status': (f'pass, warn or fail: fail if dice_mean (the Dice of label_set) < {qc.DICE_FAIL} '
               f'(tissue) or {qc.STRUCTURE_DICE_FAIL} (synthseg structures), or > '
               f'{qc.NEG_FAIL:.0%} folding; warn if dice_mean < {qc.DICE_WARN} (tissue) or '
               f'{qc.STRUCTURE_DICE_WARN} (structures), any '
               f'folding, std(log J) > {qc.LOGJAC_WARN}, a mean inverse round-trip error > '
               f'{qc.INVERSE_WARN_MM} mm, or a failed label self-check'),
    'status_reason': 'Why the status is not pass, and how it was decided',
}


def _load_labels(path: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, float]:
    img = nb.load(path)
    data = np.asanyarray(img.dataobj)
    data = np.rint(data).astype(np.int32) if data.dtype.kind == 'f' else data.astype(np.int32)
    if shape is not None and data.ndim > len(shape):
        data = data.reshape(shape)
    return data, float(np.prod(img.header.get_zooms()[:3])) / 1000.0


def label_set_rows(target_labels: str, warped_labels: str, lut: dict[int, str],
                   label_set: str, groups: dict[int, str] | None = None
                   ) -> tuple[list[dict], dict[str, float]]:
    """Long-table rows (one per label of ``lut``) and ``{'mean', 'min', 'n'}`` over the
    labels present in the target.

    ``target_labels`` and ``warped_labels`` are label maps on the same (target) grid.
    """
    ref, vox = _load_labels(target_labels)
    test, _ = _load_labels(warped_labels, ref.shape)
    labels = sorted(int(k) for k in lut if int(k) != 0)
    dice = qc.dice_per_label(ref, test, labels)
    n = max(labels, default=0) + 1
    count_r = np.bincount(ref[(ref >= 0) & (ref < n)].ravel(), minlength=n)
    count_t = np.bincount(test[(test >= 0) & (test < n)].ravel(), minlength=n)
    groups = groups or {}
    rows = [{'label_set': label_set, 'label_index': k, 'label_name': lut[k],
             'dice': round(dice[k], 4), 'structure_group': groups.get(k),
             'target_cm3': round(float(count_r[k]) * vox, 3),
             'warped_cm3': round(float(count_t[k]) * vox, 3)} for k in labels]
    values = np.array([dice[k] for k in labels if count_r[k] > 0], dtype=float)
    values = values[np.isfinite(values)]
    stats = {'mean': float(values.mean()) if values.size else float('nan'),
             'min': float(values.min()) if values.size else float('nan'),
             'n': int(values.size)}
    return rows, stats


def registration_qc_rows(*, target_dseg: str, warped_dseg: str, target_mask: str, jacobian: str,
                         record: str | dict, label_set: str, lut: dict[int, str], subject: str,
                         session: str | None, source: str, target: str,
                         target_synthseg: str | None = None, warped_synthseg: str | None = None,
                         synthseg_lut: dict[int, str] | None = None,
                         synthseg_meta: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long (per-label) and summary (per-engine) QC rows of one registration.

    ``target_dseg``/``warped_dseg`` are the tissue labels (``label_set``, ``lut``);
    ``target_synthseg``/``warped_synthseg`` the label network's (``synthseg_lut``, default:
    its 32 structures). With structure labels, the summary's ``dice_mean``, ``dice_min``
    and status are those of the structures, and the tissue Dice goes to ``tissue_dice_*``;
    without, they are the tissue Dice (as before structure labels existed).
    """
    from .synth.labels import OUTPUT_NAMES, STRUCTURE_GROUPS

    rec = record if isinstance(record, dict) else json.loads(Path(record).read_text())
    ids = {'participant_id': f'sub-{subject}',
           'session_id': f'ses-{session}' if session else 'n/a',
           'source': source, 'method': rec['method']}
    rows = []
    primary = None
    if target_synthseg and warped_synthseg:
        slut = synthseg_lut or {k: v for k, v in OUTPUT_NAMES.items() if k}
        groups = {lab: g for g, labs in STRUCTURE_GROUPS.items() for lab in labs}
        srows, primary = label_set_rows(target_synthseg, warped_synthseg,
                                        {int(k): v for k, v in slut.items()}, 'synthseg', groups)
        rows += srows
    trows, tissue = label_set_rows(target_dseg, warped_dseg, lut, label_set)
    rows += trows
    long = pd.DataFrame([{**ids, **r} for r in rows], columns=list(LONG_COLUMNS))
    meta = synthseg_meta or {}
    structure = primary
    # Structure Dice sets the status only when the label network is validated (its model
    # card's held-out Dice reaches LabelNetwork.TRUSTED_DICE) and its self-check of the
    # moving image's labels passed; otherwise the structure rows are reported but the
    # status rests on the tissue classes.
    untrusted = primary is not None and meta and not meta.get('NetworkTrusted', True)
    check = meta.get('LabelCheck') or {}
    check_failed = bool(check) and not check.get('ok', True)
    # an engine that aligned the label network's labels (DIO's prompting) is not checked by
    # their Dice: the tissue classes, from an intensity model, are independent of it
    in_objective = bool((rec.get('extras') or {}).get('labels_in_objective'))
    if untrusted or check_failed or (in_objective and primary is not None):
        primary = None
    main_set = 'synthseg' if primary is not None else label_set
    primary = primary if primary is not None else tissue
    mask = np.asanyarray(nb.load(target_mask).dataobj) > 0
    jac = np.asanyarray(nb.load(jacobian).dataobj)
    jstats = qc.jacobian_stats(jac, mask)
    what = 'mean structure Dice' if main_set == 'synthseg' else f'mean {label_set} Dice'
    status, reason = qc.qc_status(primary['mean'], jstats, what=what,
                                  thresholds=qc.dice_thresholds(main_set))
    if untrusted:
        note = ('status from tissue Dice: the label network is not validated yet '
                f"(held-out structure Dice {meta.get('NetworkHeldOutDice')})")
        reason = f'{reason}; {note}' if reason else note
    if in_objective and structure is not None:
        note = ("status from tissue Dice: the engine aligned the label network's structure "
                'labels (label prompting), so their Dice is not an independent check')
        reason = f'{reason}; {note}' if reason else note
    inverse = rec.get('inverse') or {}
    consistency = inverse.get('consistency') or {}
    ice = consistency.get('mean_mm')
    if ice is not None and np.isfinite(ice) and ice > qc.INVERSE_WARN_MM:
        note = (f'the inverse transform does not undo the forward one: mean round-trip '
                f'error {ice:.2f} mm > {qc.INVERSE_WARN_MM} mm ({inverse.get("source")})')
        reason = f'{reason}; {note}' if reason else note
        if status == 'pass':
            status = 'warn'
    if check_failed:
        note = ("the label network's self-check failed on the moving image "
                f"({', '.join(check.get('failed', []))}): structure labels not trusted")
        reason = f'{reason}; {note}' if reason else note
        if status == 'pass':
            status = 'warn'
    versions = rec.get('versions', {})
    row = {
        **ids, 'target': target, 'transform_kind': rec['transform_kind'],
        'label_set': main_set, 'dice_mean': round(primary['mean'], 4),
        'dice_min': round(primary['min'], 4), 'n_labels': primary['n'],
        'tissue_dice_mean': round(tissue['mean'], 4), 'tissue_dice_min': round(tissue['min'], 4),
        'structure_dice_mean': None if structure is None else round(structure['mean'], 4),
        'structure_dice_min': None if structure is None else round(structure['min'], 4),
        'labels_in_objective': in_objective,
        'labels_check': (None if not check else 'ok' if check.get('ok', True)
                         else 'failed: ' + ','.join(check.get('failed', []))),
        **{k: round(v, 5) for k, v in jstats.items()},
        'inverse': inverse.get('source'),
        'inverse_error_mean_mm': consistency.get('mean_mm'),
        'inverse_error_p99_mm': consistency.get('p99_mm'),
        'chain': '>'.join(rec.get('chain') or [rec['method']]),
        'engine_weights_sha256': (rec.get('weights') or {}).get('sha256'),
        'runtime_s': rec['runtime_s'], 'peak_mem_mb': rec['peak_mem_mb'],
        'peak_gpu_mb': rec.get('peak_gpu_mb'), 'device': rec['device'],
        'threads': rec['threads'], 'seed': rec['seed'],
        'versions': ', '.join(f'{k} {v}' for k, v in versions.items()),
        'synthseg_weights_sha256': meta.get('NetworkWeightsSha256'),
        'synthseg_weights_step': meta.get('NetworkTrainingStep'),
        'status': status, 'status_reason': reason,
    }
    summary = pd.DataFrame([row], columns=list(SUMMARY_COLUMNS))
    return long, summary


def labels_aligned(summary: pd.DataFrame) -> pd.Series:
    """Per summary row, whether the engine aligned the label network's labels
    (``labels_in_objective`` true, as written or read back from a TSV); all false without the
    column."""
    if 'labels_in_objective' not in summary:
        return pd.Series(False, index=summary.index)
    return summary['labels_in_objective'].astype(str).str.lower().eq('true')


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
