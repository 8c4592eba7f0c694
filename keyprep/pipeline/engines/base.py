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

Variants: one run, several results
----------------------------------
An engine may produce several registrations from one run (for example, one thin-plate
spline per regularisation weight from a single forward pass of a network, or a result
before and after a refinement). It declares them with :meth:`Engine.variants`, a list of
``(variant_name, params)`` (default: the engine alone), and its ``run`` then returns a
``dict`` mapping every variant name to its :class:`RegistrationResult`. Each variant is
exported, checked and reported as if it were an engine of its own (derivatives
``desc-<variant_name>``, one QC row, its own figures), while the engine runs once (one
``Register`` node in the workflow). An engine whose ``variants`` returns a single entry
named after itself behaves exactly as an engine without variants.

Extra outputs
-------------
Files other than transforms and the warped image (keypoints, for example) are declared by
:meth:`Engine.extra_outputs` and returned in :attr:`RegistrationResult.files` under the
same keys; the workflow writes each one as a derivative of the moving image (or, for the
fixed image, with a ``space-<target>`` entity), once per image even when several engines
declare the same file name.
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
    'ExtraOutput',
    'RegistrationResult',
    'engine_variants',
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
    #: BIDS suffixes of the images (``{'fixed': 'T1w', 'moving': 'T2w'}``) when the workflow
    #: knows them; only set for engines with :attr:`Engine.uses_contrasts`.
    contrasts: dict = field(default_factory=dict)

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
        Engine-specific results (losses, errors, timings); JSON-serialisable, recorded in
        the engine's JSON record and in the sidecars.
    files
        Files declared by :meth:`Engine.extra_outputs`, by key.
    """

    fwd_transforms: list[str]
    inv_transforms: list[str]
    inv_invert: list[bool]
    warped: str
    extras: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExtraOutput:
    """A file an engine writes besides its transforms, to be kept as a derivative.

    Attributes
    ----------
    key
        Key in :attr:`RegistrationResult.files` (a Python identifier).
    image
        ``'moving'``: a derivative of the moving image; ``'fixed'``: of the fixed image,
        written under the moving image's name with ``space-<target>``.
    entities
        BIDS entities of the derivative (``desc``, ``suffix``, ``extension``...).
    description
        What the file holds (the ``Description`` of its JSON sidecar).
    columns
        For a ``.tsv`` file, column name -> description (written to a JSON sidecar).
    """

    key: str
    image: str
    entities: dict
    description: str = ''
    columns: dict = field(default_factory=dict)


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
    #: Whether the engine wants the images' contrasts (:attr:`EngineOptions.contrasts`).
    uses_contrasts: ClassVar[bool] = False

    def parameters(self, options: EngineOptions) -> dict:
        """The parameters this engine will use (recorded in JSON sidecars)."""
        return dict(options.params)

    def variants(self, options: EngineOptions) -> list[tuple[str, dict]]:
        """The registrations one run produces: ``[(variant_name, params), ...]``.

        Names are BIDS alphanumeric and unique; ``params`` (JSON-serialisable) are recorded
        with the variant. The default is the engine alone, ``[(self.name, {})]``. Must be
        cheap and free of torch operations: the workflow calls it when the graph is built.
        """
        return [(self.name, {})]

    def extra_outputs(self, options: EngineOptions) -> list[ExtraOutput]:
        """Files besides the transforms that the workflow keeps as derivatives."""
        return []

    def boilerplate(self, options: EngineOptions | None) -> str:
        """A methods sentence for the citation boilerplate."""
        return self.description

    def cache_key(self, options: EngineOptions) -> dict:
        """What, besides the parameters, decides the engine's result (e.g. the checksum of a
        weights file, so that new weights at the same path are not taken from Nipype's
        cache). Called when the workflow is built; empty by default."""
        return {}

    def cite(self, options: EngineOptions | None) -> tuple[str, ...]:
        """BibTeX keys to cite with these options (default: :attr:`citations`)."""
        return tuple(self.citations)

    @abc.abstractmethod
    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None
            ) -> RegistrationResult | dict[str, RegistrationResult]:
        """Register ``moving`` onto ``fixed``; write files into ``out_dir``.

        Returns one :class:`RegistrationResult`, or, for an engine with several
        :meth:`variants`, a dict with one result per variant name.
        """


def engine_variants(engine: Engine, options: EngineOptions) -> list[tuple[str, dict]]:
    """``engine.variants(options)``, checked: non-empty, BIDS-alphanumeric unique names."""
    out = [(str(n), dict(p or {})) for n, p in engine.variants(options)]
    names = [n for n, _ in out]
    if not out:
        raise ValueError(f'{engine.name}: variants() returned nothing')
    bad = [n for n in names if not re.fullmatch(r'[A-Za-z0-9]+', n)]
    if bad:
        raise ValueError(f'{engine.name}: variant names must be BIDS alphanumeric: {bad}')
    if len(set(names)) != len(names):
        raise ValueError(f'{engine.name}: duplicate variant names: {names}')
    return out


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
