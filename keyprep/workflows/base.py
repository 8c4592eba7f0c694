"""Top-level workflows: the target, then one sub-workflow per participant (and session)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .. import __version__
from .layout import (
    GROUPWISE_WF,
    TARGET_WF,
    anat_group_wf_name,
    anat_wf_name,
    participant_wf_name,
    registration_wf_name,
)

__all__ = ['init_keyprep_wf', 'init_participant_wf', 'init_target_wf', 'workflow_name']


def workflow_name() -> str:
    """Top-level name, versioned so that a new minor release never reuses an old cache.

    >>> workflow_name().startswith('keyprep_')
    True
    """
    major, minor = __version__.split('.')[:2]
    return f'keyprep_{major}_{minor}_wf'


def init_target_wf(*, target, target_file: Path | None, output_dir: Path, omp_nthreads: int = 1,
                   device: str = 'cpu', seed: int = 0, skull_strip_method: str = 'deepbet',
                   sloppy: bool = False, name: str = TARGET_WF) -> pe.Workflow:
    """Prepare the registration target once per run: brain, mask, tissue labels and the
    label network's labels.

    The target's mask and labels are also written to ``<output_dir>/tpl-<target>/`` so
    that the reference side of every Dice can be inspected, with a figure of its labels in
    ``tpl-<target>/figures/``.

    Every node of this sub-workflow has inputs that do not depend on the participants (the
    target file, its resolution, the packaged weights, the seed), so Nipype's cache in the
    work folder computes them once for all participants of a run, and a rerun with the
    same work folder (more participants, other engines) reuses them.

    With ``target_file=None`` (``--target groupwise``), the caller connects the image to
    ``inputnode.in_file``.

    Outputs
    -------
    brain, mask, dseg, synthseg, synthseg_meta
        The prepared target.
    """
    from ..pipeline.naming import target_figure_name, target_stem
    from ..interfaces.bids import DerivativesDataSink
    from ..interfaces.reports import LabelsFigure
    from .anatomical import init_anat_preproc_wf

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['in_file']), name='inputnode')
    if target_file is not None:
        inputnode.inputs.in_file = str(target_file)
    source = str(target_file) if target_file is not None else f'tpl-{target.name}'
    outputnode = pe.Node(niu.IdentityInterface(fields=['brain', 'mask', 'dseg', 'synthseg',
                                                       'synthseg_meta']),
                         name='outputnode')
    anat_wf = init_anat_preproc_wf(contrast='T1w', skull_strip='auto',
                                   skull_strip_method=skull_strip_method,
                                   brain_extracted=target.brain_extracted,
                                   resolution=target.resolution, device=device,
                                   omp_nthreads=omp_nthreads, seed=seed, sloppy=sloppy,
                                   name='prep_wf')
    stem = target_stem(target.name, target.resolution)
    sinks = {
        'brain': (f'{stem}_desc-brain_T1w.nii.gz', None, {'SkullStripped': True}),
        'mask': (f'{stem}_desc-brain_mask.nii.gz', 'uint8', {'Type': 'Brain'}),
        'dseg': (f'{stem}_seg-tissue_dseg.nii.gz', 'int16',
                 {'Description': 'Tissue labels of the registration target (1=GM 2=WM 3=CSF)'}),
        'synthseg': (f'{stem}_seg-synthseg_dseg.nii.gz', 'int16', {}),
    }
    wf.connect(inputnode, 'in_file', anat_wf, 'inputnode.in_file')
    for field, (rel, dtype, meta) in sinks.items():
        ds = pe.Node(DerivativesDataSink(base_directory=str(output_dir), relative_path=rel,
                                         source_file=source,
                                         meta_dict={'Sources': [source], **meta}),
                     name=f'ds_target_{field}', run_without_submitting=True)
        if dtype:
            ds.inputs.data_dtype = dtype
        wf.connect([
            (anat_wf, ds, [(f'outputnode.{field}', 'in_file')]),
            (anat_wf, outputnode, [(f'outputnode.{field}', field)]),
        ])  # fmt:skip
        if field == 'synthseg':
            wf.connect(anat_wf, 'outputnode.synthseg_meta', ds, 'extra_meta')
    fig = pe.Node(LabelsFigure(lut=synthseg_lut(),
                               title=f'{target.name}: labels of the label network'),
                  name='fig_synthseg', mem_gb=0.5)
    ds_fig = pe.Node(DerivativesDataSink(
        base_directory=str(output_dir), source_file=source, sidecar=False,
        relative_path=target_figure_name(target.name, target.resolution)),
        name='ds_target_fig_synthseg', run_without_submitting=True)
    wf.connect([
        (anat_wf, fig, [('outputnode.preproc', 'image'), ('outputnode.synthseg', 'labels')]),
        (fig, ds_fig, [('out_file', 'in_file')]),
        (anat_wf, outputnode, [('outputnode.synthseg_meta', 'synthseg_meta')]),
    ])  # fmt:skip
    return wf


def synthseg_lut() -> dict[int, tuple[str, str]]:
    """Label -> (name, colour) of the label network's structures, for the figures."""
    from ..pipeline.synth.labels import lut_tsv

    rows = [line.split('\t') for line in lut_tsv().splitlines()[1:]]
    return {int(r[0]): (r[1], r[3]) for r in rows}


def init_participant_wf(*, group, target, skip_source: Path | None, methods: list[str],
                        bids_dir: Path, output_dir: Path, crash_dir: Path,
                        skull_strip: str = 'auto', skull_strip_method: str | None = None,
                        omp_nthreads: int = 1, device: str = 'cpu', seed: int = 0,
                        sloppy: bool = False,
                        engine_params: dict[str, dict] | None = None) -> pe.Workflow:
    """All images of one participant (or session): preprocessing, labels, every engine, QC,
    figures.

    Parameters
    ----------
    group
        A :class:`keyprep.bids_app.bids.ProcessingGroup` (its valid images).
    target
        The :class:`keyprep.pipeline.targets.TargetSpec`.
    skip_source
        An image not to register (the target itself, with ``--target sub-<label>``).
    engine_params
        Engine name -> engine-specific parameters (e.g. the ``--keymorph-*`` options).

    Inputs
    ------
    target_brain, target_mask, target_dseg, target_synthseg
        From :func:`init_target_wf`.
    """
    _, wf = _participant_wfs(
        group=group, target=target, skip_source=skip_source, methods=methods,
        bids_dir=bids_dir, output_dir=output_dir, crash_dir=crash_dir,
        skull_strip=skull_strip, skull_strip_method=skull_strip_method,
        omp_nthreads=omp_nthreads, device=device, seed=seed, sloppy=sloppy,
        engine_params=engine_params, split=False)
    return wf


#: Outputs of an image's preprocessing that its registrations use.
_ANAT_TO_REG = ('brain', 'mask', 'dseg', 'synthseg', 'synthseg_meta')


def _participant_wfs(*, group, target, skip_source: Path | None, methods: list[str],
                     bids_dir: Path, output_dir: Path, crash_dir: Path,
                     skull_strip: str = 'auto', skull_strip_method: str | None = None,
                     omp_nthreads: int = 1, device: str = 'cpu', seed: int = 0,
                     sloppy: bool = False, engine_params: dict[str, dict] | None = None,
                     split: bool = False) -> tuple[pe.Workflow | None, pe.Workflow]:
    """The participant's workflow; with ``split``, its preprocessing in a workflow of its own
    (``<group>_anat_wf``) whose outputs ``anat_<key>_wf.outputnode.*`` the caller connects
    to ``anat_<key>_bridge.*`` of the registrations' workflow (``<group>_wf``), so that
    something built from the preprocessed images of every participant (a groupwise
    template) can sit between the two without a cycle between workflows."""
    from ..pipeline.naming import bids_uri, qc_table_name
    from ..interfaces.bids import DerivativesDataSink
    from ..interfaces.qc import QCTables
    from ..interfaces.reports import LabelsFigure, MaskFigure
    from ..pipeline.anatomy import TISSUE_LABELS
    from ..pipeline.engines import EngineOptions, get_engine
    from ..pipeline.qcreport import (
        LONG_COLUMNS,
        LONG_DESCRIPTION,
        SUMMARY_COLUMNS,
        SUMMARY_DESCRIPTION,
        table_sidecar,
    )
    from .anatomical import init_anat_preproc_wf
    from .registration import init_registration_wf, method_variants, variant_output

    engine_params = engine_params or {}
    wf = pe.Workflow(name=participant_wf_name(group.name))
    wf.config['execution']['crashdump_dir'] = str(crash_dir)
    awf = pe.Workflow(name=anat_group_wf_name(group.name)) if split else wf
    if split:
        awf.config['execution']['crashdump_dir'] = str(crash_dir)
    inputnode = pe.Node(niu.IdentityInterface(fields=['target_brain', 'target_mask',
                                                      'target_dseg', 'target_synthseg']),
                        name='inputnode')
    out = str(output_dir)
    lut = {k: (v[1], v[2]) for k, v in TISSUE_LABELS.items()}
    struct_lut = synthseg_lut()

    def sink(name, source, **kw):
        return pe.Node(DerivativesDataSink(base_directory=out, source_file=str(source),
                                           bids_dir=str(bids_dir), **kw),
                       name=name, run_without_submitting=True)

    # the bundled template, a subject's T1w and the groupwise template are T1-weighted; a
    # user's image may be anything (engines then use a multi-modal similarity)
    target_contrast = 'T1w' if target.kind in ('template', 'subject', 'groupwise') else ''
    qc_long, qc_summary = [], []
    for image in group.images:
        src = image.path
        key = image.key
        anat_wf = init_anat_preproc_wf(contrast=image.suffix, skull_strip=skull_strip,
                                       skull_strip_method=skull_strip_method, device=device,
                                       omp_nthreads=omp_nthreads, seed=seed, sloppy=sloppy,
                                       name=anat_wf_name(key))
        anat_wf.inputs.inputnode.in_file = str(src)
        ds_preproc = sink(f'ds_{key}_preproc', src, entities={'desc': 'preproc'},
                          meta_dict={'SkullStripped': False,
                                     'Description': 'Reoriented to RAS (world geometry '
                                                    'unchanged) and N4 bias-field corrected'})
        ds_mask = sink(f'ds_{key}_mask', src, entities={'desc': 'brain', 'suffix': 'mask'},
                       meta_dict={'Type': 'Brain'}, data_dtype='uint8')
        ds_dseg = sink(f'ds_{key}_dseg', src, entities={'seg': 'tissue', 'suffix': 'dseg'},
                       data_dtype='int16')
        ds_synthseg = sink(f'ds_{key}_synthseg', src,
                           entities={'seg': 'synthseg', 'suffix': 'dseg'}, data_dtype='int16')
        fig_synthseg = pe.Node(LabelsFigure(lut=struct_lut,
                                            title=f'{src.name}: labels of the label network'),
                               name=f'fig_{key}_synthseg', mem_gb=0.5)
        ds_fig_synthseg = sink(f'ds_{key}_fig_synthseg', src, sidecar=False,
                               entities={'datatype': 'figures', 'desc': 'synthseg',
                                         'suffix': 'dseg', 'extension': '.png'})
        fig_mask = pe.Node(MaskFigure(title=f'{src.name}: brain mask'),
                           name=f'fig_{key}_mask', mem_gb=0.5)
        fig_dseg = pe.Node(LabelsFigure(lut=lut, title=f'{src.name}: tissue labels'),
                           name=f'fig_{key}_dseg', mem_gb=0.5)
        ds_fig_mask = sink(f'ds_{key}_fig_mask', src, sidecar=False,
                           entities={'datatype': 'figures', 'desc': 'brainmask',
                                     'extension': '.png'})
        ds_fig_dseg = sink(f'ds_{key}_fig_dseg', src, sidecar=False,
                           entities={'datatype': 'figures', 'desc': 'tissue',
                                     'suffix': 'dseg', 'extension': '.png'})
        awf.connect([
            (anat_wf, ds_preproc, [('outputnode.preproc', 'in_file'),
                                   ('outputnode.conform_meta', 'extra_meta')]),
            (anat_wf, ds_mask, [('outputnode.mask', 'in_file'),
                                ('outputnode.skullstrip_meta', 'extra_meta')]),
            (anat_wf, ds_dseg, [('outputnode.dseg', 'in_file'),
                                ('outputnode.tissue_meta', 'extra_meta')]),
            (anat_wf, fig_mask, [('outputnode.preproc', 'image'), ('outputnode.mask', 'mask')]),
            (anat_wf, fig_dseg, [('outputnode.preproc', 'image'), ('outputnode.dseg', 'labels')]),
            (fig_mask, ds_fig_mask, [('out_file', 'in_file')]),
            (fig_dseg, ds_fig_dseg, [('out_file', 'in_file')]),
            (anat_wf, ds_synthseg, [('outputnode.synthseg', 'in_file'),
                                    ('outputnode.synthseg_meta', 'extra_meta')]),
            (anat_wf, fig_synthseg, [('outputnode.preproc', 'image'),
                                     ('outputnode.synthseg', 'labels')]),
            (fig_synthseg, ds_fig_synthseg, [('out_file', 'in_file')]),
        ])  # fmt:skip
        if skip_source is not None and Path(src).resolve() == Path(skip_source).resolve():
            continue  # this image is the target: nothing to register
        if split:  # the caller connects <group>_anat_wf.anat_<key>_wf.outputnode to this
            anat_src = pe.Node(niu.IdentityInterface(fields=list(_ANAT_TO_REG)),
                               name=f'anat_{key}_bridge')
            anat_field = '{}'.format
        else:
            anat_src = anat_wf
            anat_field = 'outputnode.{}'.format
        sunk: set = set()  # extra outputs already written for this image
        produced: dict[str, tuple] = {}  # method/variant -> (its workflow, variants)
        for method in methods:
            engine = get_engine(method)
            params = dict(engine_params.get(engine.name, {}))
            variants = method_variants(engine.name, params, sloppy)
            reg_wf = init_registration_wf(
                method=engine.name, subject=group.subject, session=group.session,
                source=bids_uri(src, bids_dir), target=target.name,
                omp_nthreads=omp_nthreads, device=device, seed=seed, sloppy=sloppy,
                params=params, contrasts={'fixed': target_contrast, 'moving': image.suffix},
                name=registration_wf_name(key, engine.name))
            init = engine.init_method(EngineOptions(sloppy=sloppy, params=params))
            if init:  # starts from another method's affine, built before it (resolve_methods)
                if init not in produced:
                    raise ValueError(f'{engine.name} starts from {init}, which is not run '
                                     'before it (see keyprep.pipeline.engines.resolve_methods)')
                src_wf, src_variants = produced[init]
                wf.connect(src_wf, variant_output(src_variants, init, 'fwd_xfm'),
                           reg_wf, 'inputnode.init_xfm')
            for vname, _ in variants:
                produced[vname] = (reg_wf, variants)
            tgt = target.name
            wf.connect([
                (inputnode, reg_wf, [('target_brain', 'inputnode.target_brain'),
                                     ('target_mask', 'inputnode.target_mask'),
                                     ('target_dseg', 'inputnode.target_dseg'),
                                     ('target_synthseg', 'inputnode.target_synthseg')]),
                (anat_src, reg_wf, [(anat_field('brain'), 'inputnode.moving_brain'),
                                    (anat_field('mask'), 'inputnode.moving_mask'),
                                    (anat_field('dseg'), 'inputnode.moving_dseg'),
                                    (anat_field('synthseg'), 'inputnode.moving_synthseg'),
                                    (anat_field('synthseg_meta'), 'inputnode.synthseg_meta')]),
            ])  # fmt:skip
            for vname, _ in variants:
                sinks = _variant_sinks(sink, key, src, vname, image.suffix, tgt,
                                       engine.description)
                for field, node in sinks.items():
                    wf.connect(reg_wf, variant_output(variants, vname, field), node, 'in_file')
                for field in ('fwd_xfm', 'inv_xfm', 'warped'):
                    wf.connect(reg_wf, variant_output(variants, vname, 'record_dict'),
                               sinks[field], 'extra_meta')
                qc_long.append((reg_wf, variant_output(variants, vname, 'qc_long')))
                qc_summary.append((reg_wf, variant_output(variants, vname, 'qc_summary')))
            # extra outputs (keypoints...): once per image, by the first engine writing them
            options = EngineOptions(sloppy=sloppy, params=params)
            for extra in engine.extra_outputs(options):
                ents = dict(extra.entities)
                if extra.image == 'fixed':
                    ents['space'] = tgt
                ident = tuple(sorted(ents.items()))
                if ident in sunk:
                    continue
                sunk.add(ident)
                ds = sink(f'ds_{key}_{extra.key}', src, entities=ents, sidecar=False)
                wf.connect(reg_wf, f'outputnode.{extra.key}', ds, 'in_file')
                if extra.columns or extra.description:
                    side = pe.Node(niu.Function(function=_write_json,
                                                input_names=['obj', 'fname'],
                                                output_names=['out']),
                                   name=f'{extra.key}_{key}_json', run_without_submitting=True)
                    side.inputs.obj = {'Description': extra.description,
                                       **{c: {'Description': d}
                                          for c, d in extra.columns.items()}}
                    side.inputs.fname = f'{extra.key}.json'
                    ds_side = sink(f'ds_{key}_{extra.key}_json', src, sidecar=False,
                                   entities={**ents, 'extension': '.json'})
                    wf.connect(side, 'out', ds_side, 'in_file')
            fig_names = []
            if len(variants) > 1:
                fig_names.append(('fig_variants', f'{engine.name}variants'))
            if all(f'keypoints_{w}' in {x.key for x in engine.extra_outputs(options)}
                   for w in ('moving', 'fixed')):
                fig_names.append(('fig_keypoints', 'keypoints'))
            for field, desc in fig_names:
                ents = {'space': tgt, 'desc': desc, 'datatype': 'figures', 'extension': '.png'}
                ident = tuple(sorted(ents.items()))
                if ident in sunk:
                    continue
                sunk.add(ident)
                ds = sink(f'ds_{key}_{engine.name}_{field}', src, sidecar=False, entities=ents)
                wf.connect(reg_wf, f'outputnode.{field}', ds, 'in_file')

    if not qc_long:
        wf.add_nodes([inputnode])  # nothing registered (this participant is the target)
    if qc_long:
        n = len(qc_long)
        merge_long = pe.Node(niu.Merge(n), name='merge_qc_long', run_without_submitting=True)
        merge_summary = pe.Node(niu.Merge(n), name='merge_qc_summary',
                                run_without_submitting=True)
        for i, ((w1, f1), (w2, f2)) in enumerate(zip(qc_long, qc_summary), start=1):
            wf.connect(w1, f1, merge_long, f'in{i}')
            wf.connect(w2, f2, merge_summary, f'in{i}')
        tables = pe.Node(QCTables(), name='qc_tables', run_without_submitting=True)
        first = group.images[0].path
        ds_long = sink('ds_qc_long', first,
                       relative_path=qc_table_name(group.subject, group.session, 'registration'))
        ds_summary = sink('ds_qc_summary', first,
                          relative_path=qc_table_name(group.subject, group.session,
                                                      'registrationsummary'))
        ds_long_meta = sink('ds_qc_long_json', first, sidecar=False,
                            relative_path=qc_table_name(group.subject, group.session,
                                                        'registration', '.json'))
        ds_summary_meta = sink('ds_qc_summary_json', first, sidecar=False,
                               relative_path=qc_table_name(group.subject, group.session,
                                                           'registrationsummary', '.json'))
        long_json = pe.Node(niu.Function(function=_write_json, input_names=['obj', 'fname'],
                                         output_names=['out']), name='qc_long_json',
                            run_without_submitting=True)
        long_json.inputs.obj = table_sidecar(LONG_COLUMNS, LONG_DESCRIPTION)
        long_json.inputs.fname = 'registration_qc.json'
        summary_json = pe.Node(niu.Function(function=_write_json, input_names=['obj', 'fname'],
                                            output_names=['out']), name='qc_summary_json',
                               run_without_submitting=True)
        summary_json.inputs.obj = table_sidecar(SUMMARY_COLUMNS, SUMMARY_DESCRIPTION)
        summary_json.inputs.fname = 'registrationsummary_qc.json'
        wf.connect([
            (merge_long, tables, [('out', 'in_long')]),
            (merge_summary, tables, [('out', 'in_summary')]),
            (tables, ds_long, [('out_long', 'in_file')]),
            (tables, ds_summary, [('out_summary', 'in_file')]),
            (long_json, ds_long_meta, [('out', 'in_file')]),
            (summary_json, ds_summary_meta, [('out', 'in_file')]),
        ])  # fmt:skip
    for w in ({wf, awf}):
        for node_name in w.list_node_names():
            node = w.get_node(node_name)
            if node is not None:
                node.config = node.config or {}
                node.config.setdefault('execution', {})['crashdump_dir'] = str(crash_dir)
    return (awf if split else None), wf


def _variant_sinks(sink, key: str, src: Path, vname: str, suffix: str, tgt: str,
                   description: str) -> dict:
    """The derivatives of one registration result (one engine variant)."""
    ents = {'desc': vname}
    xfm_meta = {'Engine': vname, 'EngineDescription': description,
                'Convention': 'ITK/ANTs: apply with antsApplyTransforms or '
                              'ants.apply_transforms on the reference grid of the to- '
                              'space'}
    return {
        'fwd_xfm': sink(f'ds_{key}_{vname}_fwd', src,
                        entities={**ents, 'from': suffix, 'to': tgt,
                                  'mode': 'image', 'suffix': 'xfm'},
                        meta_dict=dict(xfm_meta)),
        'inv_xfm': sink(f'ds_{key}_{vname}_inv', src,
                        entities={**ents, 'from': tgt, 'to': suffix,
                                  'mode': 'image', 'suffix': 'xfm'},
                        meta_dict=dict(xfm_meta)),
        'warped': sink(f'ds_{key}_{vname}_warped', src,
                       entities={**ents, 'space': tgt},
                       meta_dict={'SkullStripped': True}),
        'warped_dseg': sink(f'ds_{key}_{vname}_dseg', src,
                            entities={**ents, 'space': tgt, 'seg': 'tissue',
                                      'suffix': 'dseg'}, data_dtype='int16'),
        'warped_synthseg': sink(f'ds_{key}_{vname}_synthseg', src,
                                entities={**ents, 'space': tgt, 'seg': 'synthseg',
                                          'suffix': 'dseg'}, data_dtype='int16',
                                meta_dict={'Description': 'Labels of the label '
                                           'network carried onto the target by the '
                                           'forward transform (genericLabel '
                                           'interpolation)'}),
        'jacobian': sink(f'ds_{key}_{vname}_jacobian', src,
                         entities={**ents, 'space': tgt, 'suffix': 'jacobian'},
                         meta_dict={'Description': 'Jacobian determinant of the '
                                    f'from-{suffix}_to-{tgt} transform on the '
                                    'target grid (>1: the target region maps to a '
                                    'larger region of the subject)',
                                    'Units': 'ratio'}),
        'fig_registration': sink(f'ds_{key}_{vname}_fig_reg', src, sidecar=False,
                                 entities={**ents, 'space': tgt, 'datatype': 'figures',
                                           'extension': '.png'}),
        'fig_jacobian': sink(f'ds_{key}_{vname}_fig_jac', src, sidecar=False,
                             entities={**ents, 'space': tgt, 'datatype': 'figures',
                                       'suffix': 'jacobian', 'extension': '.png'}),
    }


def _write_json(obj, fname):
    """Write ``obj`` as JSON into the node's folder (a Function-node body)."""
    import json
    import os

    out = os.path.abspath(fname)
    with open(out, 'w') as fh:
        json.dump(obj, fh, indent=2)
        fh.write('\n')
    return out


def init_groupwise_wf(*, n_inputs: int, target, output_dir: Path, weights: str | None = None,
                      kind: str = 'affine', omp_nthreads: int = 1, device: str = 'cpu',
                      sources: list[str] | None = None,
                      name: str = GROUPWISE_WF) -> pe.Workflow:
    """The ``--target groupwise`` template from one brain per participant.

    The template depends on every participant of the run: its inputs ``merge_brains.inN``
    and ``merge_masks.inN`` (N = 1..``n_inputs``) are connected by the caller from each
    participant's preprocessing, and the template feeds the target preparation
    (:func:`init_target_wf`), which every registration then waits for. Writes
    ``tpl-keyprepGroupwise/tpl-keyprepGroupwise[_res-N]_T1w.nii.gz`` (with a JSON sidecar of
    its sources and the Procrustes fit) and ``..._desc-keypoints_T1w.tsv`` (the mean keypoint
    cloud) next to the usual target files.

    ``sources``: BIDS URIs of the images the template is built from (its sidecar's
    ``Sources``).

    Outputs
    -------
    template, mask, keypoints
    """
    from ..pipeline.naming import target_stem
    from ..interfaces.bids import DerivativesDataSink
    from ..interfaces.groupwise import GroupwiseTemplate
    from ..pipeline.keymorph.keypoints import KEYPOINT_COLUMNS

    wf = pe.Workflow(name=name)
    merge_brains = pe.Node(niu.Merge(n_inputs), name='merge_brains', run_without_submitting=True)
    merge_masks = pe.Node(niu.Merge(n_inputs), name='merge_masks', run_without_submitting=True)
    outputnode = pe.Node(niu.IdentityInterface(fields=['template', 'mask', 'keypoints']),
                         name='outputnode')
    tpl = pe.Node(GroupwiseTemplate(weights=weights or '', kind=kind,
                                    resolution=float(target.resolution or 1.0), device=device,
                                    omp_nthreads=omp_nthreads,
                                    use_gpu=device.startswith('cuda')),
                  name='template', mem_gb=4.0, n_procs=omp_nthreads)
    from ..pipeline.keymorph.network import default_weights

    wfile = Path(weights) if weights else default_weights()
    if wfile.is_file():  # new weights at the same path are not taken from the cache
        from ..pipeline.weights import sha256_file

        tpl.inputs.weights_sha256 = sha256_file(wfile)
    stem = target_stem(target.name, target.resolution)
    source = f'tpl-{target.name}'

    def sink(node_name, rel, **kw):
        return pe.Node(DerivativesDataSink(base_directory=str(output_dir), relative_path=rel,
                                           source_file=source, **kw),
                       name=node_name, run_without_submitting=True)

    ds_tpl = sink('ds_template', f'{stem}_T1w.nii.gz', meta_dict={'Sources': list(sources or [])})
    ds_kp = sink('ds_template_keypoints', f'{stem}_desc-keypoints_T1w.tsv', sidecar=False)
    kp_json = pe.Node(niu.Function(function=_write_json, input_names=['obj', 'fname'],
                                   output_names=['out']), name='template_keypoints_json',
                      run_without_submitting=True)
    kp_json.inputs.obj = {'Description': 'Keypoints of the groupwise template: the '
                                         'generalised Procrustes mean of the participants\' '
                                         'KeyMorph keypoints',
                          **{c: {'Description': d} for c, d in KEYPOINT_COLUMNS.items()}}
    kp_json.inputs.fname = 'keypoints.json'
    ds_kp_json = sink('ds_template_keypoints_json', f'{stem}_desc-keypoints_T1w.json',
                      sidecar=False)
    wf.connect([
        (merge_brains, tpl, [('out', 'brains')]),
        (merge_masks, tpl, [('out', 'masks')]),
        (tpl, ds_tpl, [('template', 'in_file'), ('meta', 'extra_meta')]),
        (tpl, ds_kp, [('keypoints', 'in_file')]),
        (kp_json, ds_kp_json, [('out', 'in_file')]),
        (tpl, outputnode, [('template', 'template'), ('mask', 'mask'),
                           ('keypoints', 'keypoints')]),
    ])  # fmt:skip
    return wf


def groupwise_sources(groups) -> list:
    """One image per participant for the groupwise template: the first T1w of its first
    group with images (else that group's first image), as ``(group, image)`` pairs."""
    chosen, seen = [], set()
    for group in groups:
        if not group.images or group.subject in seen:
            continue
        seen.add(group.subject)
        image = next((im for im in group.images if im.suffix == 'T1w'), group.images[0])
        chosen.append((group, image))
    return chosen


def init_keyprep_wf(*, groups, target, target_file: Path, skip_source: Path | None,
                    methods: list[str], bids_dir: Path, output_dir: Path, work_dir: Path,
                    run_uuid: str, skull_strip: str = 'auto',
                    skull_strip_method: str | None = None, omp_nthreads: int = 1,
                    device: str = 'cpu', seed: int = 0, sloppy: bool = False,
                    engine_params: dict[str, dict] | None = None,
                    keymorph_weights: str | None = None) -> pe.Workflow:
    """The whole participant-level run.

    Parameters
    ----------
    groups
        :class:`keyprep.bids_app.bids.ProcessingGroup` objects with valid images.
    target, target_file
        The resolved target and the image file it comes from (``None`` for
        ``--target groupwise``: the template is built from one brain per participant by
        :func:`init_groupwise_wf`; each participant's preprocessing is then a workflow of
        its own, ``<group>_anat_wf``, so that the template can depend on all of them and
        every registration on the template).
    engine_params
        Engine name -> engine-specific parameters.
    keymorph_weights
        KeyMorph weights for the groupwise template (default: the shipped model).
    """
    from .anatomical import resolve_skull_strip

    skull_strip, skull_strip_method = resolve_skull_strip(skull_strip, skull_strip_method)
    wf = pe.Workflow(name=workflow_name(), base_dir=str(work_dir))
    groupwise = target.kind == 'groupwise'
    target_wf = init_target_wf(target=target, target_file=None if groupwise else target_file,
                               output_dir=output_dir,
                               omp_nthreads=omp_nthreads, device=device, seed=seed,
                               skull_strip_method=skull_strip_method, sloppy=sloppy)
    gw_wf = None
    if groupwise:
        sources = groupwise_sources(groups)
        if len(sources) < 2:
            raise ValueError('--target groupwise needs images of at least two participants')
        from ..pipeline.naming import bids_uri

        gw_wf = init_groupwise_wf(n_inputs=len(sources), target=target, output_dir=output_dir,
                                  weights=keymorph_weights, omp_nthreads=omp_nthreads,
                                  device=device,
                                  sources=[bids_uri(im.path, bids_dir) for _, im in sources])
        wf.connect(gw_wf, 'outputnode.template', target_wf, 'inputnode.in_file')
        source_index = {(g.name, im.key): i for i, (g, im) in enumerate(sources, start=1)}
    for group in groups:
        if not group.images:
            continue
        crash_dir = output_dir / f'sub-{group.subject}' / 'log' / run_uuid
        anat_wf, part_wf = _participant_wfs(
            group=group, target=target, skip_source=skip_source, methods=methods,
            bids_dir=bids_dir, output_dir=output_dir, crash_dir=crash_dir,
            skull_strip=skull_strip, skull_strip_method=skull_strip_method,
            omp_nthreads=omp_nthreads, device=device, seed=seed, sloppy=sloppy,
            engine_params=engine_params, split=groupwise)
        if groupwise:
            for image in group.images:
                anat = anat_wf_name(image.key)
                wf.connect([(anat_wf, part_wf, [
                    (f'{anat}.outputnode.{f}', f'anat_{image.key}_bridge.{f}')
                    for f in _ANAT_TO_REG])])
                i = source_index.get((group.name, image.key))
                if i is not None:
                    wf.connect([(anat_wf, gw_wf, [
                        (f'{anat}.outputnode.brain', f'merge_brains.in{i}'),
                        (f'{anat}.outputnode.mask', f'merge_masks.in{i}')])])
        wf.connect([
            (target_wf, part_wf, [('outputnode.brain', 'inputnode.target_brain'),
                                  ('outputnode.mask', 'inputnode.target_mask'),
                                  ('outputnode.dseg', 'inputnode.target_dseg'),
                                  ('outputnode.synthseg', 'inputnode.target_synthseg')]),
        ])  # fmt:skip
    if not any(g.images for g in groups):
        wf.add_nodes([target_wf])
    from .derivatives import check_unique_derivatives

    check_unique_derivatives(wf)  # no output of this run may replace another
    return wf
