"""Nipype interfaces for anatomical preprocessing (thin shells over keyprep.pipeline)."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .base import ComputeInputSpec

__all__ = ['BiasCorrect', 'ConformImage', 'SkullStrip', 'SynthSegLabels', 'TissueSegmentation']


def _set_threads(n: int) -> None:
    os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(n)
    os.environ['OMP_NUM_THREADS'] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='anatomical image (NIfTI)')
    resolution = traits.Float(desc='resample to isotropic voxels of this size (mm)')


class _ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='RAS-oriented float32 image, same world geometry')
    out_meta = traits.Dict(desc='geometry of the input (shape, zooms, orientation)')


class ConformImage(SimpleInterface):
    """Validate an image and reorient it to RAS (see :func:`keyprep.pipeline.io.conform`).

    An unusable image (corrupt, 4-D, NaN, empty) raises :class:`ImageError` with one line.
    """

    input_spec = _ConformInputSpec
    output_spec = _ConformOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nb

        from ..pipeline.io import conform, load_image, save_image
        from ..pipeline.targets import resample_isotropic

        img = load_image(self.inputs.in_file)
        out = conform(img)
        if isdefined(self.inputs.resolution) and self.inputs.resolution > 0:
            out = conform(resample_isotropic(out, self.inputs.resolution))
        fname = os.path.join(runtime.cwd, 'conformed.nii.gz')
        save_image(out, fname)
        self._results['out_file'] = fname
        self._results['out_meta'] = {
            'InputShape': [int(s) for s in img.shape[:3]],
            'InputVoxelSize': [round(float(z), 4) for z in img.header.get_zooms()[:3]],
            'InputOrientation': ''.join(nb.aff2axcodes(img.affine)),
            'Oblique': bool(_is_oblique(img.affine)),
        }
        return runtime


def _is_oblique(affine) -> bool:
    import numpy as np

    cosines = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.max(np.abs(cosines).max(axis=0)) < 1 - 1e-3 or
                np.min(np.abs(cosines).max(axis=0)) < 1 - 1e-3)


class _SkullStripInputSpec(ComputeInputSpec):
    in_file = File(exists=True, mandatory=True, desc='RAS-conformed image')
    mode = traits.Enum('auto', 'force', 'skip', usedefault=True,
                       desc='auto: detect brain-only images; force: always strip; skip: never')
    method = traits.Enum('deepbet', 'synth', usedefault=True,
                         desc='how an image with a head is stripped: deepbet, or the brain '
                              'mask of the label network (synth_mask)')
    synth_mask = File(exists=True, desc="the label network's brain mask (method synth)")
    synth_meta = traits.Dict(desc="the label network's provenance (method synth)")
    brain_extracted = traits.Either(None, traits.Bool, usedefault=True,
                                    desc='known answer (templates); None: detect')


class _SkullStripOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc='binary brain mask')
    out_brain = File(exists=True, desc='brain-extracted image')
    out_meta = traits.Dict(desc='how the mask was made')


class SkullStrip(SimpleInterface):
    """Brain mask with deepbet or the label network (``method``), or from the foreground
    of an already brain-only image."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.omp_nthreads)
        import nibabel as nb
        import numpy as np

        from ..pipeline.anatomy import deepbet_mask, detect_brain_extracted, mask_from_brain
        from ..pipeline.io import make_image, save_image
        from ..pipeline.resources import resolve_device

        img = nb.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj)
        known = self.inputs.brain_extracted
        if self.inputs.mode == 'skip':
            already, reason = True, 'skull stripping skipped (--skull-strip skip)'
        elif self.inputs.mode == 'force':
            already, reason = False, 'skull stripping forced (--skull-strip force)'
        elif known is not None:
            already, reason = bool(known), 'known brain-extracted template' if known else ''
        else:
            already, reason = detect_brain_extracted(data, img.header.get_zooms())
        if already:
            mask = mask_from_brain(data)
            method = 'foreground of the brain-extracted input'
        elif self.inputs.method == 'synth':
            if not isdefined(self.inputs.synth_mask):
                raise ValueError('SkullStrip(method="synth") needs synth_mask')
            mask_img = nb.load(self.inputs.synth_mask)
            if mask_img.shape[:3] != img.shape[:3] or not np.allclose(mask_img.affine,
                                                                       img.affine, atol=1e-3):
                raise ValueError('the label-network mask is not on the grid of the image')
            mask = np.asanyarray(mask_img.dataobj) > 0
            sm = self.inputs.synth_meta if isdefined(self.inputs.synth_meta) else {}
            method = ('brain mask of the keyprep label network (' +
                      ', '.join(str(v) for v in (
                          sm.get('NetworkWeights'),
                          f"sha256 {sm['NetworkWeightsSha256'][:12]}"
                          if sm.get('NetworkWeightsSha256') else None,
                          f"step {sm['NetworkTrainingStep']}"
                          if sm.get('NetworkTrainingStep') is not None else None,
                          sm.get('Device')) if v) + ')')
        else:
            device = resolve_device(self.inputs.device)
            mask = deepbet_mask(img, device=device)
            method = f'deepbet {_version("deepbet")} (packaged weights, {device})'
        if mask.sum() == 0:
            from ..pipeline.errors import ImageError

            raise ImageError(f'{os.path.basename(self.inputs.in_file)}: the brain mask is empty')
        mask_img = make_image(mask.astype(np.uint8), img.affine)
        brain_img = make_image(np.where(mask, data, 0).astype(np.float32), img.affine)
        self._results['out_mask'] = str(save_image(mask_img, os.path.join(runtime.cwd,
                                                                          'mask.nii.gz')))
        self._results['out_brain'] = str(save_image(brain_img, os.path.join(runtime.cwd,
                                                                            'brain.nii.gz')))
        vox = float(np.prod(img.header.get_zooms()[:3]))
        self._results['out_meta'] = {
            'InputSkullStripped': bool(already),
            'SkullStripDecision': reason,
            'SkullStripMethod': method,
            'BrainVolumeCm3': round(float(mask.sum()) * vox / 1000.0, 1),
        }
        return runtime


class _SynthSegInputSpec(ComputeInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc='RAS-conformed image (head or brain, whichever the image is)')
    weights = File(exists=True, desc='label-network weights (default: the packaged ones); '
                                     'hashed by content, so new weights invalidate the cache')
    flip_tta = traits.Bool(True, usedefault=True,
                           desc='average with the left/right mirrored image (labels swapped)')
    seed = traits.Int(0, usedefault=True, desc='random seed (inference is deterministic)')
    pose = traits.Enum('auto', 'header', usedefault=True,
                       desc="auto: label at the header's orientation, check the labels, and when "
                            "the check fails find the head's pose and label again; header: trust "
                            "the image's orientation, as SynthSeg does (labels still checked)")
    reference_mask = File(exists=True, desc='a brain mask of in_file (deepbet): the labels are '
                                            'checked against it and the pose found from it')


class _SynthSegOutputSpec(TraitedSpec):
    out_labels = File(exists=True, desc='labels in FreeSurfer numbering (int16, input grid)')
    out_mask = File(exists=True, desc="the network's brain mask (uint8, input grid)")
    out_report = File(exists=True, desc='JSON: weights sha256 and step, device, timings, '
                                        'volumes, software versions')
    out_meta = traits.Dict(desc='the same, for the JSON sidecars')


class SynthSegLabels(SimpleInterface):
    """Anatomical labels (32 structures, FreeSurfer numbering) and a brain mask from
    keyprep's SynthSeg-style label network
    (:func:`keyprep.pipeline.synth.labeller.label_image`).

    Missing weights raise :class:`~keyprep.pipeline.errors.MissingInputError`.
    """

    input_spec = _SynthSegInputSpec
    output_spec = _SynthSegOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.omp_nthreads)
        import json
        import time

        import nibabel as nb
        import numpy as np

        from ..pipeline.io import make_image, save_image
        from ..pipeline.registration import software_versions
        from ..pipeline.resources import resolve_device, seed_everything, tune_allocator
        from ..pipeline.synth.labeller import LabelNetwork
        from ..pipeline.synth.labels import OUTPUT_NAMES

        t0 = time.perf_counter()
        tune_allocator()
        device = resolve_device(self.inputs.device)
        seed_everything(self.inputs.seed)
        weights = self.inputs.weights if isdefined(self.inputs.weights) else None
        net = LabelNetwork.cached(weights, device)
        t1 = time.perf_counter()
        img = nb.load(self.inputs.in_file)
        ref = nb.load(self.inputs.reference_mask) if isdefined(self.inputs.reference_mask) else None
        result = net.predict(img, flip_tta=self.inputs.flip_tta, pose=self.inputs.pose,
                             reference_mask=ref)
        labels = np.asanyarray(result.labels.dataobj).astype(np.int16)
        # An empty result is not an error here: the QC then says that no structure overlap
        # could be measured, and --skull-strip synth refuses the empty mask.
        mask = np.asanyarray(result.mask.dataobj).astype(np.uint8)
        out_labels = save_image(make_image(labels, img.affine),
                                os.path.join(runtime.cwd, 'synthseg.nii.gz'))
        out_mask = save_image(make_image(mask, img.affine),
                              os.path.join(runtime.cwd, 'synthseg_mask.nii.gz'))
        vox = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        counts = np.bincount(labels.ravel().clip(0), minlength=max(OUTPUT_NAMES) + 1)
        meta = {
            'Description': ("Anatomical labels from keyprep's SynthSeg-style label network "
                            '(FreeSurfer numbering; look-up table: seg-synthseg_dseg.tsv at '
                            'the root of the dataset)'),
            'NetworkWeights': net.path.name,
            'NetworkWeightsSha256': net.sha256,
            'NetworkTrainingStep': net.step,
            'NetworkHeldOutDice': net.heldout_dice,
            'NetworkTrusted': net.trusted,
            'NetworkResolution': net.res_mm,
            'Device': device,
            'Precision': net.precision,
            'FlipTTA': bool(self.inputs.flip_tta),
            'Pose': self.inputs.pose,
            'EstimatedPose': result.pose,
            'LabelCheck': result.check,
            'RandomSeed': int(self.inputs.seed),
            'RuntimeS': round(time.perf_counter() - t0, 3),
            'Timings': {'load_s': round(t1 - t0, 3),
                        **{k: round(float(v), 3) for k, v in result.timings.items()}},
            'BrainVolumeCm3': round(float(mask.sum()) * vox, 1),
            'VolumesCm3': {name: round(float(counts[k]) * vox, 2)
                           for k, name in OUTPUT_NAMES.items() if k},
            # BIDS: a string; the versions by package stay machine-readable below
            'SoftwareVersions': ', '.join(f'{k} {v}' for k, v in software_versions().items()),
            'SoftwareVersionsByPackage': software_versions(),
        }
        report = os.path.join(runtime.cwd, 'synthseg.json')
        with open(report, 'w') as fh:
            json.dump(meta, fh, indent=2)
            fh.write('\n')
        self._results.update(out_labels=str(out_labels), out_mask=str(out_mask),
                             out_report=report, out_meta=meta)
        return runtime


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return 'unknown'


class _BiasCorrectInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    skip = traits.Bool(False, usedefault=True, desc='pass the image through unchanged')
    sloppy = traits.Bool(False, usedefault=True)
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True)


class _BiasCorrectOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='bias-corrected image (whole field of view)')
    out_brain = File(exists=True, desc='bias-corrected brain (outside the mask: 0)')


class BiasCorrect(SimpleInterface):
    """N4 bias-field correction estimated inside the brain mask."""

    input_spec = _BiasCorrectInputSpec
    output_spec = _BiasCorrectOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.omp_nthreads)
        import nibabel as nb
        import numpy as np

        from ..pipeline.anatomy import bias_correct
        from ..pipeline.io import save_image

        img = nb.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        mask = np.asanyarray(nb.load(self.inputs.in_mask).dataobj) > 0
        if not self.inputs.skip:
            data = bias_correct(data, img.affine, mask, sloppy=self.inputs.sloppy)
        out = nb.Nifti1Image(data, img.affine, img.header)
        brain = nb.Nifti1Image(np.where(mask, data, 0).astype(np.float32), img.affine, img.header)
        self._results['out_file'] = str(save_image(out, os.path.join(runtime.cwd, 'n4.nii.gz')))
        self._results['out_brain'] = str(save_image(brain, os.path.join(runtime.cwd,
                                                                        'n4_brain.nii.gz')))
        return runtime


class _TissueInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='brain image')
    in_mask = File(exists=True, mandatory=True)
    contrast = traits.Enum('T1w', 'T2w', 'PDw', 'FLAIR', usedefault=True)
    sloppy = traits.Bool(False, usedefault=True)
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True)


class _TissueOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc='1=GM 2=WM 3=CSF')
    out_meta = traits.Dict()


class TissueSegmentation(SimpleInterface):
    """Three tissue classes with ANTs Atropos (see
    :func:`keyprep.pipeline.anatomy.tissue_segmentation`)."""

    input_spec = _TissueInputSpec
    output_spec = _TissueOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.omp_nthreads)
        import nibabel as nb
        import numpy as np

        from ..pipeline.anatomy import TISSUE_LABELS, tissue_segmentation
        from ..pipeline.io import make_image, save_image

        img = nb.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        mask = np.asanyarray(nb.load(self.inputs.in_mask).dataobj) > 0
        seg = tissue_segmentation(data, img.affine, mask, self.inputs.contrast,
                                  sloppy=self.inputs.sloppy)
        out = make_image(seg.astype(np.int16), img.affine)
        self._results['out_dseg'] = str(save_image(out, os.path.join(runtime.cwd,
                                                                     'dseg.nii.gz')))
        vox = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        self._results['out_meta'] = {
            'Method': 'ANTs Atropos, k-means initialised, MRF 0.2',
            'VolumesCm3': {TISSUE_LABELS[k][1]: round(float((seg == k).sum()) * vox, 1)
                           for k in TISSUE_LABELS},
        }
        return runtime
