"""The ANTs baselines (antspyx): rigid, affine and SyN.

Mattes mutual information for every stage, as ANTsPy's ``Rigid``/``Affine``/``SyN``
presets (Avants et al. 2008, 2011). ``sloppy`` shortens the schedules for tests only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .base import Engine, EngineOptions, RegistrationResult, register_engine

__all__ = ['AntsAffine', 'AntsRigid', 'AntsSyN']


class _AntsEngine(Engine):
    family = 'ants'
    citations = ('avants2008', 'avants2011')
    #: ANTsPy ``type_of_transform``.
    ants_type: ClassVar[str] = ''

    def parameters(self, options: EngineOptions) -> dict:
        params = {
            'type_of_transform': self.ants_type,
            'aff_metric': 'mattes',
            'aff_iterations': (2100, 1200, 1200, 10),
            'aff_shrink_factors': (6, 4, 2, 1),
            'aff_smoothing_sigmas': (3, 2, 1, 0),
            'initial_transform': 'center of mass',
        }
        if options.sloppy:
            params.update(aff_iterations=(200, 100, 20), aff_shrink_factors=(4, 2, 1),
                          aff_smoothing_sigmas=(2, 1, 0))
        params.update(options.params)
        return params

    def run(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
            fixed_mask: Path | None = None, moving_mask: Path | None = None) -> RegistrationResult:
        from ..antsutils import import_ants

        ants = import_ants(options.omp_nthreads)
        if hasattr(ants, 'config') and hasattr(ants.config, '_random_seed'):
            ants.config._random_seed = int(options.seed)  # passed as --random-seed
        params = self.parameters(options)
        kwargs = {k: v for k, v in params.items()
                  if k not in ('type_of_transform', 'initial_transform')}
        for key in ('aff_iterations', 'aff_shrink_factors', 'aff_smoothing_sigmas',
                    'reg_iterations'):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        fix = ants.image_read(str(fixed))
        mov = ants.image_read(str(moving))
        if fixed_mask is not None:
            kwargs['mask'] = ants.image_read(str(fixed_mask))
        if moving_mask is not None:
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
                                  warped=str(warped))


@register_engine
class AntsRigid(_AntsEngine):
    name = 'antsRigid'
    ants_type = 'Rigid'
    transform_kind = 'linear'
    description = 'ANTs rigid registration (6 degrees of freedom, Mattes MI)'
    mem_gb = 1.5


@register_engine
class AntsAffine(_AntsEngine):
    name = 'antsAffine'
    ants_type = 'Affine'
    transform_kind = 'linear'
    description = 'ANTs affine registration (12 degrees of freedom, Mattes MI)'
    mem_gb = 1.5


@register_engine
class AntsSyN(_AntsEngine):
    name = 'antsSyN'
    ants_type = 'SyN'
    transform_kind = 'deformable'
    description = ('ANTs symmetric normalisation (affine then SyN, Mattes MI, '
                   'gradient step 0.2, update/total field sigma 3/0)')
    mem_gb = 2.5

    def parameters(self, options: EngineOptions) -> dict:
        params = super().parameters(options)
        syn = {'syn_metric': 'mattes', 'grad_step': 0.2, 'flow_sigma': 3, 'total_sigma': 0,
               'reg_iterations': (20, 10, 0) if options.sloppy else (40, 20, 0)}
        syn.update({k: v for k, v in params.items() if k in syn})
        params.update(syn)
        return params
