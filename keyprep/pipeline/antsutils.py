"""Helpers around ANTsPy: thread count before import, array <-> ANTsImage through NIfTI files."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import numpy as np

__all__ = ['import_ants', 'to_ants', 'private_tempdir']


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


@contextlib.contextmanager
def private_tempdir():
    """Point :mod:`tempfile`'s default directory at a fresh private folder for the duration,
    and remove it afterwards with everything in it.

    Some ANTsPy functions name their scratch files with ``tempfile.mktemp`` in the system
    temporary folder and never delete them (``ants.atropos`` leaves three probability images
    per call): on a cluster node's shared ``/tmp`` that grows with every participant. Not
    thread-safe (the default directory is process-wide); keyprep runs ANTs one call at a time
    per process.
    """
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix='keyprep-ants-') as tmp:
        tempfile.tempdir = tmp
        try:
            yield tmp
        finally:
            tempfile.tempdir = previous


def to_ants(data: np.ndarray, affine: np.ndarray):
    """Array + affine -> ANTsImage, through a NIfTI file so that ITK reads the geometry itself."""
    ants = import_ants()
    from .io import make_image

    img = make_image(np.asarray(data, dtype=np.float32), affine)
    with tempfile.TemporaryDirectory() as tmp:
        fname = os.path.join(tmp, 'img.nii')
        img.to_filename(fname)
        return ants.image_read(fname)
