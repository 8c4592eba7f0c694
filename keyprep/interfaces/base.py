"""Input traits shared by keyprep's interfaces."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, traits

__all__ = ['ComputeInputSpec']


class ComputeInputSpec(BaseInterfaceInputSpec):
    """Where and how wide a node runs. None of these enter Nipype's cache hash: changing the
    device or the thread count reuses finished results."""

    device = traits.Str('cpu', usedefault=True, nohash=True, desc='torch device: auto, cpu or cuda[:N]')
    omp_nthreads = traits.Int(1, usedefault=True, nohash=True, desc='CPU threads of the node')
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc='declares GPU use to the MultiProc scheduler')
