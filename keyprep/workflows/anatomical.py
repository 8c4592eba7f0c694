"""Anatomical preprocessing workflow: conform, skull strip, bias-correct, tissue labels."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

__all__ = ['init_anat_preproc_wf']


def init_anat_preproc_wf(*, contrast: str = 'T1w', skull_strip: str = 'auto',
                         brain_extracted: bool | None = None, resolution: float | None = None,
                         device: str = 'cpu', omp_nthreads: int = 1, sloppy: bool = False,
                         name: str = 'anat_preproc_wf') -> pe.Workflow:
    """Prepare one anatomical image (or the target) for registration and QC.

    Parameters
    ----------
    contrast
        ``T1w``, ``T2w``, ``PDw`` or ``FLAIR``: sets the expected tissue intensity order.
    skull_strip
        ``auto`` (strip unless already brain-only), ``force`` or ``skip``.
    brain_extracted
        Known answer for templates (skips detection), ``None`` to detect.
    resolution
        Isotropic resampling (mm) of the conformed image; ``None`` keeps the native grid.

    Inputs
    ------
    in_file
        The raw image.

    Outputs
    -------
    preproc
        RAS-conformed, bias-corrected image (whole field of view).
    brain, mask
        Brain-extracted image and binary mask.
    dseg
        Tissue labels (1=GM, 2=WM, 3=CSF).
    conform_meta, skullstrip_meta, tissue_meta
        Provenance for the JSON sidecars and the report.
    """
    from ..interfaces.anatomical import BiasCorrect, ConformImage, SkullStrip, TissueSegmentation

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['in_file']), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['preproc', 'brain', 'mask', 'dseg', 'conform_meta', 'skullstrip_meta',
                'tissue_meta']), name='outputnode')

    conform = pe.Node(ConformImage(), name='conform', mem_gb=1.0)
    if resolution:
        conform.inputs.resolution = resolution
    strip = pe.Node(SkullStrip(mode=skull_strip, brain_extracted=brain_extracted, device=device,
                               omp_nthreads=omp_nthreads, use_gpu=device.startswith('cuda')),
                    name='skull_strip', mem_gb=3.0, n_procs=omp_nthreads)
    n4 = pe.Node(BiasCorrect(omp_nthreads=omp_nthreads, sloppy=sloppy,
                             skip=bool(brain_extracted)),
                 name='bias_correct', mem_gb=1.5, n_procs=omp_nthreads)
    tissue = pe.Node(TissueSegmentation(contrast=contrast, omp_nthreads=omp_nthreads,
                                        sloppy=sloppy),
                     name='tissue_seg', mem_gb=1.5, n_procs=omp_nthreads)

    wf.connect([
        (inputnode, conform, [('in_file', 'in_file')]),
        (conform, strip, [('out_file', 'in_file')]),
        (conform, n4, [('out_file', 'in_file')]),
        (strip, n4, [('out_mask', 'in_mask')]),
        (n4, tissue, [('out_brain', 'in_file')]),
        (strip, tissue, [('out_mask', 'in_mask')]),
        (n4, outputnode, [('out_file', 'preproc'), ('out_brain', 'brain')]),
        (strip, outputnode, [('out_mask', 'mask'), ('out_meta', 'skullstrip_meta')]),
        (conform, outputnode, [('out_meta', 'conform_meta')]),
        (tissue, outputnode, [('out_dseg', 'dseg'), ('out_meta', 'tissue_meta')]),
    ])  # fmt:skip
    return wf
