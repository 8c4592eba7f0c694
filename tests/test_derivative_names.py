"""Every output of a run has a file name of its own: several contrasts and runs of one
participant never overwrite each other, and the workflow refuses to be built otherwise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from nipype.pipeline import engine as pe

from keyprep.bids_app.bids import AnatImage, ProcessingGroup
from keyprep.interfaces.bids import DerivativesDataSink
from keyprep.pipeline.targets import parse_target
from keyprep.workflows.base import init_keyprep_wf
from keyprep.workflows.derivatives import (
    DuplicateDerivativeError,
    check_unique_derivatives,
    planned_derivatives,
)

TPL = 'MNI152NLin2009aSym'

#: sub-01: a T1w and a T2w (the case that lost files); sub-02: two runs of T1w, a T2w run
#: and a FLAIR.
IMAGES = {
    '01': ['sub-01_T1w', 'sub-01_T2w'],
    '02': ['sub-02_run-1_T1w', 'sub-02_run-2_T1w', 'sub-02_run-1_T2w', 'sub-02_FLAIR'],
}


def _groups(root: Path) -> list[ProcessingGroup]:
    groups = []
    for sub, names in IMAGES.items():
        group = ProcessingGroup(sub, None)
        for name in names:
            path = root / f'sub-{sub}' / 'anat' / f'{name}.nii.gz'
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()  # building the graph only needs the file to exist
            group.images.append(AnatImage(path, name.rsplit('_', 1)[1], sub, None))
        groups.append(group)
    return groups


def _build(root: Path, methods=('antsRigid', 'keymorphAffine')):
    return init_keyprep_wf(groups=_groups(root), target=parse_target(TPL),
                           target_file=parse_target(TPL).path, skip_source=None,
                           methods=list(methods), bids_dir=root, output_dir=root / 'out',
                           work_dir=root / 'work', run_uuid='test', sloppy=True)


def test_every_derivative_of_every_image_has_its_own_name(tmp_path):
    wf = _build(tmp_path)  # the build itself checks (check_unique_derivatives)
    planned = planned_derivatives(wf)
    counts = Counter(f.path for f in planned)
    assert not [p for p, n in counts.items() if n > 1]
    names = {Path(f.path).name for f in planned}
    anat = {n for n in names if n.startswith('sub-01_')}
    # the T1w keeps the names it always had; the T2w's carry its contrast
    for stem in ('desc-brain_mask', 'seg-synthseg_dseg', 'seg-tissue_dseg'):
        assert f'sub-01_{stem}.*' in anat
        assert f'sub-01_space-T2w_{stem}.*' in anat
    for engine in ('antsRigid', 'keymorphAffine'):
        for stem in (f'seg-synthseg_desc-{engine}_dseg', f'seg-tissue_desc-{engine}_dseg',
                     f'desc-{engine}_jacobian'):
            assert f'sub-01_space-{TPL}_{stem}.*' in anat
            assert f'sub-01_from-T2w_space-{TPL}_{stem}.*' in anat
        assert f'sub-01_from-T2w_space-{TPL}_desc-{engine}_jacobian.png' in names
    assert 'sub-01_space-T2w_desc-synthseg_dseg.png' in names
    assert 'sub-01_space-T2w_desc-tissue_dseg.png' in names
    # two runs of T1w, a T2w run and a FLAIR: one mask and one label map each
    masks = sorted(n for n in names if n.startswith('sub-02_') and n.endswith('_mask.*'))
    assert masks == ['sub-02_run-1_desc-brain_mask.*', 'sub-02_run-1_space-T2w_desc-brain_mask.*',
                     'sub-02_run-2_desc-brain_mask.*', 'sub-02_space-FLAIR_desc-brain_mask.*']
    n_images = sum(len(v) for v in IMAGES.values())
    synthseg = [n for n in names if n.endswith('seg-synthseg_dseg.*')]
    assert len(synthseg) == n_images
    warped = [n for n in names if '_seg-synthseg_desc-' in n and n.endswith('_dseg.*')]
    assert len(warped) == 2 * n_images


def test_each_label_map_names_its_own_source(tmp_path):
    """The ``seg-synthseg`` sidecar of each image lists that image (and only it) as its
    source: the T2w's no longer replaces the T1w's."""
    wf = _build(tmp_path, methods=['antsRigid'])
    img = tmp_path / 'labels.nii.gz'
    nb.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4)).to_filename(img)
    written = {}
    for sub in ('01',):
        part = wf.get_node(f'sub_{sub}_wf')
        for name in IMAGES[sub]:
            key = name.replace(f'sub-{sub}_', '')
            sink = part.get_node(f'ds_{key}_synthseg')
            sink.inputs.in_file = str(img)
            res = sink.interface.run(cwd=str(tmp_path))  # just this sink
            written[name] = res.outputs.out_file
    assert len(set(written.values())) == len(written)
    for name, out in written.items():
        side = json.loads(Path(out.replace('.nii.gz', '.json')).read_text())
        assert side['Sources'] == [f'bids:raw:sub-01/anat/{name}.nii.gz']


def _sink(name, out, **kw):
    return pe.Node(DerivativesDataSink(base_directory=str(out), **kw), name=name)


def _wf_with(*nodes):
    wf = pe.Workflow(name='w')
    inner = pe.Workflow(name='inner')
    inner.add_nodes(list(nodes[1:]))
    wf.add_nodes([nodes[0], inner])
    return wf


def test_guard_refuses_two_sinks_writing_one_file(tmp_path):
    src = 'sub-01/anat/sub-01_T1w.nii.gz'
    a = _sink('ds_a', tmp_path, source_file=src, entities={'desc': 'brain', 'suffix': 'mask'})
    b = _sink('ds_b', tmp_path, source_file=src, entities={'desc': 'brain', 'suffix': 'mask'})
    with pytest.raises(DuplicateDerivativeError, match=r'sub-01_desc-brain_mask.*ds_a.*inner\.ds_b'):
        check_unique_derivatives(_wf_with(a, b))
    # the same file by an explicit path
    c = _sink('ds_c', tmp_path, source_file=src,
              relative_path='sub-01/anat/sub-01_desc-brain_mask.nii.gz')
    with pytest.raises(DuplicateDerivativeError):
        check_unique_derivatives(_wf_with(a, c))
    # a JSON written by one sink where another writes its sidecar
    d = _sink('ds_d', tmp_path, source_file=src, sidecar=False,
              relative_path='sub-01/anat/sub-01_desc-brain_mask.json')
    with pytest.raises(DuplicateDerivativeError):
        check_unique_derivatives(_wf_with(a, d))


def test_guard_accepts_distinct_files(tmp_path):
    src = 'sub-01/anat/sub-01_T1w.nii.gz'
    nodes = [
        _sink('ds_mask', tmp_path, source_file=src, entities={'desc': 'brain', 'suffix': 'mask'}),
        _sink('ds_t2mask', tmp_path, source_file='sub-01/anat/sub-01_T2w.nii.gz',
              entities={'desc': 'brain', 'suffix': 'mask'}),
        # a table and its JSON description (no sidecars): same stem, other extensions
        _sink('ds_kp', tmp_path, source_file=src, sidecar=False,
              entities={'desc': 'keypoints', 'extension': '.tsv'}),
        _sink('ds_kp_json', tmp_path, source_file=src, sidecar=False,
              entities={'desc': 'keypoints', 'extension': '.json'}),
    ]
    planned = check_unique_derivatives(_wf_with(*nodes))
    assert len(planned) == 2 + 2 + 2  # two images with sidecars, two files without


def test_workflow_build_fails_on_a_name_clash(tmp_path, monkeypatch):
    """Without the contrast in the names, the T1w's and T2w's labels clash: the workflow is
    not built (the run stops before any node runs)."""
    from keyprep.pipeline import naming

    monkeypatch.setattr(naming, '_name_contrast', lambda ents, contrast: None)
    with pytest.raises(DuplicateDerivativeError, match='same file name'):
        _build(tmp_path, methods=['antsRigid'])
