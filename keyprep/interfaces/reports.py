"""Reportlet interfaces: PNG figures for the HTML report (see :mod:`keyprep.pipeline.figures`)."""

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

__all__ = ['JacobianFigure', 'KeypointsFigure', 'LabelsFigure', 'MaskFigure',
           'RegistrationFigure', 'VariantsFigure']


class _FigOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='PNG figure')


def _title(inputs):
    return inputs.title if isdefined(inputs.title) else None


class _MaskInputSpec(BaseInterfaceInputSpec):
    image = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    title = traits.Str()


class MaskFigure(SimpleInterface):
    """Brain-mask contour over the image."""

    input_spec = _MaskInputSpec
    output_spec = _FigOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.figures import plot_mask

        out = os.path.join(runtime.cwd, 'mask.png')
        self._results['out_file'] = str(plot_mask(self.inputs.image, self.inputs.mask, out,
                                                  title=_title(self.inputs)))
        return runtime


class _LabelsInputSpec(BaseInterfaceInputSpec):
    image = File(exists=True, mandatory=True)
    labels = File(exists=True, mandatory=True)
    lut = traits.Dict(desc='index -> (name, #rrggbb)')
    title = traits.Str()


class LabelsFigure(SimpleInterface):
    """Label map over the image."""

    input_spec = _LabelsInputSpec
    output_spec = _FigOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.figures import plot_labels

        lut = ({int(k): tuple(v) for k, v in self.inputs.lut.items()}
               if isdefined(self.inputs.lut) else None)
        out = os.path.join(runtime.cwd, 'labels.png')
        self._results['out_file'] = str(plot_labels(self.inputs.image, self.inputs.labels, out,
                                                    lut=lut, title=_title(self.inputs)))
        return runtime


class _RegInputSpec(BaseInterfaceInputSpec):
    target = File(exists=True, mandatory=True)
    before = File(exists=True, mandatory=True, desc='moving image on the target grid, identity')
    warped = File(exists=True, mandatory=True)
    target_mask = File(exists=True)
    title = traits.Str()


class RegistrationFigure(SimpleInterface):
    """Before/after views with the target's edges on top."""

    input_spec = _RegInputSpec
    output_spec = _FigOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.figures import plot_registration

        mask = self.inputs.target_mask if isdefined(self.inputs.target_mask) else None
        out = os.path.join(runtime.cwd, 'registration.png')
        self._results['out_file'] = str(plot_registration(
            self.inputs.target, self.inputs.before, self.inputs.warped, out, target_mask=mask,
            title=_title(self.inputs)))
        return runtime


class _JacInputSpec(BaseInterfaceInputSpec):
    jacobian = File(exists=True, mandatory=True)
    mask = File(exists=True)
    background = File(exists=True)
    title = traits.Str()


class JacobianFigure(SimpleInterface):
    """log2 Jacobian-determinant map, folding highlighted."""

    input_spec = _JacInputSpec
    output_spec = _FigOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.figures import plot_jacobian

        out = os.path.join(runtime.cwd, 'jacobian.png')
        self._results['out_file'] = str(plot_jacobian(
            self.inputs.jacobian, out,
            mask=self.inputs.mask if isdefined(self.inputs.mask) else None,
            background=self.inputs.background if isdefined(self.inputs.background) else None,
            title=_title(self.inputs)))
        return runtime


class _KeypointsInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True, desc='moving brain')
    moving_keypoints = File(exists=True, mandatory=True, desc='its keypoint table (TSV)')
    fixed = File(exists=True, mandatory=True, desc='target brain')
    fixed_keypoints = File(exists=True, mandatory=True, desc='its keypoint table (TSV)')
    title = traits.Str()


class KeypointsFigure(SimpleInterface):
    """Keypoints of the moving image and of the target, coloured by index."""

    input_spec = _KeypointsInputSpec
    output_spec = _FigOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.figures import plot_keypoints

        out = os.path.join(runtime.cwd, 'keypoints.png')
        self._results['out_file'] = str(plot_keypoints(
            self.inputs.moving, self.inputs.moving_keypoints, self.inputs.fixed,
            self.inputs.fixed_keypoints, out, title=_title(self.inputs)))
        return runtime


class _VariantsInputSpec(BaseInterfaceInputSpec):
    target = File(exists=True, mandatory=True)
    warped = InputMultiObject(File(exists=True), mandatory=True,
                              desc='warped moving image of each variant')
    names = traits.List(traits.Str(), mandatory=True, desc='variant names')
    prefix = traits.Str('', usedefault=True, desc='removed from the column labels')
    target_mask = File(exists=True)
    title = traits.Str()


class VariantsFigure(SimpleInterface):
    """The variants of one engine run side by side, target edges on top."""

    input_spec = _VariantsInputSpec
    output_spec = _FigOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.figures import plot_variants

        mask = self.inputs.target_mask if isdefined(self.inputs.target_mask) else None
        out = os.path.join(runtime.cwd, 'variants.png')
        self._results['out_file'] = str(plot_variants(
            self.inputs.target, list(self.inputs.warped), list(self.inputs.names), out,
            target_mask=mask, title=_title(self.inputs), prefix=self.inputs.prefix))
        return runtime
