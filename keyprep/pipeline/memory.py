"""Memory of the workflow's nodes from the size of the images, and the ``--mem`` budget.

Every node is built with a ``mem_gb`` figure that holds for images up to a 1 mm head
(:data:`REFERENCE_VOXELS` voxels; e.g. 3 GB for the label network and deepbet, 1.5-3 GB for
an engine's registration). Before the run, :func:`apply_memory_estimates` scales each figure
with the images the node works on (read from their headers):

* every node: its figure times ``max(1, voxels / REFERENCE_VOXELS)``, where ``voxels`` is the
  image's voxel count (a registration: the moving image's and the target's together, against
  twice the reference);
* the label network: at least :func:`label_network_gb`, which follows the network's 2 mm
  grid over the whole field of view (a header with 50 mm voxels asks for a grid of metres:
  the memory that used to end in the kernel's OOM killer).

Nipype's MultiProc plugin then runs only as many nodes at once as their estimates fit in
``--mem`` (``memory_gb``), and a node whose estimate alone exceeds the budget stops the run
at start-up (:func:`check_budget`, exit 64) instead of being killed half-way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ['LABEL_NETWORK_RES_MM', 'REFERENCE_VOXELS', 'Geometry', 'NodeEstimate',
           'apply_memory_estimates', 'check_budget', 'label_network_gb', 'system_memory_gb']

#: The node figures set by the workflow builders hold up to this many voxels (a 256 mm cube
#: at 1 mm).
REFERENCE_VOXELS = 256 ** 3
#: Grid of the label network (the shipped weights).
LABEL_NETWORK_RES_MM = 2.0
_GB = 2.0 ** 30


@dataclass(frozen=True)
class Geometry:
    """Shape, voxel sizes and world extent (mm, bounding box of the voxel centres) of an
    image, from its header."""

    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    extent_mm: tuple[float, float, float]

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def grid_voxels(self, res_mm: float, divisor: int = 16) -> int:
        """Voxels of an axis-aligned ``res_mm`` grid over the field of view (each axis
        rounded up to ``divisor``, as the label network's grid is)."""
        n = [math.ceil(e / res_mm) + 1 for e in self.extent_mm]
        n = [math.ceil(v / divisor) * divisor for v in n]
        return int(np.prod(n, dtype=np.int64))

    def resampled(self, res_mm: float) -> Geometry:
        """The same field of view on isotropic ``res_mm`` voxels."""
        fov = np.asarray(self.shape) * np.asarray(self.zooms)
        shape = tuple(max(2, int(math.ceil(f / res_mm))) for f in fov)
        return Geometry(shape, (res_mm,) * 3, self.extent_mm)

    @classmethod
    def of(cls, image) -> Geometry | None:
        """From a path or a nibabel image (the header only); ``None`` if unreadable."""
        import nibabel as nb

        try:
            img = nb.load(str(image)) if isinstance(image, (str, Path)) else image
            shape = tuple(int(n) for n in img.shape[:3])
            aff = np.asarray(img.affine, dtype=float)
        except Exception:  # noqa: BLE001 - any unreadable header: no estimate
            return None
        if len(shape) != 3 or not np.all(np.isfinite(aff)):
            return None
        zooms = tuple(float(z) for z in np.sqrt((aff[:3, :3] ** 2).sum(0)))
        corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1)
                            for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
        world = (aff @ corners)[:3]
        extent = tuple(float(v) for v in world.max(1) - world.min(1))
        return cls(shape, zooms, extent)


def label_network_gb(geom: Geometry, res_mm: float = LABEL_NETWORK_RES_MM) -> float:
    """Peak memory (GB) of labelling one image with the label network: about 0.8 GB of
    process and model, 40 bytes per native voxel (the image, its blurred copy, the labels
    and mask) and 600 bytes per voxel of the network's grid over the field of view (the
    class probabilities with and without the flip, their upsampling). Calibrated on the
    model card's measurement (1.6 GB for a 1 mm head).

    >>> round(label_network_gb(Geometry((181, 217, 181), (1.0,) * 3, (180.0, 216.0, 180.0))), 1)
    1.6
    >>> label_network_gb(Geometry((46, 55, 46), (50.0,) * 3, (2250.0, 2700.0, 2250.0))) > 500
    True
    """
    return 0.8 + (40.0 * geom.n_voxels + 600.0 * geom.grid_voxels(res_mm)) / _GB


@dataclass
class NodeEstimate:
    """The memory given to one node."""

    name: str
    mem_gb: float
    image: str | None = None


#: Leaf node name -> kind of memory model.
_LABEL_NETWORK_NODES = ('synthseg',)


def _scale(voxels: int, reference: int) -> float:
    return max(1.0, voxels / reference)


def apply_memory_estimates(wf, groups, target_geometry: Geometry | None) -> list[NodeEstimate]:
    """Set every node's ``mem_gb`` from the images it works on (see the module docstring);
    return the estimates, largest first.

    A node is matched to its image by the sub-workflow it sits in: ``<group>_wf`` or
    ``<group>_anat_wf`` of a :class:`~keyprep.bids_app.bids.ProcessingGroup`, then
    ``anat_<key>_wf`` (preprocessing) or ``reg_<key>_<engine>_wf`` (registration) of one of
    its images; ``target_wf`` and ``groupwise_wf`` nodes work on the target. A node that
    cannot be matched to one image gets its group's largest image (or the run's), so an
    estimate is never smaller than the figure the builder gave.
    """
    images: dict[str, dict[str, tuple[str, Geometry]]] = {}
    for group in groups:
        for image in group.images:
            geom = Geometry.of(image.path)
            if geom is not None:
                images.setdefault(group.name, {})[image.key] = (Path(image.path).name, geom)

    def largest(entries):
        entries = list(entries)
        return max(entries, key=lambda e: e[1].n_voxels) if entries else None

    run_largest = largest(e for g in images.values() for e in g.values())
    target = ('the target', target_geometry) if target_geometry is not None else None
    estimates = []
    for name in wf.list_node_names():
        node = wf.get_node(name)
        if node is None or getattr(node, 'run_without_submitting', False):
            continue
        parts = name.split('.')
        leaf = parts[-1]
        image = None
        pair = False
        if parts[0] in ('target_wf', 'groupwise_wf'):
            image = target or run_largest
        else:
            group = re.sub(r'(_anat)?_wf$', '', parts[0])
            entries = images.get(group, {})
            key = None
            for part in parts[1:-1]:
                m = re.fullmatch(r'anat_(.+)_wf', part)
                if m:
                    key = m.group(1)
                m = re.fullmatch(r'reg_(.+)_[A-Za-z0-9]+_wf', part)
                if m:
                    key, pair = m.group(1), True
            image = entries.get(key) if key else None
            if image is None:
                image = largest(entries.values()) or run_largest
                pair = pair or leaf in ('qc_tables',)
        if image is None:
            continue
        label, geom = image
        base = float(node._mem_gb)
        if pair and target is not None:
            voxels = geom.n_voxels + target[1].n_voxels
            mem = base * _scale(voxels, 2 * REFERENCE_VOXELS)
        else:
            mem = base * _scale(geom.n_voxels, REFERENCE_VOXELS)
        if leaf in _LABEL_NETWORK_NODES:
            mem = max(mem, label_network_gb(geom))
        mem = round(mem, 2)
        node._mem_gb = mem
        estimates.append(NodeEstimate(name, mem, label))
    return sorted(estimates, key=lambda e: -e.mem_gb)


def system_memory_gb() -> float | None:
    """Total memory of the machine (GB), or ``None`` where it cannot be read."""
    try:
        from nipype.utils.profiler import get_system_total_memory_gb

        return float(get_system_total_memory_gb())
    except Exception:  # noqa: BLE001
        return None


#: Leaf node name -> the step, in messages.
_STEPS = {'synthseg': 'the label network', 'skull_strip': 'skull stripping',
          'register': 'the registration', 'bias_correct': 'bias correction',
          'tissue_seg': 'tissue segmentation', 'conform': 'conforming',
          'template': 'the groupwise template'}


def check_budget(estimates: list[NodeEstimate], mem_gb: float | None, *, nprocs: int = 1,
                 omp_nthreads: int = 1) -> str | None:
    """Raise :class:`~keyprep.pipeline.errors.UsageError` (exit 64) when one node needs
    more than the budget: ``--mem`` (``mem_gb``), or without it the machine's memory.
    Return a note when ``--mem`` lets fewer of the heaviest nodes run at once than the
    CPUs would (``None`` otherwise).

    >>> est = [NodeEstimate('sub_01_wf.anat_T1w_wf.synthseg', 9.5, 'sub-01_T1w.nii.gz')]
    >>> check_budget(est, 8.0)
    Traceback (most recent call last):
    ...
    keyprep.pipeline.errors.UsageError: --mem 8 GB is less than the 9.5 GB that ...
    >>> check_budget(est, 16.0, nprocs=8, omp_nthreads=2)  # doctest: +ELLIPSIS
    '--mem 16 GB: ... at most 1 ... at once instead of 4 ...'
    """
    from .errors import UsageError

    if not estimates:
        return None
    top = max(estimates, key=lambda e: e.mem_gb)
    leaf = top.name.split('.')[-1]
    what = _STEPS.get(leaf, leaf) + (f' on {top.image}' if top.image else '')
    if mem_gb is not None and top.mem_gb > mem_gb:
        raise UsageError(f'--mem {mem_gb:g} GB is less than the {top.mem_gb:g} GB that '
                         f'{what} needs ({top.name}): give --mem {math.ceil(top.mem_gb)}G or '
                         'more, or resample the image to a coarser grid')
    if mem_gb is None:
        total = system_memory_gb()
        if total is not None and top.mem_gb > 0.9 * total:
            raise UsageError(f'{what} needs about {top.mem_gb:g} GB ({top.name}), more than '
                             f'this machine can give ({0.9 * total:.1f} GB of {total:.1f} GB): '
                             'run it on a larger machine or resample the image to a coarser '
                             'grid')
        return None
    by_cpu = max(1, nprocs // max(1, omp_nthreads))
    by_mem = max(1, int(mem_gb // top.mem_gb))
    if by_mem < by_cpu:
        return (f'--mem {mem_gb:g} GB: the heaviest nodes need up to {top.mem_gb:g} GB each '
                f'({what}), so at most {by_mem} of them run at once instead of {by_cpu} '
                '(--nprocs / --omp-nthreads)')
    return None
