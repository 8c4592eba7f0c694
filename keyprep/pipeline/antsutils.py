"""Helpers around ANTsPy: thread count before import, array <-> ANTsImage through NIfTI files."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

__all__ = ['import_ants', 'to_ants']


def import_ants(threads: int | None = None):
    """Import ``ants`` with ITK's thread count set first.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when ANTsPy is imported
    (ANTsPy#441), so the variable must be set before the first import in a process.
    If ``ants`` is already imported, the global ITK thread count is set through its API
    when available.
    """
    if threads is not None:
        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(int(threads))
    already = 'ants' in sys.modules
    import ants

    if already and threads is not None:
        setter = getattr(getattr(ants, 'lib', None), 'SetGlobalDefaultNumberOfThreads', None)
        if setter is not None:
            try:
                setter(int(threads))
            except Exception:  # pragma: no cover - depends on the ANTsPy build
                pass
    return ants


def to_ants(data: np.ndarray, affine: np.ndarray):
    """Array + affine -> ANTsImage, through a NIfTI file so that ITK reads the geometry itself."""
    ants = import_ants()
    from .io import make_image

    img = make_image(np.asarray(data, dtype=np.float32), affine)
    with tempfile.TemporaryDirectory() as tmp:
        fname = os.path.join(tmp, 'img.nii')
        img.to_filename(fname)
        return ants.image_read(fname)
