"""Keypoint tables (``desc-keypoints`` TSV derivatives) and keypoint subsets; numpy only.

A keypoint table has one row per keypoint and the columns ``x``, ``y``, ``z`` (world RAS
millimetres of the image it belongs to), ``weight`` (in a registration's tables the
keypoint's weight in the closed-form fit, mean 1; elsewhere the detector's weight, 1 for an
unweighted model) and ``index`` (the detector output channel: keypoint ``k`` of one image
corresponds to keypoint ``k`` of any other image). Tables of a run whose keypoints include
anatomical ones (the KeyMorph engines' ``keypoint_source`` ``labels`` or ``both``) also have
``structure``: 0 for a learned keypoint, else the FreeSurfer label of the structure whose
centroid (in keyprep's label map of the image) the keypoint is; such keypoints have the index
``LABEL_INDEX_OFFSET + structure``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ['KEYPOINT_COLUMNS', 'LABEL_INDEX_OFFSET', 'STRUCTURE_COLUMN', 'farthest_point_subset',
           'read_keypoints', 'write_keypoints']

#: Column -> description, for the JSON sidecar of the tables.
KEYPOINT_COLUMNS = {
    'x': 'Keypoint position, RAS x (mm, world coordinates of the image)',
    'y': 'Keypoint position, RAS y (mm)',
    'z': 'Keypoint position, RAS z (mm)',
    'weight': "Weight of the keypoint: in a registration's tables its weight in the "
              'closed-form fit (mean 1 over the table; 1 for every keypoint of an unweighted '
              "detector), elsewhere the detector's weight",
    'index': 'Keypoint index (detector channel): the same index is the same keypoint in '
             'every image',
}
#: Index of the centroid of structure ``s`` in a keypoint table: ``LABEL_INDEX_OFFSET + s``
#: (detector channels are below it).
LABEL_INDEX_OFFSET = 1000
#: Extra column of tables with anatomical keypoints.
STRUCTURE_COLUMN = {
    'structure': '0: a keypoint of the learned detector; otherwise the FreeSurfer label of the '
                 "structure whose centroid in keyprep's label map of this image is the keypoint "
                 '(index = 1000 + label)',
}


def write_keypoints(path: str | os.PathLike, points_mm, weights=None, index=None,
                    structure=None) -> Path:
    """Write a keypoint table (TSV) and return its path; with ``structure`` (one FreeSurfer
    label per keypoint, 0 for a learned one) the table has that column too.

    >>> import tempfile
    >>> p = write_keypoints(tempfile.mkdtemp() + '/k.tsv', [[1.0, 2.0, 3.0]], [0.5], [7])
    >>> read_keypoints(p)[0].tolist(), read_keypoints(p)[1].tolist(), read_keypoints(p)[2].tolist()
    ([[1.0, 2.0, 3.0]], [0.5], [7])
    """
    pts = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    n = pts.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float).reshape(n)
    idx = np.arange(n) if index is None else np.asarray(index, dtype=int).reshape(n)
    lines = ['x\ty\tz\tweight\tindex']
    lines += [f'{p[0]:.4f}\t{p[1]:.4f}\t{p[2]:.4f}\t{wi:.6g}\t{int(k)}'
              for p, wi, k in zip(pts, w, idx)]
    if structure is not None:
        st = np.asarray(structure, dtype=int).reshape(n)
        lines = [lines[0] + '\tstructure'] + [f'{ln}\t{int(v)}' for ln, v in zip(lines[1:], st)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n')
    return path


def read_keypoints(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(points_mm [N, 3], weights [N], index [N])`` of a keypoint table."""
    rows = [ln.split('\t') for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not rows or rows[0][:3] != ['x', 'y', 'z']:
        raise ValueError(f'{path} is not a keypoint table (x, y, z, weight, index)')
    head = rows[0]
    body = np.array([[float(v) for v in r] for r in rows[1:]], dtype=float).reshape(-1, len(head))
    col = {name: body[:, i] for i, name in enumerate(head)}
    n = body.shape[0]
    weights = col.get('weight', np.ones(n))
    index = col.get('index', np.arange(n)).astype(int)
    return body[:, :3], weights, index


def farthest_point_subset(points: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` of ``points [N, 3]`` spread over the cloud (farthest-point sampling
    from the point nearest the centroid), in increasing order; deterministic.

    >>> pts = np.array([[0, 0, 0], [1, 0, 0], [10, 0, 0], [0, 10, 0], [0.5, 0, 0]], float)
    >>> farthest_point_subset(pts, 3).tolist()
    [1, 2, 3]
    """
    pts = np.asarray(points, dtype=float)
    n = pts.shape[0]
    if k >= n:
        return np.arange(n)
    if k < 1:
        raise ValueError('k must be at least 1')
    first = int(np.argmin(((pts - pts.mean(0)) ** 2).sum(1)))
    chosen = [first]
    dist = ((pts - pts[first]) ** 2).sum(1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((pts - pts[nxt]) ** 2).sum(1))
    return np.array(sorted(chosen))
