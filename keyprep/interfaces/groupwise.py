"""Nipype interface building the ``--target groupwise`` template."""

from __future__ import annotations

import os

from nipype.interfaces.base import File, InputMultiObject, SimpleInterface, TraitedSpec, traits

from .base import ComputeInputSpec

__all__ = ['GroupwiseTemplate']


class _GroupwiseInputSpec(ComputeInputSpec):
    brains = InputMultiObject(File(exists=True), mandatory=True,
                              desc='one skull-stripped brain per participant')
    masks = InputMultiObject(File(exists=True), mandatory=True, desc='their brain masks')
    weights = traits.Str('', usedefault=True, desc='KeyMorph weights (empty: shipped model)')
    weights_sha256 = traits.Str(desc="the weights' checksum (only hashed by Nipype)")
    kind = traits.Enum('affine', 'rigid', usedefault=True, desc='Procrustes fits')
    resolution = traits.Float(1.0, usedefault=True, desc='template voxel size (mm)')


class _GroupwiseOutputSpec(TraitedSpec):
    template = File(exists=True, desc='the template image')
    mask = File(exists=True, desc='its brain mask')
    keypoints = File(exists=True, desc='its keypoints (the Procrustes mean), TSV')
    report = File(exists=True, desc='JSON: sources, Procrustes iterations and residuals')
    meta = traits.Dict(desc='sidecar content')


class GroupwiseTemplate(SimpleInterface):
    """:func:`keyprep.pipeline.keymorph.groupwise.build_template` on the brains of a run."""

    input_spec = _GroupwiseInputSpec
    output_spec = _GroupwiseOutputSpec

    def _run_interface(self, runtime):
        import json

        import torch

        from ..pipeline.keymorph.groupwise import build_template

        torch.set_num_threads(max(1, self.inputs.omp_nthreads))
        res = build_template(list(self.inputs.brains), list(self.inputs.masks),
                             os.path.join(runtime.cwd, 'template'),
                             weights=self.inputs.weights or None, kind=self.inputs.kind,
                             resolution=self.inputs.resolution, device=self.inputs.device)
        meta = json.loads(open(res.report).read())
        for key in ('SubjectToTemplate', 'Sources'):  # work-folder paths: the sink has URIs
            meta.pop(key, None)
        self._results.update(template=res.template, mask=res.mask, keypoints=res.keypoints,
                             report=res.report, meta=meta)
        return runtime
