"""What the dense learned engines (CARL, DIO) share: start from another engine's affine,
register two arrays on the fixed grid, turn voxel displacements into ITK fields.

Flow of one run: the moving image is resampled onto the fixed (target) grid through the
starting affine (:meth:`Engine.prealign`; by default ``keymorphAffine``: CARL is equivariant
to translations, not rotations, and DIO's solver starts from the identity); both arrays are
brain-masked with their masks (the moving mask carried by the same affine); the method's
``register_arrays`` returns voxel displacements on that grid; they become RAS displacement
fields on the fixed grid (:func:`field_from_voxels`), the starting affine is appended to the
chain (:meth:`Engine.with_init`), and the moving image is warped by ANTs with the resulting
chain, so the engine's output is exactly what its exported transform gives.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np

from .base import Engine, EngineOptions, RegistrationResult

__all__ = ['ArrayEngine', 'field_from_voxels']


def field_from_voxels(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(3, X, Y, Z)`` displacements in voxels of a grid -> ``(X, Y, Z, 3)`` RAS mm
    (the linear part of the grid's voxel-to-RAS ``affine`` applied to each vector)."""
    disp = np.asarray(disp_vox, dtype=np.float64)
    return np.einsum('ab,bxyz->xyza', np.asarray(affine, dtype=float)[:3, :3], disp)


class ArrayEngine(Engine):
    """Base of engines that register two arrays on the fixed grid after a starting affine."""

    transform_kind = 'deformable'
    uses_torch = True
    default_init = 'keymorphAffine'

    def arrays(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
               fixed_mask: Path | None, moving_mask: Path | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fixed and prealigned moving arrays on the fixed grid (masked when masks are
        given), the grid's affine and its voxel sizes."""
        from ..transforms import apply_transforms, identity_transform

        out_dir = Path(out_dir)
        pre = self.prealign(fixed, moving, out_dir, options)
        fimg = nb.load(str(fixed))
        f = np.asanyarray(fimg.dataobj, dtype=np.float32).reshape(fimg.shape[:3])
        m = np.asanyarray(nb.load(str(pre)).dataobj, dtype=np.float32).reshape(fimg.shape[:3])
        if fixed_mask is not None:
            f = f * (np.asanyarray(nb.load(str(fixed_mask)).dataobj).reshape(f.shape) > 0)
        if moving_mask is not None:
            xfm = options.init_transform or identity_transform(out_dir / 'identity.txt')
            mm = apply_transforms(moving_mask, fixed, [xfm], out_dir / 'moving_mask_pre.nii.gz',
                                  interpolation='nearestNeighbor')
            m = m * (np.asanyarray(nb.load(str(mm)).dataobj).reshape(f.shape) > 0)
        return f, m, fimg.affine, np.asarray(fimg.header.get_zooms()[:3], dtype=float)

    def prompt_labels(self, fixed: Path, out_dir: Path, options: EngineOptions, weight: float
                      ) -> tuple[tuple | None, dict]:
        """The label maps of both images on the fixed grid (the moving one through the
        starting affine, nearest neighbour) for label prompting (DIO's solver, CARL's
        instance optimisation), and what the sidecar says of it; ``None`` when prompting is
        off or a map is missing."""
        from ..transforms import apply_transforms, identity_transform

        given = options.labels or {}
        if weight <= 0:
            return None, {'weight': 0.0, 'used': False, 'why': 'label_weight is 0'}
        missing = [k for k in ('fixed', 'moving') if not given.get(k)]
        if missing:
            return None, {'weight': weight, 'used': False,
                          'why': 'no label map of the ' + ' and '.join(missing) + ' image'}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ident = identity_transform(out_dir / 'identity.txt')
        maps = []
        for key, xfm in (('fixed', ident), ('moving', options.init_transform or ident)):
            path = apply_transforms(given[key], fixed, [xfm], out_dir / f'prompt_{key}.nii.gz',
                                    interpolation='nearestNeighbor')
            img = nb.load(str(path))
            maps.append(np.rint(np.asanyarray(img.dataobj)).astype(np.int32).reshape(
                img.shape[:3]))
        return (maps[0], maps[1]), {'weight': weight, 'used': True}

    def transfer_contrast(self, f: np.ndarray, m: np.ndarray, fixed: Path, out_dir: Path,
                          options: EngineOptions, setting: str, labels: tuple | None = None
                          ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Label-guided contrast transfer of the arrays of :meth:`arrays`
        (:func:`keyprep.pipeline.contrast.label_contrast_transfer`) for a ``contrast_transfer``
        ``setting``: the (possibly re-rendered) fixed and moving arrays and what the sidecar
        says of it. ``labels`` are both maps on the fixed grid when the caller has them already
        (:meth:`prompt_labels`); otherwise they are made here when the setting needs them."""
        import time

        from ..contrast import apply_contrast_transfer, resolve_contrast_transfer

        if labels is None and str(setting).strip().lower() != 'off':
            labels, _ = self.prompt_labels(fixed, out_dir, options, 1.0)
        mode, why = resolve_contrast_transfer(setting, options.contrasts, labels is not None)
        info = {'setting': setting, 'mode': mode, 'why': why}
        if mode == 'off':
            return f, m, info
        t0 = time.time()
        f, m = apply_contrast_transfer(f, m, labels[0], labels[1], mode)
        info['seconds'] = round(time.time() - t0, 3)
        return f, m, info

    def result(self, fixed: Path, moving: Path, out_dir: Path, options: EngineOptions,
               affine: np.ndarray, name: str, disp_fwd: np.ndarray,
               disp_inv: np.ndarray | None, extras: dict) -> RegistrationResult:
        """Write a variant's fields (the inverse when the method gives one), append the
        starting affine and warp the moving image with the whole chain.

        The fields are intermediate files of the work folder, read back at once by the
        export (:func:`~keyprep.pipeline.transforms.export_transforms`, which writes the
        compressed derivatives): they are written uncompressed (gzip took 1.4 s per 1 mm
        field, and a 1 mm field of float32 vectors compresses only to about 70 %)."""
        from ..transforms import apply_transforms, write_itk_displacement_field

        out_dir = Path(out_dir)
        fwd = write_itk_displacement_field(field_from_voxels(disp_fwd, affine), affine,
                                           out_dir / f'{name}_fwd_field.nii')
        inv, flags = [], []
        if disp_inv is not None:
            inv = [str(write_itk_displacement_field(field_from_voxels(disp_inv, affine), affine,
                                                    out_dir / f'{name}_inv_field.nii'))]
            flags = [False]
        res = self.with_init(RegistrationResult([str(fwd)], inv, flags, '', extras=extras),
                             options)
        warped = apply_transforms(moving, fixed, res.fwd_transforms,
                                  out_dir / f'{name}_warped.nii.gz')
        res.warped = str(warped)
        return res
