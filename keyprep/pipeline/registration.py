"""Running an engine the same way for all engines: seeds, threads, timing, peak memory,
and the export of one ITK transform file per direction."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engines import EngineOptions, get_engine
from .resources import measure, resolve_device, seed_everything
from .transforms import export_transforms

__all__ = ['EngineRun', 'run_engine', 'software_versions']


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
    """Everything known about one engine run; written as the engine's JSON record."""

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
               sloppy: bool = False, params: dict | None = None) -> EngineRun:
    """Register ``moving`` to ``fixed`` with engine ``method`` and export its transforms.

    The measured wall time and peak memory cover the engine's own registration (not the
    export of transforms, which is the same for all engines).
    """
    engine = get_engine(method)
    device = resolve_device(device) if engine.uses_torch else 'cpu'
    options = EngineOptions(omp_nthreads=omp_nthreads, device=device, seed=seed, sloppy=sloppy,
                            params=dict(params or {}))
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
    fwd, inv = export_transforms(result.fwd_transforms, result.inv_transforms, result.inv_invert,
                                 fixed=str(fixed), moving=str(moving),
                                 out_fwd=out_dir / 'xfm_fwd', out_inv=out_dir / 'xfm_inv',
                                 kind=engine.transform_kind)
    params_used = engine.parameters(options)
    return EngineRun(method=engine.name, transform_kind=engine.transform_kind, fwd_xfm=str(fwd),
                     inv_xfm=str(inv), warped=str(result.warped), runtime_s=round(m.wall_s, 3),
                     peak_mem_mb=round(m.peak_rss_mb, 1), peak_gpu_mb=m.peak_gpu_mb,
                     device=device, threads=omp_nthreads, seed=seed,
                     parameters=json.loads(json.dumps(params_used, default=list)),
                     extras=result.extras, versions=software_versions())
