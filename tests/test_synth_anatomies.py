"""Extra anatomies (Colin27/AAL, jhu189, ICBM 2009a) in SynthSeg's generation label space.

They need Debian's ``mricron-data`` (scripts/install.sh installs it) and nilearn's ICBM files.
The maps are cached under ``$KEYPREP_CACHE/anatomies`` (default ``~/.cache/keyprep``); a cold
cache builds them once (ANTs Atropos on Colin27, about a minute on two cores).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline.synth import anatomies as A
from keyprep.pipeline.synth.labels import (
    GENERATION_LABELS,
    GENERATION_TO_OUTPUT,
    LR_PAIRS,
    OUTPUT_LABELS,
)

MRICRON = Path('/usr/share/mricron/templates')
_RIGHT = set(LR_PAIRS.values())


@pytest.fixture(scope='module', autouse=True)
def _need_mricron():
    if not (MRICRON / 'ch2.nii.gz').exists():
        pytest.fail(f'{MRICRON} is missing: install Debian package mricron-data '
                    '(scripts/install.sh does)')


@pytest.fixture(scope='module')
def colin():
    return A.colin27_labels('generation')


@pytest.fixture(scope='module')
def reference_volumes():
    return {lab: float(r['mean_mm3']) for lab, r in A.read_volume_table().items()}


def _labels_of_row(value) -> set[int]:
    return {int(v) for v in str(value).split('|') if v.strip().lstrip('-').isdigit()}


def test_generation_labels_only(colin):
    for img in (colin, A.jhu189_labels(), A.icbm_labels()):
        present = set(np.unique(np.asarray(img.dataobj)).tolist())
        assert present <= set(GENERATION_LABELS), present - set(GENERATION_LABELS)


def test_output_kind_is_output_labels(colin):
    out = np.asarray(A.colin27_labels('output').dataobj)
    assert set(np.unique(out).tolist()) <= set(OUTPUT_LABELS)
    gen = np.asarray(colin.dataobj)
    assert np.array_equal(out, np.vectorize(GENERATION_TO_OUTPUT.get)(gen))
    with pytest.raises(ValueError):
        A.colin27_labels('nonsense')


def test_colin27_has_every_output_structure(colin):
    out = set(np.unique(np.asarray(A.colin27_labels('output').dataobj)).tolist())
    assert out == set(OUTPUT_LABELS)
    # finer than the output labels: five extra-cerebral head classes
    gen = set(np.unique(np.asarray(colin.dataobj)).tolist())
    assert set(A.HEAD_CLUSTER_LABELS) <= gen


@pytest.mark.parametrize('name', ['colin27', 'jhu189', 'icbm2009a'])
def test_sides_follow_world_x(name):
    """Left labels at x < 0, right at x > 0 (Colin27's own fissure is at about x = +0.5 mm,
    so the 1-2 mm next to the plane x = 0 may hold the other side)."""
    img = A._image(A._ANATOMIES[name][1]()['labels'], A._ANATOMIES[name][1]()['affine'], 'generation')
    data = np.asarray(img.dataobj)
    x = img.affine[0, 0] * np.arange(data.shape[0]) + img.affine[0, 3]
    for left, right in LR_PAIRS.items():
        for lab, sign in ((left, -1), (right, 1)):
            vox = np.nonzero(data == lab)[0]
            if len(vox) == 0:
                continue
            xs = x[vox] * sign
            assert xs.mean() > 0, (lab, xs.mean())
            assert np.mean(xs > 0) > 0.9, lab
            assert np.mean(xs < -2) < 0.01, lab


def test_ground_truth_on_ch2_grid_and_resampled(colin):
    gt = A.colin27_ground_truth()
    ch2 = nb.load(str(MRICRON / 'ch2.nii.gz'))
    assert gt.shape == ch2.shape and np.allclose(gt.affine, ch2.affine)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = (-90, -126, -72)
    ref = nb.Nifti1Image(np.zeros((60, 72, 60), np.float32), aff)
    small = np.asarray(A.colin27_ground_truth(ref).dataobj)
    assert small.shape == (60, 72, 60)
    assert set(np.unique(small).tolist()) <= set(OUTPUT_LABELS)
    # volumes survive the 3 mm resampling within 10 % for the large classes
    big = np.asarray(gt.dataobj)
    for lab in (2, 3, 41, 42):
        assert abs((small == lab).sum() * 27 / (big == lab).sum() - 1) < 0.1


@pytest.mark.parametrize('name', ['colin27', 'jhu189', 'icbm2009a'])
def test_mapping_tables_complete(name):
    rows = A.mapping_table(name)
    for r in rows:
        for lab in _labels_of_row(r['output_label']):
            assert lab in OUTPUT_LABELS, r
        for lab in _labels_of_row(r['generation_label']):
            assert lab in GENERATION_LABELS, r
            assert GENERATION_TO_OUTPUT[lab] in _labels_of_row(r['output_label']), r
    if name == 'colin27':
        aal = np.asarray(nb.load(str(MRICRON / 'aal.nii.gz')).dataobj)
        present = {int(v) for v in np.unique(aal) if v > 0}
        mapped = {int(r['source_label']) for r in rows if r['source'] == 'AAL'}
    elif name == 'jhu189':
        jhu = np.asarray(nb.load(str(MRICRON / 'jhu189.nii.gz')).dataobj)
        present = {int(v) for v in np.unique(jhu)}
        mapped = {int(r['source_label']) for r in rows}
    else:
        present = {'CSF', 'GM', 'WM', 'GM/WM', 'background'}
        mapped = {r['source_label'] for r in rows}
    assert present <= mapped, present - mapped
    # every voxel of the map is accounted for by the table
    d = A._ANATOMIES[name][1]()
    assert sum(int(r['voxels']) for r in rows) >= np.count_nonzero(d['labels']) * 0.999


def test_committed_tables_match_the_build():
    """The committed TSVs describe the maps this machine builds (Atropos may differ by a few
    voxels between machines, so voxel counts are compared within 2 %)."""
    for name, (fname, _) in A._ANATOMIES.items():
        path = A.MAPPING_DIR / fname
        assert path.exists(), path
        lines = path.read_text().splitlines()
        head = lines[0].split('\t')
        assert head == list(A._TABLE_COLUMNS)
        committed = [dict(zip(head, line.split('\t'))) for line in lines[1:]]
        built = A.mapping_table(name)
        assert len(committed) == len(built), fname
        for c, b in zip(committed, built):
            for key in ('source', 'source_label', 'generation_label', 'output_label'):
                assert c[key] == str(b[key]), (fname, c, b)
            n_c, n_b = int(c['voxels']), int(b['voxels'])
            assert abs(n_c - n_b) <= max(50, 0.02 * n_b), (fname, c, b)


#: Volume ratio bounds to the mean of SynthSeg's 16 maps (Colin27, jhu189 and ICBM are in
#: MNI space, about 1.4 times a native brain's volume; measured ratios in docs/synthseg_labels.md).
_BOUNDS = {'cortex': (0.5, 2.0), 'wm': (0.5, 2.0), 'cerebellum-cortex': (0.5, 2.0),
           'brain-stem': (0.5, 2.0)}


@pytest.mark.parametrize('name', ['colin27', 'jhu189', 'icbm2009a'])
def test_volumes_sane(name, reference_volumes):
    d = A._ANATOMIES[name][1]()
    vols = A.label_volumes(d['labels'], d['affine'])
    groups = {'cortex': (3, 42), 'wm': (2, 41), 'cerebellum-cortex': (8, 47), 'brain-stem': (16,)}
    for group, labs in groups.items():
        ratio = sum(vols[lab] for lab in labs) / sum(reference_volumes[lab] for lab in labs)
        lo, hi = _BOUNDS[group]
        assert lo <= ratio <= hi, (name, group, ratio)
    brain = sum(v for lab, v in vols.items() if lab not in (0, 24))
    assert 1.0e6 < brain < 2.2e6, (name, brain)
    # left and right homologues within 25 % of each other for the large structures
    for left in (2, 3, 8, 10, 11, 12):
        right = LR_PAIRS[left]
        assert abs(vols[left] / vols[right] - 1) < 0.25, (name, left)


def test_maps_feed_the_synthesizer():
    import torch

    from keyprep.pipeline.synth.generator import SynthConfig, Synthesizer

    maps = A.extra_label_maps()
    assert [m.name for m in maps] == ['colin27', 'jhu189', 'icbm2009a']
    for m in maps:
        assert m.labels == GENERATION_LABELS and m.index.dtype == np.uint8
        assert np.all(np.abs(m.centre_mm) < 30)  # MNI-like: the brain centre near the origin
    syn = Synthesizer(maps, SynthConfig(shape=(32, 40, 32), res_mm=4.0))
    gen = torch.Generator().manual_seed(0)
    for i in range(len(maps)):
        out = syn.synthesize(i, gen)
        assert out['image'].shape == (32, 40, 32)
        assert torch.isfinite(out['image']).all()
        labs = out['labels'].unique().tolist()
        assert len(labs) > 15, (maps[i].name, labs)


def test_cache_is_outside_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv('KEYPREP_CACHE', str(tmp_path))
    assert A.cache_dir() == tmp_path / 'anatomies'
    pkg = Path(A.__file__).resolve().parents[3]  # keyprep/
    monkeypatch.delenv('KEYPREP_CACHE')
    assert pkg not in A.cache_dir().resolve().parents
