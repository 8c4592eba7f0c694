"""The only writer into the output dataset: :class:`DerivativesDataSink`."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

__all__ = ['DerivativesDataSink']


class _DSInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(mandatory=True, desc='output dataset root')
    in_file = File(exists=True, mandatory=True, desc='file to write')
    source_file = traits.Str(mandatory=True, desc='raw BIDS file the entities come from')
    relative_path = traits.Str(desc='explicit relative output path (overrides entities)')
    entities = traits.Dict(usedefault=True, desc='entities overriding the source file\'s')
    meta_dict = traits.Dict(usedefault=True, desc='JSON sidecar content')
    extra_meta = traits.Dict(usedefault=True, desc='more sidecar content (from other nodes)')
    bids_dir = traits.Str(desc='input dataset root, for Sources BIDS URIs')
    data_dtype = traits.Str(desc='cast NIfTI data to this dtype (e.g. uint8, int16)')
    sidecar = traits.Bool(True, usedefault=True, desc='write a JSON sidecar')


class _DSOutputSpec(TraitedSpec):
    out_file = File(desc='written file')
    out_meta = File(desc='written sidecar')


class DerivativesDataSink(SimpleInterface):
    """Write a derivative atomically under its BIDS-Derivatives name.

    The name comes from :func:`keyprep.pipeline.naming.derivative_name`; the JSON sidecar
    gets ``Sources`` (a BIDS URI of the raw input) and the metadata given. Files are
    written to a temporary name in the destination folder, then renamed, so that a
    killed run never leaves a half-written derivative.
    """

    input_spec = _DSInputSpec
    output_spec = _DSOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        import json
        import shutil
        import tempfile
        from pathlib import Path

        from ..pipeline.naming import bids_uri, derivative_name
        from ..pipeline.io import atomic_write_text, make_image, publish_file

        base = Path(self.inputs.base_directory)
        src = self.inputs.source_file
        in_file = self.inputs.in_file
        ents = dict(self.inputs.entities)
        if isdefined(self.inputs.relative_path):
            rel = self.inputs.relative_path
        else:
            if 'extension' not in ents:
                name = os.path.basename(in_file)
                ents['extension'] = ('.nii.gz' if name.endswith('.nii.gz')
                                     else os.path.splitext(name)[1])
            rel = derivative_name(src, **ents)
        out = base / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        ext = '.nii.gz' if out.name.endswith('.nii.gz') else out.suffix
        fd, tmp = tempfile.mkstemp(prefix=f'.{out.name}.', suffix=ext, dir=out.parent)
        os.close(fd)
        try:
            if isdefined(self.inputs.data_dtype) and str(out).endswith(('.nii', '.nii.gz')):
                import nibabel as nb
                import numpy as np

                img = nb.load(in_file)
                data = np.asanyarray(img.dataobj)
                dtype = np.dtype(self.inputs.data_dtype)
                if np.issubdtype(dtype, np.integer):
                    data = np.rint(data)
                new = make_image(data.astype(dtype), img.affine)
                new.to_filename(tmp)  # the temporary name keeps the extension
            else:
                shutil.copyfile(in_file, tmp)
            publish_file(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._results['out_file'] = str(out)
        if self.inputs.sidecar and not str(out).endswith(('.json', '.tsv', '.png', '.html')):
            meta = {}
            if isdefined(self.inputs.bids_dir) and not src.startswith('bids:'):
                try:
                    meta['Sources'] = [bids_uri(src, self.inputs.bids_dir)]
                except ValueError:
                    meta['Sources'] = [src]
            meta.update(self.inputs.meta_dict)
            meta.update(self.inputs.extra_meta)
            stem = out.name[:-7] if out.name.endswith('.nii.gz') else out.name.rsplit('.', 1)[0]
            side = out.with_name(stem + '.json')
            atomic_write_text(side, json.dumps(meta, indent=2, sort_keys=True, default=str) + '\n')
            self._results['out_meta'] = str(side)
        return runtime
