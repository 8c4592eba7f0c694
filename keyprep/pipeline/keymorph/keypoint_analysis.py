"""KeyMorph keypoints on the inter-subject benchmark's images: repeatability and consistency.

Used by ``benchmarks/run_intersubject_benchmark.py`` (not a script of its own). Needs the KeyMorph
detector (:class:`keyprep.pipeline.keymorph.network.KeyMorphModel`) and its weights; without
them the analysis is skipped with a note.

* **Repeatability under rotation** (the paper's Fig. 14 test, ``paper_keymorph.md`` §7.3):
  for every held-out subject and contrast, the keypoints ``k`` of the unrotated image and the
  keypoints ``k'`` of the same image turned about its brain centre by each rotation level
  (resampled as the benchmark's moving images are, linear interpolation onto an axis-aligned
  grid that holds the turned brain; the rotation is drawn with the benchmark's protocol,
  seeded by subject and level).
  Reported: ``|k' - R k|`` in mm per keypoint, summarised per level (mean, median, 90th
  percentile). 0 mm is perfect equivariance.
* **Cross-subject consistency of keypoint k** (no ground truth needed):

  - *label agreement*: the SynthSeg structure under keypoint ``k`` (nearest voxel of the
    image's exact label map; ``background`` outside the brain) in every subject × contrast
    image; the fraction of images where it is keypoint ``k``'s most frequent structure.
    Chance level: the same statistic after shuffling the keypoint indices of every image but
    the first (seeded permutation) — keypoints that do not track anatomy score about that;
  - *spread after affine alignment*: the T1 keypoint clouds of the subjects are aligned to
    the first subject's cloud by the closed-form affine least-squares fit of KeyMorph
    (:func:`keyprep.pipeline.keymorph.aligners.fit_affine`), then once more to the mean of the
    aligned clouds; the spread of keypoint ``k`` is the RMS distance of its aligned positions
    to their mean (mm);
  - *same-subject spread across contrasts*: the RMS distance of keypoint ``k`` to its mean
    over the contrasts of one subject (same anatomy on the same grid: no alignment), averaged
    over subjects. Cross-subject spread well above it means the keypoints tell subjects
    apart (the paper's Table 2).

Writes ``keypoint_repeatability.tsv`` (subject, contrast, rotation, keypoint, error),
``keypoint_consistency.tsv`` (one row per keypoint) and ``keypoint_summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import nibabel as nb
import numpy as np

from ..synth.labels import OUTPUT_NAMES

__all__ = ['unavailable', 'labels_at', 'label_agreement', 'aligned_spread', 'run',
           'summary_lines']


def unavailable(weights: Path | None = None) -> str | None:
    """Why the keypoint analysis cannot run (``None`` when it can)."""
    try:
        from .network import KeyMorphModel, default_weights
    except ImportError as exc:
        return f'the KeyMorph detector is not available ({exc})'
    del KeyMorphModel
    path = Path(weights) if weights is not None else default_weights()
    if not path.is_file():
        return f'no KeyMorph weights at {path}'
    return None


def labels_at(points_mm: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label at each point (nearest voxel; 0 outside the grid).

    >>> lab = np.zeros((3, 3, 3), int); lab[1, 1, 1] = 17
    >>> labels_at(np.array([[1.2, 0.9, 1.0], [9.0, 0.0, 0.0]]), lab, np.eye(4)).tolist()
    [17, 0]
    """
    ijk = np.rint(np.asarray(points_mm, float) @ np.linalg.inv(affine)[:3, :3].T
                  + np.linalg.inv(affine)[:3, 3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(labels.shape[:3])), axis=1)
    out = np.zeros(len(ijk), dtype=np.int64)
    out[inside] = labels[tuple(ijk[inside].T)]
    return out


def label_agreement(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per keypoint (columns of ``labels [images, N]``): its most frequent label and the
    fraction of images where keypoint ``k`` has that label.

    >>> modal, frac = label_agreement(np.array([[3, 4], [3, 5], [2, 6]]))
    >>> modal.tolist(), np.round(frac, 3).tolist()
    ([3, 4], [0.667, 0.333])
    """
    modal, frac = [], []
    for col in np.asarray(labels).T:
        lab, count = Counter(col.tolist()).most_common(1)[0]
        modal.append(lab)
        frac.append(count / len(col))
    return np.asarray(modal), np.asarray(frac)


def aligned_spread(clouds: list[np.ndarray]) -> np.ndarray:
    """Per keypoint, the RMS distance (mm) to its mean position after aligning every cloud
    ``[N, 3]`` by a least-squares affine map to the first cloud, then to the mean cloud."""
    import torch

    from .aligners import apply_affine, fit_affine

    pts = torch.as_tensor(np.stack(clouds), dtype=torch.float64)  # [S, N, 3]
    target = pts[:1].expand_as(pts)
    for _ in range(2):
        mats = fit_affine(pts, target)
        aligned = apply_affine(mats, pts)
        target = aligned.mean(0, keepdim=True).expand_as(pts)
    dev = aligned - aligned.mean(0, keepdim=True)
    return dev.square().sum(-1).mean(0).sqrt().numpy()


def _spread(points: list[np.ndarray]) -> np.ndarray:
    p = np.stack(points)
    return np.sqrt(((p - p.mean(0, keepdims=True)) ** 2).sum(-1).mean(0))


def run(subjects: list[str], contrasts: list[str], rotations: list[float], *, image,
        draw_rotation, rotate, out: Path, weights: Path | None = None, device: str = 'cpu',
        threads: int = 1, seed: int = 0) -> dict:
    """Measure repeatability and consistency on the benchmark's subject images.

    ``image(subject, contrast)`` gives the files ``(image, labels)`` of a subject's unrotated
    image; ``draw_rotation(subject, level)`` a rotation ``(R, axes)``; ``rotate(img,
    subject, R)`` the image turned by ``R`` about its brain centre. Returns the summary (also
    written to ``out/keypoint_summary.json``), with ``status`` ``skipped: ...`` when the
    detector or its weights are missing.
    """
    import pandas as pd

    summary_path = out / 'keypoint_summary.json'
    reason = unavailable(weights)
    if reason:
        summary = {'status': f'skipped: {reason}'}
        summary_path.write_text(json.dumps(summary, indent=2))
        return summary
    import torch

    from .network import KeyMorphModel

    torch.set_num_threads(max(1, threads))
    model = KeyMorphModel.load(weights, device)
    base: dict[tuple[str, str], dict] = {}
    rep_rows, times = [], []
    for s in subjects:
        for c in contrasts:
            img_path, lab_path = image(s, c)
            img, lab = nb.load(str(img_path)), nb.load(str(lab_path))
            t0 = time.perf_counter()
            k0, w0 = model.detect(img)
            times.append(time.perf_counter() - t0)
            base[(s, c)] = {'points': k0, 'weights': w0,
                            'labels': labels_at(k0, np.asanyarray(lab.dataobj), lab.affine)}
            for level in rotations:
                if level == 0:
                    continue
                rot, axes = draw_rotation(s, level)
                k1, _ = model.detect(rotate(img, s, rot))
                err = np.linalg.norm(k1 - k0 @ rot.T, axis=1)
                rep_rows += [{'subject': s, 'contrast': c, 'rotation_deg': level,
                              'rotation_axes': axes, 'keypoint': i, 'error_mm': float(e)}
                             for i, e in enumerate(err)]
    n_kp = len(next(iter(base.values()))['points'])
    rep = pd.DataFrame(rep_rows, columns=['subject', 'contrast', 'rotation_deg',
                                          'rotation_axes', 'keypoint', 'error_mm'])
    rep.round({'error_mm': 3}).to_csv(out / 'keypoint_repeatability.tsv', sep='\t',
                                      index=False)
    per_level = {}
    for level, grp in rep.groupby('rotation_deg'):
        e = grp['error_mm'].to_numpy()
        per_level[f'{level:g}'] = {'mean_mm': float(e.mean()), 'median_mm': float(np.median(e)),
                                   'p90_mm': float(np.percentile(e, 90)), 'n': int(e.size)}
    # label agreement over every subject x contrast image, and its shuffled chance level
    keys = list(base)
    labels = np.stack([base[k]['labels'] for k in keys])
    modal, agree = label_agreement(labels)
    rng = np.random.default_rng([int(seed), 7])
    shuffled = np.stack([labels[0]] + [row[rng.permutation(n_kp)] for row in labels[1:]])
    _, agree_shuffled = label_agreement(shuffled)
    # spreads
    ref_contrast = 't1' if 't1' in contrasts else contrasts[0]
    cross_subject = (aligned_spread([base[(s, ref_contrast)]['points'] for s in subjects])
                     if len(subjects) > 1 else np.full(n_kp, math.nan))
    cross_contrast = (np.mean([_spread([base[(s, c)]['points'] for c in contrasts])
                               for s in subjects], axis=0)
                      if len(contrasts) > 1 else np.full(n_kp, math.nan))
    cons = pd.DataFrame({
        'keypoint': np.arange(n_kp),
        'modal_structure': [OUTPUT_NAMES.get(int(m), str(m)) if m else 'background'
                            for m in modal],
        'label_agreement': agree, 'n_images': len(keys),
        'cross_subject_spread_mm': cross_subject,
        'same_subject_cross_contrast_spread_mm': cross_contrast,
        'mean_weight': np.mean([base[k]['weights'] for k in keys], axis=0),
    })
    cons.round(4).to_csv(out / 'keypoint_consistency.tsv', sep='\t', index=False, na_rep='n/a')
    summary = {
        'status': 'ok', 'weights': str(model.path), 'sha256': model.sha256,
        'n_keypoints': n_kp, 'detector_grid': {'shape': list(model.cfg.shape),
                                               'res_mm': model.cfg.res_mm},
        'subjects': subjects, 'contrasts': contrasts, 'device': str(device),
        'detect_time_s_median': float(np.median(times)),
        'repeatability': per_level,
        'label_agreement_mean': float(agree.mean()),
        'label_agreement_shuffled_mean': float(agree_shuffled.mean()),
        'keypoints_full_agreement': int(np.sum(agree >= 1.0 - 1e-9)),
        'keypoints_modal_background': int(np.sum(modal == 0)),
        'n_images': len(keys),
        'cross_subject_spread_mm': {'median': float(np.nanmedian(cross_subject)),
                                    'mean': float(np.nanmean(cross_subject))},
        'same_subject_cross_contrast_spread_mm': {'median': float(np.nanmedian(cross_contrast)),
                                                  'mean': float(np.nanmean(cross_contrast))},
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def summary_lines(summary: dict) -> list[str]:
    """Markdown lines of the keypoint section."""
    lines = ['## KeyMorph keypoints: repeatability and consistency', '']
    if summary.get('status') != 'ok':
        return lines + [f'Not measured: {summary.get("status", "no result")}.']
    grid = summary['detector_grid']
    lines += [
        f'Detector: `{Path(summary["weights"]).name}` ({summary["n_keypoints"]} keypoints, '
        f'grid {"x".join(str(n) for n in grid["shape"])} at {grid["res_mm"]:g} mm), '
        f'{len(summary["subjects"])} subjects × contrasts '
        f'{", ".join(summary["contrasts"])}; median detection time '
        f'{summary["detect_time_s_median"]:.2f} s on {summary["device"]}.', '',
        'Repeatability: keypoints of the rotated image against the rotated keypoints of the '
        'original (mm, over subjects, contrasts and keypoints).', '',
        '| rotation | mean (mm) | median (mm) | 90th percentile (mm) | n |',
        '|---|---|---|---|---|']
    for level, r in summary['repeatability'].items():
        lines.append(f'| {level}° | {r["mean_mm"]:.2f} | {r["median_mm"]:.2f} | '
                     f'{r["p90_mm"]:.2f} | {r["n"]} |')
    cs, cc = summary['cross_subject_spread_mm'], summary['same_subject_cross_contrast_spread_mm']
    lines += [
        '', 'Consistency of keypoint k across subjects (per keypoint in '
        '`keypoint_consistency.tsv`):', '',
        f'* same SynthSeg structure under keypoint k: {100 * summary["label_agreement_mean"]:.1f} '
        f'% of the {summary["n_images"]} subject × contrast images on average (shuffled '
        f'keypoint indices: {100 * summary["label_agreement_shuffled_mean"]:.1f} %); '
        f'{summary["keypoints_full_agreement"]} of {summary["n_keypoints"]} keypoints in the '
        f'same structure in every image, {summary["keypoints_modal_background"]} mostly '
        'outside the brain;',
        f'* spread of keypoint k across subjects after affine alignment of the T1 keypoint '
        f'clouds: median {cs["median"]:.2f} mm (mean {cs["mean"]:.2f} mm), against '
        f'{cc["median"]:.2f} mm (mean {cc["mean"]:.2f} mm) across the contrasts of one '
        'subject.']
    return lines
