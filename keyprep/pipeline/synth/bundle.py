"""Label-map bundles: the training anatomies of a run in one small file that needs no nibabel.

A machine that trains the label network somewhere else (a GPU lent for minutes, without
``../shared``, nibabel or the atlases the extra anatomies are built from) gets the exact
:class:`~.generator.LabelMap` objects the trainer builds here, in one compressed ``.npz``:

* the maps of a ``--label-maps`` folder, in the trainer's order (sorted file names), held-out
  ones included (the trainer splits them off by name, as for a folder);
* the extra anatomies (``--extra-anatomies``: ``colin27``, ``jhu189``, ``icbm``), each under
  its option name, used by ``--extra-anatomies`` instead of being rebuilt from the atlases.

Each map is stored as it is in memory: its uint8 generation-label indices (already cropped to
the content plus the loader's margin; cropping further would move the voxel grid and change
the synthesiser's samples), its float64 affine, label list and brain centre, so the loaded
maps are equal to the originals and the :class:`~.generator.Synthesizer` draws bit-identical
samples from them. ``np.load(..., allow_pickle=False)`` reads it: no code runs on loading.

    python -m keyprep.pipeline.synth.bundle --label-maps DIR --extra-anatomies icbm -o maps.npz
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .generator import LabelMap

__all__ = ['FORMAT', 'MapBundle', 'save_bundle', 'load_bundle', 'is_bundle', 'build_bundle',
           'EXTRA_ANATOMIES', 'extra_label_map']

FORMAT = 'keyprep-labelmap-bundle/1'

#: ``--extra-anatomies`` option names and the functions of :mod:`.anatomies` that build them.
EXTRA_ANATOMIES: dict[str, str] = {'colin27': 'colin27_label_map', 'jhu189': 'jhu189_label_map',
                                   'icbm': 'icbm_label_map'}


@dataclass
class MapBundle:
    """The maps of a label-map folder (trainer order) and the extra anatomies by option name."""

    maps: list[LabelMap]
    extras: dict[str, LabelMap] = field(default_factory=dict)
    source: str = ''


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a label-map bundle file (not a folder of NIfTI maps)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return 'format.npy' in z.namelist()


def save_bundle(path: str | Path, maps: Sequence[LabelMap],
                extras: dict[str, LabelMap] | None = None, source: str = '') -> Path:
    """Write ``maps`` (and ``extras``) to one compressed ``.npz`` (LZMA members); returns its
    path."""
    extras = dict(extras or {})
    unknown = set(extras) - set(EXTRA_ANATOMIES)
    if unknown:
        raise ValueError(f'unknown extra anatomies {sorted(unknown)}; '
                         f'known: {sorted(EXTRA_ANATOMIES)}')
    entries = [('map', '', m) for m in maps] + [('extra', key, m) for key, m in extras.items()]
    arrays: dict[str, np.ndarray] = {
        'format': np.array(FORMAT),
        'source': np.array(source),
        'kinds': np.array([k for k, _, _ in entries], dtype=str),
        'keys': np.array([key for _, key, _ in entries], dtype=str),
        'names': np.array([m.name for _, _, m in entries], dtype=str),
    }
    for i, (_, _, m) in enumerate(entries):
        index = np.asarray(m.index)
        if index.dtype != np.uint8:
            raise ValueError(f'{m.name}: label indices must be uint8, not {index.dtype}')
        arrays[f'index_{i}'] = index
        arrays[f'affine_{i}'] = np.asarray(m.affine, dtype=np.float64)
        arrays[f'labels_{i}'] = np.asarray(m.labels, dtype=np.int64)
        arrays[f'centre_{i}'] = np.asarray(m.centre_mm, dtype=np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    # numpy's savez_compressed uses deflate; LZMA members are about half the size and
    # np.load reads them the same way (zipfile decompresses either)
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_LZMA) as z:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            z.writestr(f'{key}.npy', buf.getvalue())
    tmp.replace(path)
    return path


def load_bundle(path: str | Path) -> MapBundle:
    """Read a bundle written by :func:`save_bundle` (numpy only)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        if 'format' not in z.files or str(z['format']) != FORMAT:
            raise ValueError(f'{path} is not a keyprep label-map bundle ({FORMAT})')
        kinds, keys, names = z['kinds'].tolist(), z['keys'].tolist(), z['names'].tolist()
        maps, extras = [], {}
        for i, (kind, key, name) in enumerate(zip(kinds, keys, names)):
            m = LabelMap(index=z[f'index_{i}'], affine=z[f'affine_{i}'], name=str(name),
                         labels=tuple(int(v) for v in z[f'labels_{i}']),
                         centre_mm=z[f'centre_{i}'])
            if kind == 'map':
                maps.append(m)
            else:
                extras[str(key)] = m
        return MapBundle(maps=maps, extras=extras, source=str(z['source']))


def extra_label_map(name: str, bundle: MapBundle | None = None) -> LabelMap:
    """The extra anatomy ``name`` (an ``--extra-anatomies`` choice): from ``bundle`` when it
    holds it, else built from the installed atlases by :mod:`.anatomies`."""
    if bundle is not None and name in bundle.extras:
        return bundle.extras[name]
    if name not in EXTRA_ANATOMIES:
        raise ValueError(f'unknown extra anatomy {name!r}; known: {sorted(EXTRA_ANATOMIES)}')
    from . import anatomies

    return getattr(anatomies, EXTRA_ANATOMIES[name])()


def build_bundle(label_maps: str | Path, out: str | Path, extra_anatomies: Sequence[str] = ()
                 ) -> Path:
    """Bundle a label-map folder (every map, held-out ones too) and the named extra anatomies,
    loaded exactly as ``keyprep train`` loads them."""
    from .train import load_training_maps

    maps, _ = load_training_maps(label_maps, held_out=())
    extras = {name: extra_label_map(name) for name in extra_anatomies}
    return save_bundle(out, maps, extras, source=str(label_maps))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keyprep.pipeline.synth.bundle``: write a label-map bundle."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--label-maps', required=True, help='folder of training label maps (*.nii.gz)')
    ap.add_argument('--extra-anatomies', nargs='*', default=[], choices=sorted(EXTRA_ANATOMIES))
    ap.add_argument('-o', '--output', required=True, help='bundle file to write (.npz)')
    args = ap.parse_args(argv)
    path = build_bundle(args.label_maps, args.output, args.extra_anatomies)
    b = load_bundle(path)
    print(f'{path}: {path.stat().st_size} bytes, {len(b.maps)} maps '
          f'({", ".join(m.name for m in b.maps)}), extras: {", ".join(b.extras) or "none"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
