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

__all__ = ['ApplyTransforms', 'JacobianMap', 'Register']


class _RegisterInputSpec(ComputeInputSpec):
    fixed = File(exists=True, mandatory=True, desc='target image (brain)')
    moving = File(exists=True, mandatory=True, desc='moving image (brain)')
    fixed_mask = File(exists=True, desc='target brain mask')
    moving_mask = File(exists=True, desc='moving brain mask')
    method = traits.Str(mandatory=True, desc='registered engine name')
    params = traits.Dict(usedefault=True, desc='engine-specific parameters')
    seed = traits.Int(0, usedefault=True)
    sloppy = traits.Bool(False, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    fwd_xfm = File(exists=True, desc='moving-to-target transform (ITK), applied on the target')
    inv_xfm = File(exists=True, desc='target-to-moving transform (ITK), applied on the moving')
    warped = File(exists=True, desc='moving image resampled onto the target by the engine')
    record = File(exists=True, desc='JSON record: runtime, memory, parameters, versions')
    record_dict = traits.Dict(desc='the record without work-folder paths (for sidecars)')
    transform_kind = traits.Str()


class Register(SimpleInterface):
    """Run one registration engine (:func:`keyprep.pipeline.registration.run_engine`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(self.inputs.omp_nthreads)
        from dataclasses import asdict

        from ..pipeline.registration import run_engine

        opt = {}
        if isdefined(self.inputs.fixed_mask):
            opt['fixed_mask'] = self.inputs.fixed_mask
        if isdefined(self.inputs.moving_mask):
            opt['moving_mask'] = self.inputs.moving_mask
        run = run_engine(self.inputs.method, self.inputs.fixed, self.inputs.moving,
                         os.path.join(runtime.cwd, 'engine'), omp_nthreads=self.inputs.omp_nthreads,
                         device=self.inputs.device, seed=self.inputs.seed,
                         sloppy=self.inputs.sloppy, params=self.inputs.params, **opt)
        record = os.path.join(runtime.cwd, 'record.json')
        run.to_json(record)
        meta = {k: v for k, v in asdict(run).items() if k not in ('fwd_xfm', 'inv_xfm', 'warped')}
        self._results.update(fwd_xfm=run.fwd_xfm, inv_xfm=run.inv_xfm, warped=run.warped,
                             record=record, record_dict=meta,
                             transform_kind=run.transform_kind)
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
