"""The label network's Nipype interface and ``--skull-strip synth`` on small volumes."""

from __future__ import annotations

import hashlib
import json

import nibabel as nb
import numpy as np
import pytest

from keyprep.interfaces.anatomical import SkullStrip, SynthSegLabels
from keyprep.workflows.anatomical import synthseg_weights

pytestmark = pytest.mark.skipif(not synthseg_weights().is_file(),
                                reason='the packaged label-network weights are missing')


def _blob(path, shape=(30, 34, 30), zoom=2.0):
    """A small bright ellipsoid on a noisy background, RAS, ``zoom`` mm voxels."""
    g = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.sqrt((((g - c[:, None, None, None]) / (0.35 * np.array(shape))[:, None, None, None])
                 ** 2).sum(0))
    data = np.where(r < 1, 100.0, 5.0) + np.random.default_rng(0).normal(0, 1, shape)
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = -zoom * c
    nb.Nifti1Image(data.astype(np.float32), aff).to_filename(path)
    return path


def test_synthseg_interface_outputs_and_provenance(tmp_path):
    in_file = _blob(tmp_path / 'img.nii.gz')
    res = SynthSegLabels(in_file=str(in_file), weights=str(synthseg_weights()), seed=3,
                         flip_tta=False).run(cwd=str(tmp_path))
    out = res.outputs
    ref = nb.load(in_file)
    for f, dtype in ((out.out_labels, 'int16'), (out.out_mask, 'uint8')):
        img = nb.load(f)
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        assert img.get_data_dtype() == dtype
    meta = json.loads(open(out.out_report).read())
    assert meta == json.loads(json.dumps(out.out_meta))
    sha = hashlib.sha256(synthseg_weights().read_bytes()).hexdigest()
    assert meta['NetworkWeightsSha256'] == sha and isinstance(meta['NetworkTrainingStep'], int)
    assert meta['Device'] == 'cpu' and meta['RandomSeed'] == 3 and meta['FlipTTA'] is False
    assert set(meta['SoftwareVersionsByPackage']) >= {'keyprep', 'torch', 'nibabel'}
    assert isinstance(meta['SoftwareVersions'], str) and 'keyprep ' in meta['SoftwareVersions']
    assert len(meta['VolumesCm3']) == 32 and meta['RuntimeS'] > 0


def test_synthseg_weights_are_hashed_by_content(tmp_path):
    """New weights (same path) must invalidate Nipype's cache: the input is a File."""
    a = tmp_path / 'w.pt'
    a.write_bytes(b'one')
    node = SynthSegLabels(in_file=str(_blob(tmp_path / 'i.nii.gz')), weights=str(a))
    h1 = node.inputs.get_hashval(hash_method='content')[1]
    a.write_bytes(b'two')
    h2 = node.inputs.get_hashval(hash_method='content')[1]
    node.inputs.device = 'cuda'  # not part of the cache key
    h3 = node.inputs.get_hashval(hash_method='content')[1]
    assert h1 != h2 and h2 == h3


def test_skull_strip_synth_uses_the_network_mask(tmp_path):
    head = tmp_path / 'head.nii.gz'
    img = nb.load(_blob(tmp_path / 'blob.nii.gz', shape=(60, 70, 60), zoom=3.0))
    data = np.asanyarray(img.dataobj) + 20.0  # no exact background: not brain-extracted
    nb.Nifti1Image(data, img.affine).to_filename(head)
    mask = np.zeros(data.shape, np.uint8)
    mask[15:45, 20:50, 15:45] = 1  # 729 cm3: a brain-sized foreground
    mask_file = tmp_path / 'netmask.nii.gz'
    nb.Nifti1Image(mask, img.affine).to_filename(mask_file)
    meta = {'NetworkWeights': 'w.pt', 'NetworkWeightsSha256': 'f' * 64,
            'NetworkTrainingStep': 9, 'Device': 'cpu'}
    res = SkullStrip(in_file=str(head), mode='auto', method='synth', synth_mask=str(mask_file),
                     synth_meta=meta).run(cwd=str(tmp_path))
    got = np.asanyarray(nb.load(res.outputs.out_mask).dataobj)
    assert np.array_equal(got > 0, mask > 0)
    assert res.outputs.out_meta['InputSkullStripped'] is False
    assert 'label network' in res.outputs.out_meta['SkullStripMethod']
    assert 'ffffffffffff' in res.outputs.out_meta['SkullStripMethod']
    # an image detected as brain-only keeps its foreground mask, as in auto mode
    brain = tmp_path / 'brain.nii.gz'
    nb.Nifti1Image(np.where(mask > 0, data, 0).astype(np.float32), img.affine).to_filename(brain)
    res = SkullStrip(in_file=str(brain), mode='auto', method='synth',
                     synth_mask=str(mask_file)).run(cwd=str(tmp_path))
    assert res.outputs.out_meta['InputSkullStripped'] is True
    assert res.outputs.out_meta['SkullStripMethod'].startswith('foreground')
