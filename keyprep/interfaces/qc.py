"""Nipype interfaces computing the registration QC tables."""

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

__all__ = ['QC_LONG_FILE', 'QC_SUMMARY_FILE', 'QCTables', 'RegistrationQC']

#: The tables :class:`RegistrationQC` writes into its node's folder (per structure and
#: tissue class; one row per registration).
QC_LONG_FILE = 'qc_long.tsv'
QC_SUMMARY_FILE = 'qc_summary.tsv'


class _RegQCInputSpec(BaseInterfaceInputSpec):
    target_dseg = File(exists=True, mandatory=True, desc='tissue labels of the target')
    warped_dseg = File(exists=True, mandatory=True,
                       desc='moving tissue labels on the target grid')
    target_synthseg = File(exists=True, desc="the label network's labels of the target")
    warped_synthseg = File(exists=True, desc="the moving image's network labels on the "
                                             'target grid')
    synthseg_lut = traits.Dict(desc='structure index -> name (default: the 32 structures)')
    synthseg_meta = traits.Dict(desc="the label network's provenance (weights sha256, step)")
    target_mask = File(exists=True, mandatory=True, desc='target brain mask')
    jacobian = File(exists=True, mandatory=True, desc='Jacobian determinant map')
    record = File(exists=True, mandatory=True, desc="engine's JSON record")
    label_set = traits.Str('tissue', usedefault=True)
    lut = traits.Dict(mandatory=True, desc='label index -> name')
    subject = traits.Str(mandatory=True)
    session = traits.Str('', usedefault=True)
    source = traits.Str(mandatory=True, desc='BIDS URI of the moving image')
    target = traits.Str(mandatory=True, desc='target name')


class _RegQCOutputSpec(TraitedSpec):
    out_long = File(exists=True, desc='one row per label')
    out_summary = File(exists=True, desc='one row for this engine')


class RegistrationQC(SimpleInterface):
    """Dice per structure and per tissue class, and Jacobian statistics, of one engine on
    one image (:func:`keyprep.pipeline.qcreport.registration_qc_rows`)."""

    input_spec = _RegQCInputSpec
    output_spec = _RegQCOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.qcreport import registration_qc_rows

        def opt(name):
            value = getattr(self.inputs, name)
            return value if isdefined(value) else None

        slut = opt('synthseg_lut')
        long, summary = registration_qc_rows(
            target_dseg=self.inputs.target_dseg, warped_dseg=self.inputs.warped_dseg,
            target_mask=self.inputs.target_mask, jacobian=self.inputs.jacobian,
            record=self.inputs.record, label_set=self.inputs.label_set,
            lut={int(k): v for k, v in self.inputs.lut.items()}, subject=self.inputs.subject,
            session=self.inputs.session or None, source=self.inputs.source,
            target=self.inputs.target, target_synthseg=opt('target_synthseg'),
            warped_synthseg=opt('warped_synthseg'),
            synthseg_lut={int(k): v for k, v in slut.items()} if slut else None,
            synthseg_meta=opt('synthseg_meta'))
        self._results['out_long'] = os.path.join(runtime.cwd, QC_LONG_FILE)
        self._results['out_summary'] = os.path.join(runtime.cwd, QC_SUMMARY_FILE)
        long.to_csv(self._results['out_long'], sep='\t', index=False, na_rep='n/a')
        summary.to_csv(self._results['out_summary'], sep='\t', index=False, na_rep='n/a')
        return runtime


class _QCTablesInputSpec(BaseInterfaceInputSpec):
    in_long = InputMultiObject(File(exists=True), mandatory=True)
    in_summary = InputMultiObject(File(exists=True), mandatory=True)


class _QCTablesOutputSpec(TraitedSpec):
    out_long = File(exists=True)
    out_summary = File(exists=True)
    long_meta = traits.Dict()
    summary_meta = traits.Dict()


class QCTables(SimpleInterface):
    """Concatenate the per-engine QC rows of a participant (or session)."""

    input_spec = _QCTablesInputSpec
    output_spec = _QCTablesOutputSpec

    def _run_interface(self, runtime):
        from ..pipeline.qcreport import LONG_COLUMNS, SUMMARY_COLUMNS, concat_tables

        for key, cols in (('long', LONG_COLUMNS), ('summary', SUMMARY_COLUMNS)):
            files = getattr(self.inputs, f'in_{key}')
            out = os.path.join(runtime.cwd, f'{key}.tsv')
            concat_tables(files).to_csv(out, sep='\t', index=False, na_rep='n/a')
            self._results[f'out_{key}'] = out
            self._results[f'{key}_meta'] = cols
        return runtime
