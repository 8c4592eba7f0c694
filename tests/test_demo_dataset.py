"""The demo dataset (``keyprep-demo``) built at 4 mm: valid BIDS, ground truth aligned."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.bids_app import demo

pytestmark = pytest.mark.skipif(not (demo.COLIN27_DIR / 'ch2.nii.gz').exists(),
                                reason='Colin27 (apt-get install mricron-data) not installed')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    return demo.build_demo_dataset(tmp_path_factory.mktemp('demo') / 'bids', n_subjects=3,
                                   seed=42, max_rotation=90.0, resolution=4.0)


def test_valid_bids_dataset(dataset):
    from bids import BIDSLayout

    from keyprep.bids_app.bids import _run_validator

    layout = BIDSLayout(str(dataset), validate=True)
    assert layout.get_subjects() == ['01', '02', '03']
    t1w = layout.get(suffix='T1w', extension='.nii.gz', return_type='filename')
    assert [Path(f).name for f in t1w] == [f'sub-0{i}_T1w.nii.gz' for i in (1, 2, 3)]
    assert layout.get_metadata(t1w[0])['SeriesDescription'].startswith('Colin27')
    # the official schema-based validator (bids-validator-deno, offline): no error
    report, _ = _run_validator(dataset)
    issues = report['issues']['issues']
    assert issues, 'the validator reported nothing: did it run?'
    assert [(i['code'], i.get('location')) for i in issues if i['severity'] == 'error'] == []
    assert sorted(report['summary']['subjects']) == ['01', '02', '03']
    desc = json.loads((dataset / 'dataset_description.json').read_text())
    assert desc['BIDSVersion'] == '1.9.0' and desc['DatasetType'] == 'raw'
    assert desc['Name'] and desc['License']
    participants = (dataset / 'participants.tsv').read_text().splitlines()
    assert participants[0].split('\t')[0] == 'participant_id' and len(participants) == 4
    assert json.loads((dataset / 'code' / 'keyprep_demo.json').read_text()) == \
        demo.demo_parameters(3, 42, 90.0, 4.0)


def test_groundtruth_is_a_derivative_dataset(dataset):
    from bids import BIDSLayout

    gt = dataset / 'derivatives' / 'groundtruth'
    desc = json.loads((gt / 'dataset_description.json').read_text())
    assert desc['DatasetType'] == 'derivative' and desc['GeneratedBy'][0]['Name']
    layout = BIDSLayout(str(dataset), derivatives=True)
    deriv = layout.derivatives['keyprep-demo']
    dseg = deriv.get(subject='02', suffix='dseg', extension='.nii.gz', return_type='filename')
    assert [Path(f).name for f in dseg] == ['sub-02_atlas-AAL_dseg.nii.gz']
    table = (gt / 'atlas-AAL_dseg.tsv').read_text().splitlines()
    assert table[0] == 'index\tname' and len(table) == 117
    assert table[1] == '1\tPrecentral_L' and table[-1] == '116\tVermis_10'


def test_subjects_have_their_own_grids(dataset):
    imgs = [nb.load(str(dataset / f'sub-0{i}' / 'anat' / f'sub-0{i}_T1w.nii.gz'))
            for i in (1, 2, 3)]
    zooms = [tuple(np.round(img.header.get_zooms()[:3], 3)) for img in imgs]
    assert zooms == [(4.0, 4.0, 4.0), (4.8, 4.0, 5.6), (6.0, 6.0, 6.0)]
    assert len({img.shape for img in imgs}) == 3
    # sub-02 is oblique: its axes are not aligned with the world axes
    direction = imgs[1].affine[:3, :3] / np.linalg.norm(imgs[1].affine[:3, :3], axis=0)
    assert np.abs(direction).max(axis=0).min() < 0.999
    assert nb.aff2axcodes(imgs[2].affine) != ('R', 'A', 'S')
    for img in imgs:
        assert img.get_data_dtype() == np.uint8
        assert int(img.header['qform_code']) == 1 and int(img.header['sform_code']) == 1


@pytest.mark.parametrize('sub', ['01', '02', '03'])
def test_groundtruth_labels_aligned_with_the_image(dataset, sub):
    from keyprep.pipeline.antsutils import import_ants

    t1w = dataset / f'sub-{sub}' / 'anat' / f'sub-{sub}_T1w.nii.gz'
    gt = dataset / 'derivatives' / 'groundtruth' / f'sub-{sub}' / 'anat'
    img = np.asanyarray(nb.load(str(t1w)).dataobj).astype(float)
    lab = np.asanyarray(nb.load(str(gt / f'sub-{sub}_atlas-AAL_dseg.nii.gz')).dataobj)
    mask = np.asanyarray(nb.load(str(gt / f'sub-{sub}_desc-brain_mask.nii.gz')).dataobj) > 0
    assert len(np.unique(lab)) > 90
    # the labels lie in the head: bright voxels, unlike the rest of the field of view
    assert img[lab > 0].mean() > 2.5 * img[lab == 0].mean()
    assert np.mean(img[lab > 0] > 0.15 * img.max()) > 0.95
    assert np.mean(mask[lab > 0]) > 0.85  # 90.5 % at 1 mm: AAL reaches past the ch2bet mask
    # the exact transform reproduces the carried labels with ANTs
    ants = import_ants(1)
    xfm = gt / f'sub-{sub}_from-colin27_to-T1w_mode-image_xfm.txt'
    out = ants.apply_transforms(ants.image_read(str(t1w)),
                                ants.image_read(str(demo.COLIN27_DIR / 'aal.nii.gz')),
                                [str(xfm)], interpolator='nearestNeighbor').numpy()
    union = (out > 0) | (lab > 0)
    assert np.mean(out[union].astype(int) == lab[union]) > 0.99


def test_same_seed_same_dataset(dataset, tmp_path):
    again = demo.build_demo_dataset(tmp_path / 'bids', n_subjects=1, seed=42, max_rotation=90.0,
                                     resolution=4.0)
    a = nb.load(str(dataset / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'))
    b = nb.load(str(again / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'))
    assert np.array_equal(a.affine, b.affine)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert demo._dataset_is_current(again, demo.demo_parameters(1, 42, 90.0, 4.0))
    assert not demo._dataset_is_current(again, demo.demo_parameters(1, 43, 90.0, 4.0))


def test_rotation_sweep_has_the_asked_angles(tmp_path):
    """``rotations``: one subject per angle, each rotated by exactly that angle (the truth's
    sidecar and participants.tsv say so), recorded in the dataset's parameters."""
    import pandas as pd

    bids = demo.build_demo_dataset(tmp_path / 'bids', n_subjects=5, seed=1, resolution=4.0,
                                   rotations=[0.0, 75.0, 180.0])
    parts = pd.read_csv(bids / 'participants.tsv', sep='\t')
    assert list(parts['participant_id']) == ['sub-01', 'sub-02', 'sub-03']
    assert np.allclose(parts['rotation_deg'], [0.0, 75.0, 180.0], atol=0.01)
    gt = bids / 'derivatives' / 'groundtruth' / 'sub-02' / 'anat'
    meta = json.loads((gt / 'sub-02_from-T1w_to-colin27_mode-image_xfm.json').read_text())
    assert meta['Motion']['angle_deg'] == pytest.approx(75.0, abs=1e-3)
    params = demo.demo_parameters(3, 1, 180.0, 4.0, [0.0, 75.0, 180.0])
    assert demo._dataset_is_current(bids, params)
    assert not demo._dataset_is_current(bids, demo.demo_parameters(3, 1, 180.0, 4.0))
    assert 'rotations' not in demo.demo_parameters(3, 1, 180.0, 4.0)  # old datasets stay current
