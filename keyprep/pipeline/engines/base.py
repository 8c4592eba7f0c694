"""The one interface every registration engine implements, and the engine registry.

An engine receives a fixed (target) and a moving image, optional brain masks and
:class:`EngineOptions`, and returns a :class:`RegistrationResult`: its transforms as
ANTs/ITK files (a list in ``ants.apply_transforms`` order, for both directions), the
moved image, and engine extras. Timing, peak memory, transform export to one file per
direction, Jacobians and QC are done once for all engines by :func:`run_engine` and
:mod:`keyprep.pipeline.transforms`, so an engine only does its own registration.

Adding an engine::

    @register_engine
    class MyEngine(Engine):
        name = 'myEngine'          # BIDS-alphanumeric; used in desc-<name>
        family = 'mine'
        transform_kind = 'deformable'
        def run(self, fixed, moving, out_dir, options, fixed_mask=None, moving_mask=None):
            ...
            return RegistrationResult(...)

and importing its module from :mod:`keyprep.pipeline.engines`. It then appears in the
CLI (``--methods``), the workflows, the derivatives, the QC tables, the report and the
benchmark.
"""

from __future__ import annotations

import abc
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

__all__ = [
    'Engine',
    'EngineOptions',
    'RegistrationResult',
    'available_engines',
    'get_engine',
    'register_engine',
]

_REGISTRY: dict[str, type[Engine]] = {}


@dataclass
class EngineOptions:
    """Options common to all engines; engine-specific ones go in ``params``."""

    omp_nthreads: int = 1
    device: str = 'cpu'
    seed: int = 0
    sloppy: bool = False
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegistrationResult:
    """What an engine returns.

    Attributes
    ----------
    fwd_transforms
        Files that ``ants.apply_transforms(fixed, moving, fwd_transforms)`` uses to bring
        the moving image onto the fixed grid (they map fixed-space points to moving space).
    inv_transforms, inv_invert
        Files and ``whichtoinvert`` flags that bring the fixed image onto the moving grid.
    warped
        The moving image resampled on the fixed grid by the engine.
    extras
        Engine-specific outputs (e.g. keypoint files, losses); JSON-serialisable.
    """

    fwd_transforms: list[str]
    inv_transforms: list[str]
    inv_invert: list[bool]
    warped: str
    extras: dict = field(default_factory=dict)


class Engine(abc.ABC):
    """Base class of registration engines."""

    #: BIDS-alphanumeric engine name, used in ``--methods`` and ``desc-<name>``.
    name: ClassVar[str] = ''
    #: Family (``ants``, ``keymorph``...): groups engines in reports.
    family: ClassVar[str] = ''
    #: ``'linear'`` (one affine) or ``'deformable'`` (a displacement field).
    transform_kind: ClassVar[str] = 'linear'
    #: One-line description for reports and ``--help``.
    description: ClassVar[str] = ''
    #: Whether the engine runs torch code (so it declares GPU use to the scheduler).
    uses_torch: ClassVar[bool] = False
    #: BibTeX keys (in ``keyprep/data/boilerplate.bib``) to cite.
    citations: ClassVar[tuple[str, ...]] = ()
    #: Memory estimate in GB for a 1 mm brain (for Nipype's scheduler).
    mem_gb: ClassVar[float] = 2.0

    def parameters(self, options: EngineOptions) -> dict:
        """The parameters this engine will use (recorded in JSON sidecars)."""
        return dict(options.params)

    def boilerplate(self, options: EngineOptions) -> str:
        """A methods sentence for the citation boilerplate."""
        return self.description

    @abc.abstractmethod
    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``; write files into ``out_dir``."""


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator adding an engine to the registry."""
    if not re.fullmatch(r'[A-Za-z0-9]+', cls.name or ''):
        raise ValueError(f'engine name {cls.name!r} must be a non-empty BIDS alphanumeric label')
    if cls.transform_kind not in ('linear', 'deformable'):
        raise ValueError(f'{cls.name}: transform_kind must be linear or deformable')
    _REGISTRY[cls.name] = cls
    return cls


def available_engines() -> dict[str, type[Engine]]:
    """Registered engines by name, in registration order."""
    from . import _load_builtin_engines

    _load_builtin_engines()
    return dict(_REGISTRY)


def get_engine(name: str) -> Engine:
    """Instantiate a registered engine by name (case-insensitive)."""
    engines = available_engines()
    for key, cls in engines.items():
        if key.lower() == name.lower():
            return cls()
    from ..errors import UsageError

    raise UsageError(f'unknown registration method {name!r}; available: {", ".join(engines)}')
