"""The ANTs baselines (antspyx): rigid, affine and SyN, run as ANTs' authors run them.

By default each engine runs the matching stage list of ``antsRegistrationSyNQuick.sh`` through
ANTsPy's ``antsRegistrationSyNQuick[r|a|s]`` presets (Tustison and Avants's quick recipe:
a centre-of-mass start, then rigid, affine and, for SyN, a SyN stage, all with Mattes mutual
information; affine stages by the full multi-resolution schedule), with **no metric masks**:
on Colin27 moved by known rotations (``benchmarks/run_registration_benchmark.py``, 2 mm) the
quick affine recipe registered 0-90 degree rotations, where keyprep's earlier single-stage
schedule failed from 60 degrees, and where passing brain masks to the metric failed from 30
degrees (the masked metric samples only where the two masks overlap, which is little when
the images start far apart). Other recipes stay selectable (``preset``):

* ``synquick`` (default): ``antsRegistrationSyNQuick[r|a|s]``;
* ``syn``: ``antsRegistrationSyN[r|a|s]`` (the full script: more iterations, CC for SyN);
* ``antspy``: ANTsPy's ``Rigid``/``Affine``/``SyN`` with keyprep's earlier schedule (one
  stage, Mattes MI, shrink 6-4-2-1).

``masks=True`` passes the brain masks to the metric (``mask``/``moving_mask``). ``sloppy``
shortens the schedules for tests only (it runs the ``antspy`` recipe with few iterations).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import Engine, EngineOptions, RegistrationResult, register_engine

__all__ = ['AntsAffine', 'AntsRigid', 'AntsSyN', 'ANTS_PRESETS', 'DEFAULT_ANTS_PRESET',
           'ants_random_seed']

#: Recipes of the ANTs engines, by name: the ANTsPy ``type_of_transform`` of each engine.
ANTS_PRESETS: dict[str, dict[str, str]] = {
    'synquick': {'rigid': 'antsRegistrationSyNQuick[r]', 'affine': 'antsRegistrationSyNQuick[a]',
                 'syn': 'antsRegistrationSyNQuick[s]'},
    'syn': {'rigid': 'antsRegistrationSyN[r]', 'affine': 'antsRegistrationSyN[a]',
            'syn': 'antsRegistrationSyN[s]'},
    'antspy': {'rigid': 'Rigid', 'affine': 'Affine', 'syn': 'SyN'},
}
DEFAULT_ANTS_PRESET = 'synquick'


def ants_random_seed(seed: int) -> int:
    """antsRegistration's ``--random-seed`` for keyprep's seed.

    antsRegistration reads a seed of 0 as "seed from the clock" (its metric sampling then
    differs from run to run), so keyprep's seed ``s`` is passed as ``s + 1`` (kept in the
    positive 31-bit range): every seed, 0 included, gives a reproducible registration.
    """
    return int(seed) % (2 ** 31 - 2) + 1


class _AntsEngine(Engine):
    family = 'ants'
    citations = ('avants2008', 'avants2011')
    #: which transform of a preset (``rigid``, ``affine`` or ``syn``)
    ants_kind: ClassVar[str] = ''

    def parameters(self, options: EngineOptions) -> dict:
        given = dict(options.params)
        preset = 'antspy' if options.sloppy else given.pop('preset', DEFAULT_ANTS_PRESET)
        given.pop('preset', None)
        if preset not in ANTS_PRESETS:
            raise ValueError(f'unknown ANTs preset {preset!r} (one of {", ".join(ANTS_PRESETS)})')
        params = {'preset': preset, 'type_of_transform': ANTS_PRESETS[preset][self.ants_kind],
                  'masks': bool(given.pop('masks', False))}
        if preset == 'antspy':
            params.update({
                'aff_metric': 'mattes',
                'aff_iterations': (2100, 1200, 1200, 10),
                'aff_shrink_factors': (6, 4, 2, 1),
                'aff_smoothing_sigmas': (3, 2, 1, 0),
            })
            if self.ants_kind == 'syn':
                params.update({'syn_metric': 'mattes', 'grad_step': 0.2, 'flow_sigma': 3,
                               'total_sigma': 0, 'reg_iterations': (40, 20, 0)})
        if options.sloppy:
            params.update(aff_iterations=(200, 100, 20), aff_shrink_factors=(4, 2, 1),
                          aff_smoothing_sigmas=(2, 1, 0))
            if self.ants_kind == 'syn':
                params['reg_iterations'] = (20, 10, 0)
        params.update(given)
        return params

    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None) -> RegistrationResult:
        from ..antsutils import import_ants

        ants = import_ants(options.omp_nthreads)
        seed = ants_random_seed(options.seed)
        if hasattr(ants, 'config') and hasattr(ants.config, '_random_seed'):
            ants.config._random_seed = seed  # passed as --random-seed
        params = self.parameters(options)
        kwargs = {k: v for k, v in params.items() if k not in ('type_of_transform', 'preset', 'masks')}
        for key in ('aff_iterations', 'aff_shrink_factors', 'aff_smoothing_sigmas',
                    'reg_iterations'):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        fix = ants.image_read(str(fixed))
        mov = ants.image_read(str(moving))
        if params['masks'] and fixed_mask is not None:
            kwargs['mask'] = ants.image_read(str(fixed_mask))
        if params['masks'] and moving_mask is not None:
            kwargs['moving_mask'] = ants.image_read(str(moving_mask))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        reg = ants.registration(fix, mov, type_of_transform=params['type_of_transform'],
                                outprefix=str(out_dir / f'{self.name}_'), **kwargs)
        warped = out_dir / f'{self.name}_warped.nii.gz'
        ants.image_write(reg['warpedmovout'], str(warped))
        fwd = list(reg['fwdtransforms'])
        inv = list(reg['invtransforms'])
        # ANTsPy lists the affine of the inverse chain un-inverted; it must be inverted.
        inv_invert = [p.endswith('.mat') for p in inv]
        return RegistrationResult(fwd_transforms=fwd, inv_transforms=inv, inv_invert=inv_invert,
                                  warped=str(warped),
                                  extras={'ants_preset': params['preset'],
                                          'ants_type_of_transform': params['type_of_transform'],
                                          'metric_masks': bool(params['masks']),
                                          'ants_random_seed': seed})


@register_engine
class AntsRigid(_AntsEngine):
    name = 'antsRigid'
    ants_kind = 'rigid'
    transform_kind = 'linear'
    description = ('ANTs rigid registration (6 degrees of freedom, Mattes MI; '
                   'antsRegistrationSyNQuick.sh\'s rigid recipe by default)')
    mem_gb = 1.5


@register_engine
class AntsAffine(_AntsEngine):
    name = 'antsAffine'
    ants_kind = 'affine'
    transform_kind = 'linear'
    description = ('ANTs affine registration (rigid then affine stages, Mattes MI; '
                   'antsRegistrationSyNQuick.sh\'s affine recipe by default)')
    mem_gb = 1.5


@register_engine
class AntsSyN(_AntsEngine):
    name = 'antsSyN'
    ants_kind = 'syn'
    transform_kind = 'deformable'
    description = ('ANTs symmetric normalisation (rigid, affine then SyN stages, Mattes MI; '
                   'antsRegistrationSyNQuick.sh\'s recipe by default)')
    mem_gb = 2.5
