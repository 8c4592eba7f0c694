"""Running an engine the same way for all engines: seeds, threads, timing, peak memory,
and the export of one ITK transform file per direction.

An engine with several variants (:meth:`keyprep.pipeline.engines.Engine.variants`) runs
once and gives one :class:`EngineRun` per variant (:func:`run_engine_variants`); the
measured time and memory are those of the one run, shared by its variants.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engines import EngineOptions, RegistrationResult, engine_variants, get_engine
from .resources import measure, resolve_device, seed_everything, tune_allocator
from .transforms import export_transforms

_LINEAR_SUFFIXES = ('.mat', '.txt')

__all__ = ['EngineRun', 'run_engine', 'run_engine_variants', 'software_versions']


def software_versions() -> dict[str, str]:
    """Versions of keyprep and of the libraries whose numbers end up in outputs."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out = {'keyprep': __version__, 'python': platform.python_version()}
    for dist in ('antspyx', 'torch', 'nipype', 'nibabel', 'numpy', 'deepbet', 'pybids'):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = 'not installed'
    return out


@dataclass
class EngineRun:
    """Everything known about one engine run; written as the engine's JSON record.

    For a variant, ``method`` is the variant's name, ``engine`` the engine that produced
    it, and ``runtime_s``/``peak_mem_mb`` are those of the engine's whole run (all its
    variants); ``variant_params`` are the variant's own parameters.
    """

    method: str
    transform_kind: str
    fwd_xfm: str
    inv_xfm: str
    warped: str
    runtime_s: float
    peak_mem_mb: float
    peak_gpu_mb: float | None
    device: str
    threads: int
    seed: int
    parameters: dict
    extras: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    engine: str = ''
    variant_params: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    #: The methods whose transforms make this one, in the order points go through them
    #: backwards (``['keymorphAffine', 'carl']``: the starting affine, then the engine).
    chain: list = field(default_factory=list)
    #: For a deformable transform, how its inverse was obtained (``source``: ``engine``,
    #: or ``fixed-point`` inversion by keyprep, with its iterations and residual) and the
    #: round-trip error of the exported pair (``consistency``: mean, p99, max mm).
    inverse: dict = field(default_factory=dict)
    #: A learned engine's weights: ``{'model', 'path', 'sha256'}``.
    weights: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> EngineRun:
        return cls(**json.loads(Path(path).read_text()))


def run_engine(method: str, fixed: str | Path, moving: str | Path, out_dir: str | Path, *,
               fixed_mask: str | Path | None = None, moving_mask: str | Path | None = None,
               omp_nthreads: int = 1, device: str = 'cpu', seed: int = 0,
               sloppy: bool = False, params: dict | None = None,
               contrasts: dict | None = None, init_transform: str | Path | None = None,
               init_method: str = '', labels: dict | None = None) -> EngineRun:
    """Register ``moving`` to ``fixed`` with engine ``method`` and export its transforms.

    The measured wall time and peak memory cover the engine's own registration (not the
    export of transforms, which is the same for all engines). For an engine that gives
    several variants with these parameters, use :func:`run_engine_variants`.
    """
    runs = run_engine_variants(method, fixed, moving, out_dir, fixed_mask=fixed_mask,
                               moving_mask=moving_mask, omp_nthreads=omp_nthreads,
                               device=device, seed=seed, sloppy=sloppy, params=params,
                               contrasts=contrasts, init_transform=init_transform,
                               init_method=init_method, labels=labels)
    if len(runs) != 1:
        raise ValueError(f'{method} gave {len(runs)} variants ({", ".join(r.method for r in runs)})'
                         ': use run_engine_variants')
    return runs[0]


def run_engine_variants(method: str, fixed: str | Path, moving: str | Path,
                        out_dir: str | Path, *, fixed_mask: str | Path | None = None,
                        moving_mask: str | Path | None = None, omp_nthreads: int = 1,
                        device: str = 'cpu', seed: int = 0, sloppy: bool = False,
                        params: dict | None = None,
                        contrasts: dict | None = None,
                        init_transform: str | Path | None = None,
                        init_method: str = '', labels: dict | None = None) -> list[EngineRun]:
    """Run engine ``method`` once and export every variant it gives (in
    :meth:`~keyprep.pipeline.engines.Engine.variants` order).

    A single variant exports into ``out_dir`` (``xfm_fwd``, ``xfm_inv``), several into
    ``out_dir/<variant>/``. ``init_transform`` (the forward affine of method
    ``init_method``) is where an engine that starts from another's affine starts.
    ``labels`` (``{'fixed': path, 'moving': path}``: the images' structure label maps) reach
    engines that use them (:attr:`~keyprep.pipeline.engines.Engine.uses_labels`).

    A deformable variant returned without an inverse gets one here: every transform of its
    forward chain is inverted (affines exactly, displacement fields by fixed-point
    iteration, :mod:`keyprep.pipeline.inverse`) and the chain reversed. For every
    deformable variant the round-trip error of the exported pair is measured (inside the
    fixed mask when given) and recorded.
    """
    engine = get_engine(method)
    device = resolve_device(device) if engine.uses_torch else 'cpu'
    options = EngineOptions(omp_nthreads=omp_nthreads, device=device, seed=seed, sloppy=sloppy,
                            params=dict(params or {}),
                            contrasts=dict(contrasts or {}) if engine.uses_contrasts else {},
                            init_transform=str(init_transform) if init_transform else None,
                            init_method=init_method if init_transform else '',
                            labels={k: str(v) for k, v in (labels or {}).items() if v}
                            if engine.uses_labels else {})
    wanted = engine.init_method(options)
    if wanted and not init_transform:
        raise ValueError(f'{engine.name} starts from the affine of {wanted}: give its '
                         'forward transform (init_transform)')
    variants = engine_variants(engine, options)
    tune_allocator()  # every engine, so that timings compare like with like
    if engine.uses_torch:
        import torch

        torch.set_num_threads(max(1, omp_nthreads))
    seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with measure(device=device) as m:
        result = engine.run(Path(fixed), Path(moving), out_dir, options,
                            fixed_mask=Path(fixed_mask) if fixed_mask else None,
                            moving_mask=Path(moving_mask) if moving_mask else None)
    names = [n for n, _ in variants]
    if isinstance(result, RegistrationResult):
        if len(variants) != 1:
            raise ValueError(f'{engine.name} declares variants {names} but returned one result')
        results = {names[0]: result}
    else:
        results = dict(result)
        if set(results) != set(names):
            raise ValueError(f'{engine.name} returned results for {sorted(results)}, expected '
                             f'{names}')
    params_used = json.loads(json.dumps(engine.parameters(options), default=list))
    versions = software_versions()
    weights = {}
    wpath = engine.weights_path(options)
    if wpath is not None:
        from .weights import sha256_file

        weights = {'model': engine.model, 'path': str(wpath), 'sha256': sha256_file(wpath)}
    runs = []
    for name, vparams in variants:
        res = results[name]
        where = out_dir if len(variants) == 1 else out_dir / name
        where.mkdir(parents=True, exist_ok=True)
        inverse = {}
        inv_list, inv_invert = list(res.inv_transforms or []), list(res.inv_invert or [])
        if engine.transform_kind == 'deformable':
            inverse = {'source': 'engine'}
            how = res.extras.pop('inverse', None)  # how the engine inverted: recorded once
            if isinstance(how, dict):
                inverse.update(how)
            if not inv_list:
                inv_list, inv_invert, inverse = invert_chain(res.fwd_transforms, where)
        fwd, inv = export_transforms(res.fwd_transforms, inv_list, inv_invert,
                                     fixed=str(fixed), moving=str(moving),
                                     out_fwd=where / 'xfm_fwd', out_inv=where / 'xfm_inv',
                                     kind=engine.transform_kind)
        if engine.transform_kind == 'deformable':
            from .inverse import inverse_consistency

            inverse['consistency'] = inverse_consistency(fwd, inv, fixed_mask)
        runs.append(EngineRun(
            method=name, transform_kind=engine.transform_kind, fwd_xfm=str(fwd),
            inv_xfm=str(inv), warped=str(res.warped), runtime_s=round(m.wall_s, 3),
            peak_mem_mb=round(m.peak_rss_mb, 1), peak_gpu_mb=m.peak_gpu_mb, device=device,
            threads=omp_nthreads, seed=seed, parameters=params_used, extras=res.extras,
            versions=versions, engine=engine.name,
            variant_params=json.loads(json.dumps(vparams, default=list)),
            files={k: str(v) for k, v in res.files.items()},
            chain=[options.init_method, name] if options.init_method else [name],
            inverse=inverse, weights=weights))
    return runs


def invert_chain(fwd: list[str], out_dir: str | Path) -> tuple[list[str], list[bool], dict]:
    """The inverse of a forward transform chain (ANTs order): the chain reversed, each
    affine flagged to be inverted, each displacement field inverted by fixed-point
    iteration on its own grid (written into ``out_dir``). Returns the inverse list, its
    ``whichtoinvert`` flags, and what was done (``source: fixed-point``, with the
    iterations and residual of each inverted field)."""
    from .inverse import invert_field_file

    out_dir = Path(out_dir)
    inv, flags, fields = [], [], []
    for i, path in reversed(list(enumerate(fwd))):
        if str(path).endswith(_LINEAR_SUFFIXES):
            inv.append(str(path))
            flags.append(True)
            continue
        out = out_dir / f'inverse_field_{i}.nii.gz'
        fields.append(invert_field_file(path, out))
        inv.append(str(out))
        flags.append(False)
    info = {'source': 'fixed-point', 'fields': fields}
    return inv, flags, info
