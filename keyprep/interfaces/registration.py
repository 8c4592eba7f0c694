"""Nipype interfaces for registration, transform application and Jacobian maps."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .base import ComputeInputSpec

__all__ = ['ApplyTransforms', 'JacobianMap', 'PickFile', 'Register', 'SelectVariant']


class _RegisterInputSpec(ComputeInputSpec):
    fixed = File(exists=True, mandatory=True, desc='target image (brain)')
    moving = File(exists=True, mandatory=True, desc='moving image (brain)')
    fixed_mask = File(exists=True, desc='target brain mask')
    moving_mask = File(exists=True, desc='moving brain mask')
    method = traits.Str(mandatory=True, desc='registered engine name')
    params = traits.Dict(usedefault=True, desc='engine-specific parameters')
    seed = traits.Int(0, usedefault=True)
    sloppy = traits.Bool(False, usedefault=True)
    fixed_contrast = traits.Str(desc='BIDS suffix of the fixed image (engines that use it)')
    moving_contrast = traits.Str(desc='BIDS suffix of the moving image (engines that use it)')
    cache_key = traits.Dict(desc="what else decides the result (e.g. the weights' checksum); "
                                 'only hashed by Nipype')
    init_xfm = File(exists=True, desc="forward affine of the method this engine starts from")
    init_method = traits.Str(desc='the method init_xfm comes from')
    fixed_labels = File(exists=True, desc="target's structure labels (label network; engines "
                                          'that use them)')
    moving_labels = File(exists=True, desc="moving image's structure labels (label network; "
                                           'engines that use them)')


class _RegisterOutputSpec(TraitedSpec):
    fwd_xfm = File(exists=True, desc='moving-to-target transform (ITK), applied on the target')
    inv_xfm = File(exists=True, desc='target-to-moving transform (ITK), applied on the moving')
    warped = File(exists=True, desc='moving image resampled onto the target by the engine')
    record = File(exists=True, desc='JSON record: runtime, memory, parameters, versions')
    record_dict = traits.Dict(desc='the record without work-folder paths (for sidecars)')
    transform_kind = traits.Str()
    # every variant, in the engine's variant order (the single outputs above: the first)
    variant_names = traits.List(traits.Str(), desc='variant names')
    fwd_xfms = traits.List(File(exists=True), desc='forward transform of each variant')
    inv_xfms = traits.List(File(exists=True), desc='inverse transform of each variant')
    warpeds = traits.List(File(exists=True), desc='warped image of each variant')
    records = traits.List(File(exists=True), desc='JSON record of each variant')
    record_dicts = traits.List(traits.Dict(), desc='record of each variant, for sidecars')
    files = traits.Dict(desc='extra output files of the engine, by key')


def _sidecar_record(run) -> dict:
    """An engine record without work-folder paths (and without variant fields that say
    nothing for an engine without variants)."""
    from dataclasses import asdict

    meta = {k: v for k, v in asdict(run).items()
            if k not in ('fwd_xfm', 'inv_xfm', 'warped', 'files')}
    if meta.get('engine') == meta.get('method'):
        meta.pop('engine')
    if not meta.get('variant_params'):
        meta.pop('variant_params', None)
    return meta


class Register(SimpleInterface):
    """Run one registration engine (:func:`keyprep.pipeline.registration.run_engine`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(self.inputs.omp_nthreads)
        from ..pipeline.registration import run_engine_variants

        opt = {}
        if isdefined(self.inputs.fixed_mask):
            opt['fixed_mask'] = self.inputs.fixed_mask
        if isdefined(self.inputs.moving_mask):
            opt['moving_mask'] = self.inputs.moving_mask
        contrasts = {k: getattr(self.inputs, f'{k}_contrast') for k in ('fixed', 'moving')
                     if isdefined(getattr(self.inputs, f'{k}_contrast'))}
        if isdefined(self.inputs.init_xfm):
            opt['init_transform'] = self.inputs.init_xfm
            opt['init_method'] = (self.inputs.init_method if isdefined(self.inputs.init_method)
                                  else '')
        labels = {k: getattr(self.inputs, f'{k}_labels') for k in ('fixed', 'moving')
                  if isdefined(getattr(self.inputs, f'{k}_labels'))}
        if labels:
            opt['labels'] = labels
        runs = run_engine_variants(self.inputs.method, self.inputs.fixed, self.inputs.moving,
                                   os.path.join(runtime.cwd, 'engine'),
                                   omp_nthreads=self.inputs.omp_nthreads,
                                   device=self.inputs.device, seed=self.inputs.seed,
                                   sloppy=self.inputs.sloppy, params=self.inputs.params,
                                   contrasts=contrasts, **opt)
        records, metas, files = [], [], {}
        for i, run in enumerate(runs):
            record = os.path.join(runtime.cwd, 'record.json' if i == 0
                                  else f'record_{run.method}.json')
            run.to_json(record)
            records.append(record)
            metas.append(_sidecar_record(run))
            for key, path in run.files.items():
                files.setdefault(key, path)
        first = runs[0]
        self._results.update(fwd_xfm=first.fwd_xfm, inv_xfm=first.inv_xfm, warped=first.warped,
                             record=records[0], record_dict=metas[0],
                             transform_kind=first.transform_kind,
                             variant_names=[r.method for r in runs],
                             fwd_xfms=[r.fwd_xfm for r in runs],
                             inv_xfms=[r.inv_xfm for r in runs],
                             warpeds=[r.warped for r in runs], records=records,
                             record_dicts=metas, files=files)
        return runtime


class _SelectVariantInputSpec(BaseInterfaceInputSpec):
    variant = traits.Str(mandatory=True, desc='the variant to select')
    variant_names = traits.List(traits.Str(), mandatory=True)
    fwd_xfms = traits.List(File(exists=True), mandatory=True)
    inv_xfms = traits.List(File(exists=True), mandatory=True)
    warpeds = traits.List(File(exists=True), mandatory=True)
    records = traits.List(File(exists=True), mandatory=True)
    record_dicts = traits.List(traits.Dict(), mandatory=True)


class _SelectVariantOutputSpec(TraitedSpec):
    fwd_xfm = File(exists=True)
    inv_xfm = File(exists=True)
    warped = File(exists=True)
    record = File(exists=True)
    record_dict = traits.Dict()


class SelectVariant(SimpleInterface):
    """One variant's outputs from the lists of a :class:`Register` node."""

    input_spec = _SelectVariantInputSpec
    output_spec = _SelectVariantOutputSpec

    def _run_interface(self, runtime):
        names = list(self.inputs.variant_names)
        if self.inputs.variant not in names:
            raise ValueError(f'variant {self.inputs.variant!r} not among {names}')
        i = names.index(self.inputs.variant)
        self._results.update(fwd_xfm=self.inputs.fwd_xfms[i], inv_xfm=self.inputs.inv_xfms[i],
                             warped=self.inputs.warpeds[i], record=self.inputs.records[i],
                             record_dict=self.inputs.record_dicts[i])
        return runtime


class _PickFileInputSpec(BaseInterfaceInputSpec):
    files = traits.Dict(mandatory=True, desc='key -> file')
    key = traits.Str(mandatory=True)


class _PickFileOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class PickFile(SimpleInterface):
    """One file of a :class:`Register` node's extra outputs."""

    input_spec = _PickFileInputSpec
    output_spec = _PickFileOutputSpec

    def _run_interface(self, runtime):
        if self.inputs.key not in self.inputs.files:
            raise ValueError(f'the engine wrote no {self.inputs.key!r} file '
                             f'(it wrote: {", ".join(self.inputs.files) or "none"})')
        self._results['out_file'] = self.inputs.files[self.inputs.key]
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    reference = File(exists=True, mandatory=True)
    transforms = InputMultiObject(File(exists=True), desc='ITK transforms, ANTs order; '
                                  'empty for identity (world coordinates)')
    interpolation = traits.Enum('linear', 'genericLabel', 'nearestNeighbor', 'bSpline',
                                'lanczosWindowedSinc', usedefault=True)
    out_name = traits.Str('resampled.nii.gz', usedefault=True)


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyTransforms(SimpleInterface):
    """Resample an image or a label map with ``ants.apply_transforms``."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.transforms import apply_transforms, identity_transform

        xfms = list(self.inputs.transforms) if isdefined(self.inputs.transforms) else []
        if not xfms:
            xfms = [str(identity_transform(os.path.join(runtime.cwd, 'identity.txt')))]
        out = apply_transforms(self.inputs.in_file, self.inputs.reference, xfms,
                               os.path.join(runtime.cwd, self.inputs.out_name),
                               interpolation=self.inputs.interpolation)
        self._results['out_file'] = str(out)
        return runtime


class _JacobianInputSpec(BaseInterfaceInputSpec):
    xfm = File(exists=True, mandatory=True, desc='forward transform (target grid)')
    reference = File(exists=True, mandatory=True, desc='target image')
    transform_kind = traits.Enum('linear', 'deformable', mandatory=True)


class _JacobianOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class JacobianMap(SimpleInterface):
    """Jacobian determinant of the forward transform on the target grid."""

    input_spec = _JacobianInputSpec
    output_spec = _JacobianOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.io import save_image
        from ..pipeline.transforms import jacobian_map

        img = jacobian_map(self.inputs.xfm, self.inputs.reference, self.inputs.transform_kind)
        self._results['out_file'] = str(save_image(img, os.path.join(runtime.cwd,
                                                                     'jacobian.nii.gz')))
        return runtime
