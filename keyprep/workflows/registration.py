"""One engine's registration sub-workflow: register, carry labels, Jacobian, QC, figures."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

__all__ = ['init_registration_wf']


def init_registration_wf(*, method: str, subject: str, session: str | None, source: str,
                         target: str, omp_nthreads: int = 1, device: str = 'cpu', seed: int = 0,
                         sloppy: bool = False, params: dict | None = None,
                         name: str | None = None) -> pe.Workflow:
    """Register a moving brain to the target with ``method`` and measure the result.

    Parameters
    ----------
    method
        A registered engine (:func:`keyprep.pipeline.engines.available_engines`).
    subject, session, source, target
        Identifiers written into the QC rows (``source`` is a BIDS URI).

    Inputs
    ------
    target_brain, target_mask, target_dseg, target_synthseg
        The prepared target (tissue labels, and the label network's labels).
    moving_brain, moving_mask, moving_dseg, moving_synthseg
        The prepared moving image.
    synthseg_meta
        Provenance of the label network (weights sha256 and step), for the QC tables.

    Outputs
    -------
    fwd_xfm, inv_xfm
        ITK transforms moving->target (applied on the target grid) and back.
    warped, warped_dseg, warped_synthseg, jacobian
        Moving brain, tissue labels and network labels on the target grid; Jacobian
        determinant map.
    record
        The engine's JSON record (runtime, memory, parameters, versions).
    qc_long, qc_summary
        QC rows (per structure and tissue class, and per engine).
    fig_registration, fig_jacobian
        Reportlets.
    """
    from ..interfaces.qc import RegistrationQC
    from ..interfaces.registration import ApplyTransforms, JacobianMap, Register
    from ..interfaces.reports import JacobianFigure, RegistrationFigure
    from ..pipeline.anatomy import TISSUE_LABELS
    from ..pipeline.engines import get_engine
    from ..pipeline.synth.labels import OUTPUT_NAMES

    engine = get_engine(method)
    wf = pe.Workflow(name=name or f'reg_{engine.name}_wf')
    wf.__desc__ = engine.boilerplate(None)

    inputnode = pe.Node(niu.IdentityInterface(
        fields=['target_brain', 'target_mask', 'target_dseg', 'target_synthseg', 'moving_brain',
                'moving_mask', 'moving_dseg', 'moving_synthseg', 'synthseg_meta']),
        name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['fwd_xfm', 'inv_xfm', 'warped', 'warped_dseg', 'warped_synthseg', 'jacobian',
                'record', 'record_dict', 'qc_long', 'qc_summary', 'fig_registration',
                'fig_jacobian']),
        name='outputnode')

    register = pe.Node(
        Register(method=engine.name, params=dict(params or {}), seed=seed, sloppy=sloppy,
                 device=device, omp_nthreads=omp_nthreads,
                 use_gpu=engine.uses_torch and device.startswith('cuda')),
        name='register', mem_gb=engine.mem_gb, n_procs=omp_nthreads)
    warp_dseg = pe.Node(ApplyTransforms(interpolation='genericLabel', out_name='dseg.nii.gz'),
                        name='warp_dseg', mem_gb=1.0)
    warp_synthseg = pe.Node(ApplyTransforms(interpolation='genericLabel',
                                            out_name='synthseg.nii.gz'),
                            name='warp_synthseg', mem_gb=1.0)
    before = pe.Node(ApplyTransforms(interpolation='linear', out_name='before.nii.gz'),
                     name='resample_before', mem_gb=1.0)
    jacobian = pe.Node(JacobianMap(transform_kind=engine.transform_kind), name='jacobian',
                       mem_gb=1.5)
    lut = {k: v[1] for k, v in TISSUE_LABELS.items()}
    qc = pe.Node(RegistrationQC(label_set='tissue', lut=lut, subject=subject,
                                session=session or '', source=source, target=target,
                                synthseg_lut={k: v for k, v in OUTPUT_NAMES.items() if k}),
                 name='qc', mem_gb=1.0)
    fig_reg = pe.Node(RegistrationFigure(title=f'{engine.name}: target edges over the moving '
                                               'image, before and after registration'),
                      name='fig_registration', mem_gb=0.5)
    fig_jac = pe.Node(JacobianFigure(title=f'{engine.name}: log2 Jacobian determinant'),
                      name='fig_jacobian', mem_gb=0.5)

    wf.connect([
        (inputnode, register, [('target_brain', 'fixed'), ('moving_brain', 'moving'),
                               ('target_mask', 'fixed_mask'), ('moving_mask', 'moving_mask')]),
        (inputnode, warp_dseg, [('moving_dseg', 'in_file'), ('target_brain', 'reference')]),
        (register, warp_dseg, [('fwd_xfm', 'transforms')]),
        (inputnode, warp_synthseg, [('moving_synthseg', 'in_file'),
                                    ('target_brain', 'reference')]),
        (register, warp_synthseg, [('fwd_xfm', 'transforms')]),
        (inputnode, before, [('moving_brain', 'in_file'), ('target_brain', 'reference')]),
        (inputnode, jacobian, [('target_brain', 'reference')]),
        (register, jacobian, [('fwd_xfm', 'xfm')]),
        (inputnode, qc, [('target_dseg', 'target_dseg'), ('target_mask', 'target_mask')]),
        (warp_dseg, qc, [('out_file', 'warped_dseg')]),
        (inputnode, qc, [('target_synthseg', 'target_synthseg'),
                         ('synthseg_meta', 'synthseg_meta')]),
        (warp_synthseg, qc, [('out_file', 'warped_synthseg')]),
        (jacobian, qc, [('out_file', 'jacobian')]),
        (register, qc, [('record', 'record')]),
        (inputnode, fig_reg, [('target_brain', 'target'), ('target_mask', 'target_mask')]),
        (before, fig_reg, [('out_file', 'before')]),
        (register, fig_reg, [('warped', 'warped')]),
        (jacobian, fig_jac, [('out_file', 'jacobian')]),
        (inputnode, fig_jac, [('target_mask', 'mask'), ('target_brain', 'background')]),
        (register, outputnode, [('fwd_xfm', 'fwd_xfm'), ('inv_xfm', 'inv_xfm'),
                                ('warped', 'warped'), ('record', 'record'),
                                ('record_dict', 'record_dict')]),
        (warp_dseg, outputnode, [('out_file', 'warped_dseg')]),
        (warp_synthseg, outputnode, [('out_file', 'warped_synthseg')]),
        (jacobian, outputnode, [('out_file', 'jacobian')]),
        (qc, outputnode, [('out_long', 'qc_long'), ('out_summary', 'qc_summary')]),
        (fig_reg, outputnode, [('out_file', 'fig_registration')]),
        (fig_jac, outputnode, [('out_file', 'fig_jacobian')]),
    ])  # fmt:skip
    return wf
