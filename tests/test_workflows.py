"""Workflow graphs are built and connected for every combination of options, and a new
engine registered later appears in the CLI, the workflow, the outputs and QC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nipype.pipeline.engine.utils import generate_expanded_graph

from keyprep.bids_app.bids import AnatImage, ProcessingGroup
from keyprep.pipeline.engines import base as engine_base
from keyprep.pipeline.engines.base import Engine, RegistrationResult, register_engine
from keyprep.pipeline.targets import parse_target
from keyprep.workflows.base import init_keyprep_wf


def _groups(root: Path, sessions=(None,), suffixes=('T1w',)):
    groups = []
    for sub in ('01', '02'):
        for ses in sessions:
            g = ProcessingGroup(sub, ses)
            for suffix in suffixes:
                ses_part = f'_ses-{ses}' if ses else ''
                ses_dir = f'ses-{ses}/' if ses else ''
                path = root / f'sub-{sub}/{ses_dir}anat/sub-{sub}{ses_part}_{suffix}.nii.gz'
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()  # graph building only needs the file to exist
                g.images.append(AnatImage(path, suffix, sub, ses))
            groups.append(g)
    return groups


def _build(tmp_path, groups, methods, target='MNI152NLin2009aSym', skip=None, **kw):
    spec = parse_target(target)
    target_file = spec.path if spec.path else groups[0].images[0].path
    return init_keyprep_wf(groups=groups, target=spec, target_file=target_file,
                           skip_source=skip, methods=methods, bids_dir=tmp_path,
                           output_dir=tmp_path / 'out', work_dir=tmp_path / 'work',
                           run_uuid='test', **kw)


@pytest.mark.parametrize('sessions', [(None,), ('1', '2')])
@pytest.mark.parametrize('suffixes', [('T1w',), ('T1w', 'T2w', 'FLAIR')])
@pytest.mark.parametrize('methods', [['antsRigid'], ['antsRigid', 'antsAffine', 'antsSyN']])
def test_graph_builds_and_expands(tmp_path, sessions, suffixes, methods):
    groups = _groups(tmp_path, sessions, suffixes)
    wf = _build(tmp_path, groups, methods, sloppy=True)
    flat = wf._create_flat_graph()
    expanded = generate_expanded_graph(flat)
    names = {n.fullname for n in expanded.nodes()}
    n_images = len(groups) * len(suffixes)
    regs = [n for n in names if n.endswith('.register')]
    assert len(regs) == n_images * len(methods)
    assert len([n for n in names if n.endswith('.qc_tables')]) == len(groups)
    assert len([n for n in names if n.endswith('target_wf.prep_wf.tissue_seg')]) == 1
    # every registration is connected to the target's preparation
    for node in expanded.nodes():
        if node.fullname.endswith('.register'):
            preds = {p.fullname.split('.')[-1] for p in expanded.predecessors(node)}
            assert {'skull_strip', 'bias_correct'} <= preds


def test_subject_target_skips_registering_itself(tmp_path):
    groups = _groups(tmp_path)
    skip = groups[0].images[0].path
    wf = _build(tmp_path, groups, ['antsRigid'], target='sub-01', skip=skip)
    names = {n.fullname for n in generate_expanded_graph(wf._create_flat_graph()).nodes()}
    assert not [n for n in names if 'sub_01_wf' in n and n.endswith('.register')]
    assert [n for n in names if 'sub_02_wf' in n and n.endswith('.register')]


def test_cuda_device_declares_gpu_use(tmp_path):
    wf = _build(tmp_path, _groups(tmp_path), ['antsRigid'], device='cuda')
    strip = [n for n in generate_expanded_graph(wf._create_flat_graph()).nodes()
             if n.fullname.endswith('skull_strip')]
    assert strip and all(n.inputs.use_gpu for n in strip)


def _expanded(wf):
    return generate_expanded_graph(wf._create_flat_graph())


def _short(node):
    return node.fullname.split('.')[-1]


def test_label_network_nodes_exist_and_connect(tmp_path):
    groups = _groups(tmp_path, suffixes=('T1w', 'T2w'))
    graph = _expanded(_build(tmp_path, groups, ['antsRigid', 'antsSyN']))
    nodes = {n.fullname: n for n in graph.nodes()}
    labels = [n for name, n in nodes.items() if name.endswith('.synthseg')]
    # one per image (2 subjects x 2 contrasts) and one for the target
    assert len(labels) == 5
    target = [n for n in labels if '.target_wf.' in n.fullname]
    assert len(target) == 1
    for node in labels:
        # the conformed image, and deepbet's brain mask for the labeller's self-check
        assert {_short(p) for p in graph.predecessors(node)} == {'conform', 'skull_strip'}
        edge = graph.get_edge_data([p for p in graph.predecessors(node) if _short(p) == 'skull_strip'][0], node)
        assert ('out_mask', 'reference_mask') in edge['connect']
    # the target's labels reach the QC of every registration (2 x 2 images x 2 engines)
    target_succ = {n.fullname for n in graph.successors(target[0])}
    qcs = [name for name in nodes if name.endswith('.qc')]
    assert len(qcs) == 8 and set(qcs) <= target_succ
    assert any(name.endswith('ds_target_synthseg') for name in target_succ)
    assert any(name.endswith('target_wf.fig_synthseg') for name in target_succ)
    for node in labels:
        if node is target[0]:
            continue
        succ = {_short(n) for n in graph.successors(node)}
        key = node.fullname.split('.')[-2].split('_')[1]  # anat_<key>_wf
        assert {f'ds_{key}_synthseg', f'fig_{key}_synthseg', 'warp_synthseg'} <= succ
        assert 'skull_strip' not in succ  # deepbet by default
        assert node.inputs.device == 'cpu' and node.inputs.seed == 0 and node.inputs.flip_tta
    for name in qcs:
        preds = {_short(n) for n in graph.predecessors(nodes[name])}
        assert {'warp_synthseg', 'warp_dseg', 'synthseg'} <= preds
    warp = [n for name, n in nodes.items() if name.endswith('.warp_synthseg')]
    assert len(warp) == 8 and all(n.inputs.interpolation == 'genericLabel' for n in warp)
    assert all({'register', 'synthseg'} <= {_short(p) for p in graph.predecessors(n)}
               for n in warp)
    sinks = [name for name in nodes if name.endswith('_synthseg') and '.ds_' in name]
    figs = [name for name in sinks if '_fig_' in name]
    assert len(sinks) - len(figs) == 4 + 8 + 1  # per image, per registration, the target
    assert len(figs) == 4 + 1  # a labels figure per image and for the target


def test_skull_strip_synth_graph(tmp_path):
    groups = _groups(tmp_path)
    graph = _expanded(_build(tmp_path, groups, ['antsRigid'], skull_strip='synth', seed=5))
    strips = [n for n in graph.nodes() if n.fullname.endswith('.skull_strip')]
    assert len(strips) == 3  # 2 images and the target
    for node in strips:
        assert node.inputs.mode == 'auto' and node.inputs.method == 'synth'
        assert 'synthseg' in {_short(p) for p in graph.predecessors(node)}
    labels = [n for n in graph.nodes() if n.fullname.endswith('.synthseg')]
    assert all(n.inputs.seed == 5 for n in labels)
    graph = _expanded(_build(tmp_path, groups, ['antsRigid'], sloppy=True))
    labels = [n for n in graph.nodes() if n.fullname.endswith('.synthseg')]
    assert labels and not any(n.inputs.flip_tta for n in labels)  # --sloppy: no TTA
    # force + synth method, and the default (deepbet): no mask edge
    graph = _expanded(_build(tmp_path, groups, ['antsRigid'], skull_strip='force',
                             skull_strip_method='synth'))
    strips = [n for n in graph.nodes() if n.fullname.endswith('.skull_strip')]
    moving = [n for n in strips if '.target_wf.' not in n.fullname]
    assert all(n.inputs.mode == 'force' and n.inputs.method == 'synth' for n in moving)
    with pytest.raises(ValueError, match='cannot be combined'):
        _build(tmp_path, groups, ['antsRigid'], skull_strip='synth',
               skull_strip_method='deepbet')


def test_packaged_weights_path():
    from keyprep.pipeline.synth.labeller import default_weights
    from keyprep.workflows.anatomical import synthseg_weights

    assert synthseg_weights() == default_weights()


class _CentroidEngine(Engine):
    """A real (if crude) engine: translation aligning the centres of mass."""

    name = 'testCentroid'
    family = 'test'
    transform_kind = 'linear'
    description = 'translation between centres of mass'

    def run(self, fixed, moving, out_dir, options, fixed_mask=None, moving_mask=None):
        import nibabel as nb
        from scipy import ndimage as ndi

        from keyprep.pipeline.antsutils import import_ants
        from keyprep.pipeline.transforms import LPS, apply_transforms

        ants = import_ants()
        centres = []
        for f in (fixed, moving):
            img = nb.load(str(f))
            com = ndi.center_of_mass(np.asanyarray(img.dataobj) > 0)
            centres.append(img.affine[:3, :3] @ com + img.affine[:3, 3])
        shift = LPS @ (centres[1] - centres[0])  # fixed point -> moving point, in LPS
        tx = ants.create_ants_transform(transform_type='AffineTransform', dimension=3,
                                        translation=tuple(shift))
        fwd = str(Path(out_dir) / 'centroid.txt')
        ants.write_transform(tx, fwd)
        warped = apply_transforms(moving, fixed, [fwd], Path(out_dir) / 'warped.nii.gz')
        return RegistrationResult([fwd], [fwd], [True], str(warped))


@pytest.fixture
def centroid_engine():
    register_engine(_CentroidEngine)
    yield _CentroidEngine
    engine_base._REGISTRY.pop(_CentroidEngine.name, None)


def test_new_engine_plugs_in_everywhere(centroid_engine, tmp_path, small_brains, capsys):
    from keyprep.bids_app.parser import build_parser, parse_args
    from keyprep.pipeline.registration import run_engine
    from keyprep.pipeline.transforms import apply_transforms

    assert 'testCentroid' in build_parser().format_help()
    (tmp_path / 'ds').mkdir()
    opts = parse_args([str(tmp_path / 'ds'), str(tmp_path / 'o'), 'participant',
                       '--methods', 'testcentroid', 'antsRigid'])
    assert opts.methods == ['testCentroid', 'antsRigid']
    wf = _build(tmp_path, _groups(tmp_path), opts.methods)
    names = {n.fullname for n in generate_expanded_graph(wf._create_flat_graph()).nodes()}
    assert any('reg_T1w_testCentroid_wf.register' in n for n in names)
    assert any('ds_T1w_testCentroid_fwd' in n for n in names)
    assert any('reg_T1w_testCentroid_wf.qc' in n for n in names)
    run = run_engine('testCentroid', small_brains['fixed'], small_brains['moving'],
                     tmp_path / 'run')
    again = apply_transforms(small_brains['moving'], small_brains['fixed'], [run.fwd_xfm],
                             tmp_path / 'again.nii.gz')
    import nibabel as nb

    assert np.allclose(nb.load(str(again)).get_fdata(), nb.load(run.warped).get_fdata(),
                       atol=1e-3)
    assert run.runtime_s >= 0 and run.peak_mem_mb > 0


class _TwoVariantEngine(_CentroidEngine):
    """The centroid engine giving two results from one run (graph building only)."""

    name = 'testTwoVariants'

    def variants(self, options):
        return [('testTwoVariantsA', {}), ('testTwoVariantsB', {})]


@pytest.fixture
def two_variant_engine():
    register_engine(_TwoVariantEngine)
    yield _TwoVariantEngine
    engine_base._REGISTRY.pop(_TwoVariantEngine.name, None)


def _missing_qc_names(wf, groups, methods, variants) -> list[str]:
    """Every name the QC recovery (:mod:`keyprep.bids_app.qctables`) looks for that the
    built workflow lacks: the QC nodes (and their folders, where Nipype runs them), the
    prefixes of the engines, chains, preprocessing and target it attributes crashes by."""
    from keyprep.workflows.layout import QCSource, group_prefixes, qc_sources, shared_prefixes

    flat = wf._create_flat_graph()
    nodes = {n.fullname: n for n in flat.nodes()}
    missing = []

    def has_prefix(prefix):
        if not any(n.startswith(prefix) for n in nodes):
            missing.append(prefix)

    target, groupwise = shared_prefixes(wf.name)
    has_prefix(target)
    if any(n.startswith(groupwise) for n in nodes):  # only with --target groupwise
        has_prefix(groupwise)
    for group in groups:
        split = any(n.startswith(group_prefixes(wf.name, group.name)[1]) for n in nodes)
        for image in group.images:
            for src in qc_sources(wf.name, group.name, image.key, methods, variants):
                assert isinstance(src, QCSource)
                node = nodes.get(src.qc_node)
                if node is None or type(node.interface).__name__ != 'RegistrationQC':
                    missing.append(src.qc_node)
                    continue
                node.base_dir = wf.base_dir  # as Workflow.run sets it
                long_file, summary_file = src.files(wf.base_dir)
                if Path(node.output_dir()) != summary_file.parent:
                    missing.append(f'{src.qc_node} folder {summary_file.parent}')
                for prefix in (src.prefix, src.engine_prefix, *src.chains):
                    has_prefix(prefix)
                has_prefix(src.anat_prefixes[1 if split else 0])
    return missing


@pytest.mark.parametrize('target', ['MNI152NLin2009aSym', 'groupwise:res-2'])
def test_qc_recovery_names_are_the_workflows_names(tmp_path, two_variant_engine, target):
    """The nodes and folders the QC recovery reads after a failed node exist in the built
    workflow (one engine with one result, one with two; both target layouts), and a renamed
    QC node is reported."""
    from keyprep.workflows.registration import method_variants

    groups = _groups(tmp_path, ('1',), ('T1w', 'T2w'))
    methods = ['antsRigid', 'testTwoVariants']
    variants = {m: [v for v, _ in method_variants(m, {}, True)] for m in methods}
    assert variants['testTwoVariants'] == ['testTwoVariantsA', 'testTwoVariantsB']
    wf = _build(tmp_path, groups, methods, target=target, sloppy=True)
    assert _missing_qc_names(wf, groups, methods, variants) == []

    wf = _build(tmp_path, groups, methods, target=target, sloppy=True)
    key = groups[0].images[1].key
    assert key == 'ses_1_T2w'
    path = f'sub_01_ses_1_wf.reg_{key}_testTwoVariants_wf.testTwoVariantsB_wf.qc'
    wf.get_node(path).name = 'qc_rows'  # what a rename in the builder would do
    assert _missing_qc_names(wf, groups, methods, variants) == [f'{wf.name}.{path}']


def test_keymorph_registration_gets_the_label_networks_labels(tmp_path):
    """One pose estimate per image: the label network's (its own pose handling) labels of
    the image and of the target reach the register node of every KeyMorph engine, whose
    default pose mode takes the pose from them instead of searching it again; engines that
    do not use labels are not given them."""
    from keyprep.pipeline.engines import EngineOptions, get_engine

    groups = _groups(tmp_path, suffixes=('T1w', 'T2w'))
    methods = ['antsRigid', 'keymorphAffine', 'keymorphTPS']
    graph = _expanded(_build(tmp_path, groups, methods))
    nodes = {n.fullname: n for n in graph.nodes()}
    labellers = [n for name, n in nodes.items() if name.endswith('.synthseg')]
    assert len(labellers) == 4 + 1  # one per image and one for the target: one search each
    target = next(n for n in labellers if '.target_wf.' in n.fullname)
    registers = [n for name, n in nodes.items() if name.endswith('.register')]
    assert len(registers) == 4 * len(methods)
    seen = 0
    for reg in registers:
        engine = get_engine(reg.inputs.method)
        fed = {}
        for pred in graph.predecessors(reg):
            for src, dst in graph.get_edge_data(pred, reg)['connect']:
                fed[dst] = (pred, src)
        if not engine.uses_labels:
            assert 'fixed_labels' not in fed and 'moving_labels' not in fed
            continue
        seen += 1
        assert engine.parameters(EngineOptions(params=dict(reg.inputs.params))
                                 )['pose_search'] == 'labels'
        assert fed['fixed_labels'][0] is target
        moving_labeller = fed['moving_labels'][0]
        assert moving_labeller in labellers and moving_labeller is not target
        # the moving image's labeller labelled the image this node registers
        image_wf = moving_labeller.fullname.rsplit('.', 1)[0]  # ...sub_01_wf.anat_T1w_wf
        assert fed['moving'][0].fullname.rsplit('.', 1)[0] == image_wf
        assert fed['fixed_labels'][1] == fed['moving_labels'][1]  # the same output field
    assert seen == 4 * 2
