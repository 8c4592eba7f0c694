"""Anatomical preprocessing workflow: conform, labels, skull strip, bias-correct, tissue
labels."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

__all__ = ['SKULL_STRIP_METHODS', 'SKULL_STRIP_MODES', 'init_anat_preproc_wf',
           'resolve_skull_strip', 'synthseg_weights']

SKULL_STRIP_MODES = ('auto', 'force', 'skip', 'synth')
SKULL_STRIP_METHODS = ('deepbet', 'synth')


def resolve_skull_strip(mode: str, method: str | None = None) -> tuple[str, str]:
    """``(mode, method)`` from ``--skull-strip`` and ``--skull-strip-method``.

    ``synth`` as a mode is ``auto`` with the label network's mask.

    >>> resolve_skull_strip('synth'), resolve_skull_strip('force', 'synth')
    (('auto', 'synth'), ('force', 'synth'))
    >>> resolve_skull_strip('auto')
    ('auto', 'deepbet')
    """
    if mode not in SKULL_STRIP_MODES:
        raise ValueError(f'unknown skull-strip mode {mode!r}')
    if method is not None and method not in SKULL_STRIP_METHODS:
        raise ValueError(f'unknown skull-strip method {method!r}')
    if mode == 'synth':
        if method not in (None, 'synth'):
            raise ValueError('--skull-strip synth uses the label network: it cannot be combined '
                             f'with --skull-strip-method {method}')
        return 'auto', 'synth'
    return mode, method or 'deepbet'


def synthseg_weights() -> Path:
    """The packaged label-network weights (the same file as
    :func:`keyprep.pipeline.synth.labeller.default_weights`, without importing torch)."""
    return Path(__file__).resolve().parents[1] / 'models' / 'synthseg' / 'keyprep-synthseg-2mm.pt'


def init_anat_preproc_wf(*, contrast: str = 'T1w', skull_strip: str = 'auto',
                         skull_strip_method: str | None = None,
                         brain_extracted: bool | None = None, resolution: float | None = None,
                         device: str = 'cpu', omp_nthreads: int = 1, seed: int = 0,
                         weights: str | Path | None = None, sloppy: bool = False,
                         name: str = 'anat_preproc_wf') -> pe.Workflow:
    """Prepare one anatomical image (or the target) for registration and QC.

    Parameters
    ----------
    contrast
        ``T1w``, ``T2w``, ``PDw`` or ``FLAIR``: sets the expected tissue intensity order.
    skull_strip
        ``auto`` (strip unless already brain-only), ``force``, ``skip``, or ``synth``
        (``auto`` with the label network's brain mask instead of deepbet).
    skull_strip_method
        ``deepbet`` (default) or ``synth``: how an image with a head is stripped.
    brain_extracted
        Known answer for templates (skips detection), ``None`` to detect.
    resolution
        Isotropic resampling (mm) of the conformed image; ``None`` keeps the native grid.
    weights
        Label-network weights; default: the packaged ones (:func:`synthseg_weights`).

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
    synthseg, synthseg_mask
        The label network's labels (FreeSurfer numbering) and brain mask, computed on the
        conformed image (head or brain, whichever the image is), on its grid.
    conform_meta, skullstrip_meta, tissue_meta, synthseg_meta
        Provenance for the JSON sidecars and the report.
    """
    from ..interfaces.anatomical import (
        BiasCorrect,
        ConformImage,
        SkullStrip,
        SynthSegLabels,
        TissueSegmentation,
    )

    skull_strip, skull_strip_method = resolve_skull_strip(skull_strip, skull_strip_method)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['in_file']), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['preproc', 'brain', 'mask', 'dseg', 'synthseg', 'synthseg_mask', 'conform_meta',
                'skullstrip_meta', 'tissue_meta', 'synthseg_meta']), name='outputnode')

    conform = pe.Node(ConformImage(), name='conform', mem_gb=1.0)
    if resolution:
        conform.inputs.resolution = resolution
    gpu = device.startswith('cuda')
    # --sloppy (tests) skips the left/right test-time augmentation: half the network time
    synthseg = pe.Node(SynthSegLabels(device=device, seed=seed, omp_nthreads=omp_nthreads,
                                      flip_tta=not sloppy, use_gpu=gpu),
                       name='synthseg', mem_gb=3.0, n_procs=omp_nthreads)
    weights = Path(weights) if weights else synthseg_weights()
    if weights.is_file():  # otherwise the node says which file is missing when it runs
        synthseg.inputs.weights = str(weights)
    strip = pe.Node(SkullStrip(mode=skull_strip, method=skull_strip_method,
                               brain_extracted=brain_extracted, device=device,
                               omp_nthreads=omp_nthreads,
                               use_gpu=gpu and skull_strip_method == 'deepbet'),
                    name='skull_strip', mem_gb=3.0 if skull_strip_method == 'deepbet' else 1.0,
                    n_procs=omp_nthreads)
    n4 = pe.Node(BiasCorrect(omp_nthreads=omp_nthreads, sloppy=sloppy,
                             skip=bool(brain_extracted)),
                 name='bias_correct', mem_gb=1.5, n_procs=omp_nthreads)
    tissue = pe.Node(TissueSegmentation(contrast=contrast, omp_nthreads=omp_nthreads,
                                        sloppy=sloppy),
                     name='tissue_seg', mem_gb=1.5, n_procs=omp_nthreads)

    wf.connect([
        (inputnode, conform, [('in_file', 'in_file')]),
        (conform, synthseg, [('out_file', 'in_file')]),
        (conform, strip, [('out_file', 'in_file')]),
        (conform, n4, [('out_file', 'in_file')]),
        (strip, n4, [('out_mask', 'in_mask')]),
        (n4, tissue, [('out_brain', 'in_file')]),
        (strip, tissue, [('out_mask', 'in_mask')]),
        (n4, outputnode, [('out_file', 'preproc'), ('out_brain', 'brain')]),
        (strip, outputnode, [('out_mask', 'mask'), ('out_meta', 'skullstrip_meta')]),
        (conform, outputnode, [('out_meta', 'conform_meta')]),
        (tissue, outputnode, [('out_dseg', 'dseg'), ('out_meta', 'tissue_meta')]),
        (synthseg, outputnode, [('out_labels', 'synthseg'), ('out_mask', 'synthseg_mask'),
                                ('out_meta', 'synthseg_meta')]),
    ])  # fmt:skip
    if skull_strip_method == 'synth':
        wf.connect([
            (synthseg, strip, [('out_mask', 'synth_mask'), ('out_meta', 'synth_meta')]),
        ])  # fmt:skip
    elif skull_strip != 'skip':
        # deepbet's mask checks the label network's labels and finds the pose they need
        wf.connect([(strip, synthseg, [('out_mask', 'reference_mask')])])  # fmt:skip
    return wf
