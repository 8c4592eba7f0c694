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

Inverses
--------
A linear engine returns its inverse (one affine, or the forward one flagged to be
inverted). A deformable engine should return its own inverse; one that returns an empty
``inv_transforms`` gets one from :func:`keyprep.pipeline.registration.run_engine_variants`:
its forward chain reversed, affines inverted exactly and displacement fields by fixed-point
iteration (:mod:`keyprep.pipeline.inverse`). Either way the round-trip error of the exported
pair is measured and recorded (record ``inverse``; QC columns ``inverse``,
``inverse_error_mean_mm``, ``inverse_error_p99_mm``; a warning above
:data:`keyprep.pipeline.qc.INVERSE_WARN_MM`).

Learned engines
---------------
An engine that loads weights names its model (:attr:`Engine.model`), declared once with
:func:`register_model` (:class:`LearnedModel`: default weights, check). It then gets the
``--<model>-weights`` option, the start-up check (exit 66 missing, 65 unusable), its weights'
SHA-256 in Nipype's cache key (:meth:`Engine.cache_key`: new weights at the same path are
recomputed) and in the record and sidecars of its transforms (``weights``), and the QC
column ``engine_weights_sha256``. Its weights ship in ``keyprep/models/<model>/`` with a
model card; its BibTeX keys (:attr:`Engine.citations`) go into the boilerplate.

Starting from another engine's affine
-------------------------------------
An engine with :attr:`Engine.default_init` (a method name, e.g. ``keymorphAffine``) registers
after that method's affine: :func:`resolve_methods` adds the method to the run before it,
the workflow passes its forward affine as :attr:`EngineOptions.init_transform`, the engine
registers the image prealigned by it (:meth:`Engine.prealign`) and appends it to its chain
(:meth:`Engine.with_init`); the record and QC column ``chain`` show it
(``keymorphAffine>carl``). ``params['init']`` (``--<engine>-init``) picks another linear
method, or ``none``.
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
    'LearnedModel',
    'RegistrationResult',
    'engine_variants',
    'available_engines',
    'get_engine',
    'lazy',
    'learned_models',
    'register_engine',
    'register_model',
    'resolve_methods',
]

_REGISTRY: dict[str, type[Engine]] = {}
_MODELS: dict[str, LearnedModel] = {}


@dataclass(frozen=True)
class LearnedModel:
    """The weights of a learned engine family, declared once so that every part of keyprep
    handles them the same way: a ``--<name>-weights FILE`` option, a check at start-up
    (exists: else exit 66; loads with ``weights_only=True`` and fits the model: else 65),
    the checksum in Nipype's cache key (new weights at the same path are recomputed) and in
    the records and sidecars of every transform.

    Attributes
    ----------
    name
        Lower-case identifier (``keymorph``, ``carl``, ``dio``): the option is
        ``--<name>-weights``, the parsed option ``<name>_weights``.
    title
        Name in messages (``KeyMorph``).
    default_weights
        ``() -> Path``: the weights shipped in ``keyprep/models/<name>/`` (next to a model
        card), used when the option is not given.
    check
        ``(path) -> {'path', 'sha256'}``, raising :class:`~keyprep.pipeline.errors.
        MissingInputError` or :class:`~keyprep.pipeline.errors.WeightsError`.
    """

    name: str
    title: str
    default_weights: object
    check: object

    @property
    def option(self) -> str:
        return f'--{self.name}-weights'


def lazy(target: str):
    """A function that imports ``'package.module:function'`` when it is first called and
    calls it (so that declaring a learned model imports no torch code)."""
    import importlib

    module, attr = target.split(':')

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = attr
    return call


def register_model(model: LearnedModel) -> LearnedModel:
    """Declare a learned model (see :class:`LearnedModel`)."""
    if not re.fullmatch(r'[a-z][a-z0-9]*', model.name):
        raise ValueError(f'model name {model.name!r} must be lower-case alphanumeric')
    _MODELS[model.name] = model
    return model


def learned_models() -> dict[str, LearnedModel]:
    """Declared learned models by name."""
    from . import _load_builtin_engines

    _load_builtin_engines()
    return dict(_MODELS)


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
    #: For an engine that starts from another engine's result (:meth:`Engine.init_method`):
    #: that engine's forward ITK affine (fixed -> moving points) and its name.
    init_transform: str | None = None
    init_method: str = ''
    #: Structure label maps of the images (``{'fixed': path, 'moving': path}``, FreeSurfer
    #: numbering, each on its image's own grid: the label network's ``synthseg`` outputs)
    #: when the workflow has them; only set for engines with :attr:`Engine.uses_labels`.
    labels: dict = field(default_factory=dict)

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
        the engine's JSON record and in the sidecars. A deformable engine that returns its
        inverse may say how it made it under ``'inverse'`` (a dict): the registry moves it
        into the run's inverse record, next to the measured round-trip error. An engine
        whose objective contained the label network's structure labels (DIO's label
        prompting) sets ``'labels_in_objective': True``: QC then reports their Dice but does
        not let it set the status, since the engine aligned those very labels.
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
    #: Whether the engine uses the images' structure label maps (:attr:`EngineOptions.labels`;
    #: KeyMorph takes the head's pose from them). Engines must work without them.
    uses_labels: ClassVar[bool] = False
    #: The :class:`LearnedModel` (by name) whose weights the engine loads, or ``''``. Its
    #: weights file is ``params['weights']`` (from ``--<model>-weights``) or the default.
    model: ClassVar[str] = ''
    #: Engines that can start from another engine's affine: the default one (a method name,
    #: or ``''`` for none); ``params['init']`` overrides it (``'none'``: no start).
    default_init: ClassVar[str | None] = None

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
        """What, besides the parameters, decides the engine's result: for a learned engine,
        the checksum of its weights file, so that new weights at the same path are not
        taken from Nipype's cache. Called when the workflow is built."""
        path = self.weights_path(options)
        if path is None or not path.is_file():
            return {}
        from ..weights import sha256_file

        return {'weights_sha256': sha256_file(path)}

    def weights_path(self, options: EngineOptions) -> Path | None:
        """The weights file a learned engine uses (``params['weights']`` or its model's
        default); ``None`` for an engine without a model."""
        if not self.model:
            return None
        given = (options.params or {}).get('weights')
        return Path(given) if given else Path(learned_models()[self.model].default_weights())

    def init_method(self, options: EngineOptions) -> str:
        """The method whose forward affine this engine starts from (``''``: none)."""
        if self.default_init is None:
            return ''
        value = (options.params or {}).get('init', self.default_init)
        return '' if value in (None, '', 'none') else str(value)

    def prealign(self, fixed: Path, moving: Path, out_dir: Path,
                 options: EngineOptions) -> Path:
        """The moving image on the fixed grid through :attr:`EngineOptions.init_transform`
        (or through the identity, in world coordinates, without one): what an engine that
        starts from another engine's affine registers to the fixed image."""
        from ..transforms import apply_transforms, identity_transform

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        xfm = options.init_transform or identity_transform(out_dir / 'identity.txt')
        return apply_transforms(moving, fixed, [xfm], out_dir / 'moving_prealigned.nii.gz',
                                interpolation='linear')

    def with_init(self, result: RegistrationResult, options: EngineOptions
                  ) -> RegistrationResult:
        """Append the starting affine to a result computed on the prealigned image: the
        forward chain becomes ``[engine's transforms..., init]`` (points go through the
        engine's field first, then the affine) and the inverse ``[init (inverted),
        engine's inverse...]``; an engine without an inverse keeps none (the registry
        inverts the chain)."""
        if not options.init_transform:
            return result
        init = str(options.init_transform)
        inv, invert = list(result.inv_transforms), list(result.inv_invert)
        if inv:
            inv, invert = [init, *inv], [True, *invert]
        return RegistrationResult(fwd_transforms=[*result.fwd_transforms, init],
                                  inv_transforms=inv, inv_invert=invert, warped=result.warped,
                                  extras=result.extras, files=result.files)

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


def variant_owner(name: str, engine_params: dict[str, dict] | None = None,
                  sloppy: bool = False) -> str | None:
    """The engine that produces method ``name`` (an engine or one of its variants), with
    the given per-engine parameters; ``None`` if no engine does."""
    engine_params = engine_params or {}
    engines = available_engines()
    for key in engines:
        if key.lower() == name.lower():
            return key
    for key, cls in engines.items():
        options = EngineOptions(sloppy=sloppy, params=dict(engine_params.get(key, {})))
        try:
            names = [n for n, _ in engine_variants(cls(), options)]
        except Exception:  # noqa: BLE001 - parameters meant for another engine
            continue
        if name in names:
            return key
    return None


def resolve_methods(methods: list[str], engine_params: dict[str, dict] | None = None,
                    sloppy: bool = False) -> list[str]:
    """The engines to run for ``--methods``: each engine that starts from another
    method's affine (:meth:`Engine.init_method`) gets the engine of that method added
    before it when it is not selected. Raises :class:`~keyprep.pipeline.errors.UsageError`
    for an unknown or non-linear starting method, or a cycle."""
    from ..errors import UsageError

    engine_params = engine_params or {}
    out: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        engine = get_engine(name)
        if engine.name in out:
            return
        if engine.name in chain:
            raise UsageError(f'methods start from each other: {" -> ".join(chain)}')
        options = EngineOptions(sloppy=sloppy, params=dict(engine_params.get(engine.name, {})))
        init = engine.init_method(options)
        if init:
            owner = variant_owner(init, engine_params, sloppy)
            if owner is None:
                raise UsageError(f'{engine.name} starts from {init!r}, which no engine gives')
            if available_engines()[owner].transform_kind != 'linear':
                raise UsageError(f'{engine.name} starts from an affine; {init} is '
                                 f'{available_engines()[owner].transform_kind}')
            add(owner, (*chain, engine.name))
        out.append(engine.name)

    for m in methods:
        add(m, ())
    return out
