"""One engine's registration sub-workflow: register, carry labels, Jacobian, QC, figures.

An engine with several variants (:meth:`keyprep.pipeline.engines.Engine.variants`) runs
in ONE ``register`` node; each variant then gets its own chain (labels carried, Jacobian,
QC rows, figures) in a nested workflow ``<variant>_wf``, and a figure shows the variants
side by side. An engine with a single variant keeps the flat layout.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .layout import QC_NODE, variant_wf_name

__all__ = ['KEYPOINT_KEYS', 'init_registration_wf', 'method_variants', 'variant_output']

#: Extra outputs that, when an engine declares both, get a keypoints figure.
KEYPOINT_KEYS = ('keypoints_moving', 'keypoints_fixed')

#: Outputs of each variant's chain.
VARIANT_FIELDS = ('fwd_xfm', 'inv_xfm', 'warped', 'warped_dseg', 'warped_synthseg', 'jacobian',
                  'record', 'record_dict', 'qc_long', 'qc_summary', 'fig_registration',
                  'fig_jacobian')
_REGISTER_LISTS = ('variant_names', 'fwd_xfms', 'inv_xfms', 'warpeds', 'records',
                   'record_dicts')
_TARGET_FIELDS = ('target_brain', 'target_mask', 'target_dseg', 'target_synthseg')
_MOVING_FIELDS = ('moving_brain', 'moving_mask', 'moving_dseg', 'moving_synthseg',
                  'synthseg_meta')


def method_variants(method: str, params: dict | None = None,
                    sloppy: bool = False) -> list[tuple[str, dict]]:
    """The variants ``[(name, params)]`` that engine ``method`` gives with ``params``."""
    from ..pipeline.engines import EngineOptions, engine_variants, get_engine

    return engine_variants(get_engine(method), EngineOptions(sloppy=sloppy,
                                                             params=dict(params or {})))


def variant_output(variants: list[tuple[str, dict]], variant: str, field: str) -> str:
    """Where a variant's output ``field`` is in the registration workflow (for connect)."""
    if len(variants) == 1:
        return f'outputnode.{field}'
    return f'{variant_wf_name(variant)}.outputnode.{field}'


def init_registration_wf(*, method: str, subject: str, session: str | None, source: str,
                         target: str, omp_nthreads: int = 1, device: str = 'cpu', seed: int = 0,
                         sloppy: bool = False, params: dict | None = None,
                         contrasts: dict | None = None,
                         name: str | None = None) -> pe.Workflow:
    """Register a moving brain to the target with ``method`` and measure the result.

    Parameters
    ----------
    method
        A registered engine (:func:`keyprep.pipeline.engines.available_engines`).
    subject, session, source, target
        Identifiers written into the QC rows (``source`` is a BIDS URI).
    params
        Engine-specific parameters.
    contrasts
        ``{'fixed': suffix, 'moving': suffix}``, passed to engines that use them.

    Inputs
    ------
    target_brain, target_mask, target_dseg, target_synthseg
        The prepared target (tissue labels, and the label network's labels).
    moving_brain, moving_mask, moving_dseg, moving_synthseg
        The prepared moving image.
    synthseg_meta
        Provenance of the label network (weights sha256 and step), for the QC tables.
    init_xfm
        Only for an engine that starts from another method's affine
        (:meth:`~keyprep.pipeline.engines.Engine.init_method`): that method's ``fwd_xfm``.

    Outputs
    -------
    For each variant (``outputnode`` with one variant, ``<variant>_wf.outputnode`` with
    several; see :func:`variant_output`):

    fwd_xfm, inv_xfm
        ITK transforms moving->target (applied on the target grid) and back.
    warped, warped_dseg, warped_synthseg, jacobian
        Moving brain, tissue labels and network labels on the target grid; Jacobian
        determinant map.
    record, record_dict
        The JSON record (runtime, memory, parameters, versions).
    qc_long, qc_summary
        QC rows (per structure and tissue class, and per engine).
    fig_registration, fig_jacobian
        Reportlets.

    In ``outputnode`` in every case: one field per extra output of the engine
    (:meth:`~keyprep.pipeline.engines.Engine.extra_outputs`), ``fig_keypoints`` when it
    writes keypoints of both images, and ``fig_variants`` with several variants.
    """
    from ..interfaces.registration import ApplyTransforms, PickFile, Register
    from ..interfaces.reports import KeypointsFigure, VariantsFigure
    from ..pipeline.engines import EngineOptions, get_engine

    engine = get_engine(method)
    params = dict(params or {})
    options = EngineOptions(sloppy=sloppy, params=params, device=device, seed=seed,
                            omp_nthreads=omp_nthreads)
    variants = method_variants(engine.name, params, sloppy)
    multi = len(variants) > 1
    extras = engine.extra_outputs(options)
    extra_keys = [x.key for x in extras]
    keypoints = all(k in extra_keys for k in KEYPOINT_KEYS)

    wf = pe.Workflow(name=name or f'reg_{engine.name}_wf')
    wf.__desc__ = engine.boilerplate(None)

    init = engine.init_method(options)
    inputnode = pe.Node(niu.IdentityInterface(fields=[*_TARGET_FIELDS, *_MOVING_FIELDS,
                                                      *(['init_xfm'] if init else [])]),
                        name='inputnode')
    out_fields = [] if multi else list(VARIANT_FIELDS)
    out_fields += extra_keys + (['fig_keypoints'] if keypoints else [])
    out_fields += ['fig_variants'] if multi else []
    outputnode = pe.Node(niu.IdentityInterface(fields=out_fields), name='outputnode')

    register = pe.Node(
        Register(method=engine.name, params=params, seed=seed, sloppy=sloppy,
                 device=device, omp_nthreads=omp_nthreads,
                 use_gpu=engine.uses_torch and device.startswith('cuda')),
        name='register', mem_gb=engine.mem_gb, n_procs=omp_nthreads)
    key = engine.cache_key(options)
    if key:
        register.inputs.cache_key = key
    if init:  # the caller connects the starting method's fwd_xfm to inputnode.init_xfm
        register.inputs.init_method = init
        wf.connect(inputnode, 'init_xfm', register, 'init_xfm')
    if engine.uses_contrasts and contrasts:
        for key in ('fixed', 'moving'):
            if contrasts.get(key):
                setattr(register.inputs, f'{key}_contrast', contrasts[key])
    if engine.uses_labels:  # the label network's labels: the one pose estimate per image
        wf.connect(inputnode, 'target_synthseg', register, 'fixed_labels')
        wf.connect(inputnode, 'moving_synthseg', register, 'moving_labels')
    before = pe.Node(ApplyTransforms(interpolation='linear', out_name='before.nii.gz'),
                     name='resample_before', mem_gb=1.0)
    wf.connect([
        (inputnode, register, [('target_brain', 'fixed'), ('moving_brain', 'moving'),
                               ('target_mask', 'fixed_mask'), ('moving_mask', 'moving_mask')]),
        (inputnode, before, [('moving_brain', 'in_file'), ('target_brain', 'reference')]),
    ])  # fmt:skip
    qc_ids = {'subject': subject, 'session': session or '', 'source': source, 'target': target}

    if not multi:
        _add_chain(wf, title=engine.name, transform_kind=engine.transform_kind,
                   inputnode=inputnode, before=before, src=register, outputnode=outputnode,
                   qc_ids=qc_ids)
    else:
        fig_variants = pe.Node(VariantsFigure(
            names=[v for v, _ in variants], prefix=engine.name,
            title=f'{engine.name}: {len(variants)} variants from one run; target edges over '
                  'the moving image after registration'),
            name='fig_variants', mem_gb=0.5)
        wf.connect([
            (inputnode, fig_variants, [('target_brain', 'target'), ('target_mask', 'target_mask')]),
            (register, fig_variants, [('warpeds', 'warped')]),
            (fig_variants, outputnode, [('out_file', 'fig_variants')]),
        ])  # fmt:skip
        for vname, _ in variants:
            vwf = _init_variant_wf(vname, engine.transform_kind, qc_ids)
            wf.connect([
                (inputnode, vwf, [(f, f'inputnode.{f}') for f in
                                  (*_TARGET_FIELDS, 'moving_dseg', 'moving_synthseg',
                                   'synthseg_meta')]),
                (before, vwf, [('out_file', 'inputnode.before')]),
                (register, vwf, [(f, f'inputnode.{f}') for f in _REGISTER_LISTS]),
            ])  # fmt:skip

    picks = {}
    for key in extra_keys:
        picks[key] = pick = pe.Node(PickFile(key=key), name=f'pick_{key}',
                                    run_without_submitting=True)
        wf.connect([(register, pick, [('files', 'files')]),
                    (pick, outputnode, [('out_file', key)])])
    if keypoints:
        fig_kp = pe.Node(KeypointsFigure(title=f'{engine.name}: keypoints of the moving image '
                                               '(top) and of the target (bottom), '
                                               'corresponding pairs numbered'),
                         name='fig_keypoints', mem_gb=0.5)
        wf.connect([
            (inputnode, fig_kp, [('moving_brain', 'moving'), ('target_brain', 'fixed')]),
            (picks['keypoints_moving'], fig_kp, [('out_file', 'moving_keypoints')]),
            (picks['keypoints_fixed'], fig_kp, [('out_file', 'fixed_keypoints')]),
            (fig_kp, outputnode, [('out_file', 'fig_keypoints')]),
        ])  # fmt:skip
    return wf


def _init_variant_wf(variant: str, transform_kind: str, qc_ids: dict) -> pe.Workflow:
    """The chain of one variant, fed by the lists of the engine's ``register`` node."""
    from ..interfaces.registration import SelectVariant

    vwf = pe.Workflow(name=variant_wf_name(variant))
    inputnode = pe.Node(niu.IdentityInterface(
        fields=[*_TARGET_FIELDS, 'moving_dseg', 'moving_synthseg', 'synthseg_meta', 'before',
                *_REGISTER_LISTS]), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(fields=list(VARIANT_FIELDS)), name='outputnode')
    select = pe.Node(SelectVariant(variant=variant), name='select', run_without_submitting=True)
    vwf.connect(inputnode, 'variant_names', select, 'variant_names')
    for f in _REGISTER_LISTS[1:]:
        vwf.connect(inputnode, f, select, f)
    _add_chain(vwf, title=variant, transform_kind=transform_kind, inputnode=inputnode,
               before=(inputnode, 'before'), src=select, outputnode=outputnode, qc_ids=qc_ids)
    return vwf


def _add_chain(wf: pe.Workflow, *, title: str, transform_kind: str, inputnode, before, src,
               outputnode, qc_ids: dict) -> None:
    """Labels carried, Jacobian, QC and figures of one registration result.

    ``src`` has outputs ``fwd_xfm``, ``inv_xfm``, ``warped``, ``record``, ``record_dict``;
    ``before`` is the node resampling the moving image by identity (or ``(node, field)``).
    """
    from ..interfaces.qc import RegistrationQC
    from ..interfaces.registration import ApplyTransforms, JacobianMap
    from ..interfaces.reports import JacobianFigure, RegistrationFigure
    from ..pipeline.anatomy import TISSUE_LABELS
    from ..pipeline.synth.labels import OUTPUT_NAMES

    if not isinstance(before, tuple):
        before = (before, 'out_file')
    warp_dseg = pe.Node(ApplyTransforms(interpolation='genericLabel', out_name='dseg.nii.gz'),
                        name='warp_dseg', mem_gb=1.0)
    warp_synthseg = pe.Node(ApplyTransforms(interpolation='genericLabel',
                                            out_name='synthseg.nii.gz'),
                            name='warp_synthseg', mem_gb=1.0)
    jacobian = pe.Node(JacobianMap(transform_kind=transform_kind), name='jacobian',
                       mem_gb=1.5)
    lut = {k: v[1] for k, v in TISSUE_LABELS.items()}
    qc = pe.Node(RegistrationQC(label_set='tissue', lut=lut,
                                synthseg_lut={k: v for k, v in OUTPUT_NAMES.items() if k},
                                **qc_ids),
                 name=QC_NODE, mem_gb=1.0)
    fig_reg = pe.Node(RegistrationFigure(title=f'{title}: target edges over the moving '
                                               'image, before and after registration'),
                      name='fig_registration', mem_gb=0.5)
    fig_jac = pe.Node(JacobianFigure(title=f'{title}: log2 Jacobian determinant'),
                      name='fig_jacobian', mem_gb=0.5)

    wf.connect([
        (inputnode, warp_dseg, [('moving_dseg', 'in_file'), ('target_brain', 'reference')]),
        (src, warp_dseg, [('fwd_xfm', 'transforms')]),
        (inputnode, warp_synthseg, [('moving_synthseg', 'in_file'),
                                    ('target_brain', 'reference')]),
        (src, warp_synthseg, [('fwd_xfm', 'transforms')]),
        (inputnode, jacobian, [('target_brain', 'reference')]),
        (src, jacobian, [('fwd_xfm', 'xfm')]),
        (inputnode, qc, [('target_dseg', 'target_dseg'), ('target_mask', 'target_mask')]),
        (warp_dseg, qc, [('out_file', 'warped_dseg')]),
        (inputnode, qc, [('target_synthseg', 'target_synthseg'),
                         ('synthseg_meta', 'synthseg_meta')]),
        (warp_synthseg, qc, [('out_file', 'warped_synthseg')]),
        (jacobian, qc, [('out_file', 'jacobian')]),
        (src, qc, [('record', 'record')]),
        (inputnode, fig_reg, [('target_brain', 'target'), ('target_mask', 'target_mask')]),
        (before[0], fig_reg, [(before[1], 'before')]),
        (src, fig_reg, [('warped', 'warped')]),
        (jacobian, fig_jac, [('out_file', 'jacobian')]),
        (inputnode, fig_jac, [('target_mask', 'mask'), ('target_brain', 'background')]),
        (src, outputnode, [('fwd_xfm', 'fwd_xfm'), ('inv_xfm', 'inv_xfm'),
                           ('warped', 'warped'), ('record', 'record'),
                           ('record_dict', 'record_dict')]),
        (warp_dseg, outputnode, [('out_file', 'warped_dseg')]),
        (warp_synthseg, outputnode, [('out_file', 'warped_synthseg')]),
        (jacobian, outputnode, [('out_file', 'jacobian')]),
        (qc, outputnode, [('out_long', 'qc_long'), ('out_summary', 'qc_summary')]),
        (fig_reg, outputnode, [('out_file', 'fig_registration')]),
        (fig_jac, outputnode, [('out_file', 'fig_jacobian')]),
    ])  # fmt:skip
