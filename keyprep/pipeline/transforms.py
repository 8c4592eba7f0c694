"""Transforms in ITK/ANTs conventions: export, application, Jacobian determinants.

Conventions (the same as ANTs and sMRIPrep):

* A transform ``from-A_to-B`` maps points of B's space to points of A's space, so that
  ``ants.apply_transforms(fixed=B, moving=A, transformlist=[xfm])`` resamples an image of
  A onto B's grid.
* A linear transform is an ITK text file (``AffineTransform_double_3_3``, LPS physical
  space). A deformable transform is one ITK displacement field (``.nii.gz``, vectors in
  LPS mm, NIfTI intent ``vector``) on the grid of the space it is applied in: the
  engine's whole chain (affine and warps) composed into it.
* The Jacobian determinant is that of the point mapping ``x -> x + u(x)`` of the
  forward (``from-T1w_to-<target>``) transform, on the target grid: values above 1 mean
  that a target region corresponds to a larger region of the subject.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nb
import numpy as np

from .antsutils import import_ants
from .io import make_image

__all__ = [
    'LPS',
    'apply_transforms',
    'export_transforms',
    'identity_transform',
    'jacobian_map',
    'read_displacement_field',
    'read_itk_affine',
]

#: RAS <-> LPS flip used by ITK.
LPS = np.diag([-1.0, -1.0, 1.0])


def export_transforms(fwd: list[str], inv: list[str], inv_invert: list[bool], *, fixed: str,
                      moving: str, out_fwd: str | Path, out_inv: str | Path,
                      kind: str) -> tuple[Path, Path]:
    """Write one file per direction from an engine's transform lists.

    ``out_fwd``/``out_inv`` are paths without extension; the extension chosen
    (``.txt`` for linear, ``.nii.gz`` for deformable) is appended and the full paths
    are returned.
    """
    ants = import_ants()
    out_fwd, out_inv = Path(out_fwd), Path(out_inv)
    if kind == 'linear':
        if len(fwd) != 1 or len(inv) != 1:
            raise ValueError('a linear engine must return exactly one transform per direction')
        tx = ants.read_transform(fwd[0])
        fwd_path = out_fwd.with_name(out_fwd.name + '.txt')
        ants.write_transform(tx, str(fwd_path))
        itx = ants.read_transform(inv[0])
        if inv_invert[0]:
            itx = itx.invert()
        inv_path = out_inv.with_name(out_inv.name + '.txt')
        ants.write_transform(itx, str(inv_path))
        return fwd_path, inv_path
    fix = ants.image_read(str(fixed))
    mov = ants.image_read(str(moving))
    fwd_path = out_fwd.with_name(out_fwd.name + '.nii.gz')
    inv_path = out_inv.with_name(out_inv.name + '.nii.gz')
    tmp_f = ants.apply_transforms(fix, mov, list(fwd), compose=str(out_fwd) + '_tmp')
    _save_field_float32(tmp_f, fwd_path)
    tmp_i = ants.apply_transforms(mov, fix, list(inv), whichtoinvert=list(inv_invert),
                                  compose=str(out_inv) + '_tmp')
    _save_field_float32(tmp_i, inv_path)
    return fwd_path, inv_path


def _save_field_float32(src: str, dst: Path) -> None:
    """ANTs composes fields in double precision; single precision (~1e-7 relative) halves
    the files and is what ITK's own registration writes."""
    img = nb.load(src)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    out = nb.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.float32)
    out.to_filename(str(dst))
    os.unlink(src)


def apply_transforms(moving: str | Path, reference: str | Path, transforms: list[str | Path],
                     out_file: str | Path, *, interpolation: str = 'linear',
                     invert: list[bool] | None = None, default: float = 0.0) -> Path:
    """Resample ``moving`` onto ``reference`` with ITK transform files (ANTs order).

    ``interpolation`` is an ANTs interpolator: ``linear``, ``nearestNeighbor``,
    ``genericLabel`` (for label maps), ``bSpline``, ``lanczosWindowedSinc``...
    """
    ants = import_ants()
    ref = ants.image_read(str(reference))
    mov = ants.image_read(str(moving))
    out = ants.apply_transforms(ref, mov, [str(t) for t in transforms], interpolator=interpolation,
                                whichtoinvert=invert, defaultvalue=default)
    if interpolation in ('genericLabel', 'nearestNeighbor'):
        out = out.clone('unsigned int') if out.pixeltype != 'unsigned int' else out
    out_file = Path(out_file)
    ants.image_write(out, str(out_file))
    return out_file


def identity_transform(path: str | Path) -> Path:
    """Write an ITK identity affine (resampling in world coordinates)."""
    ants = import_ants()
    tx = ants.create_ants_transform(transform_type='AffineTransform', dimension=3)
    ants.write_transform(tx, str(path))
    return Path(path)


def read_itk_affine(path: str | Path) -> np.ndarray:
    """The 4x4 RAS->RAS point mapping of an ITK affine transform file (``.txt``/``.mat``).

    ITK stores ``y = M (x - c) + c + t`` in LPS; this returns the equivalent matrix acting
    on RAS homogeneous coordinates.
    """
    ants = import_ants()
    tx = ants.read_transform(str(path))
    p = np.asarray(tx.parameters, dtype=float)
    c = np.asarray(tx.fixed_parameters, dtype=float)
    m = p[:9].reshape(3, 3)
    t = p[9:12]
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def read_displacement_field(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK displacement field as ``(u_ras, affine)``: an (X, Y, Z, 3) array of RAS
    displacements in mm, and the voxel-to-RAS affine of its grid."""
    img = nb.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float64)
    data = data.reshape(img.shape[:3] + (3,))
    return data @ LPS.T, img.affine


def jacobian_map(xfm: str | Path, reference: str | Path, kind: str) -> nb.Nifti1Image:
    """Jacobian-determinant image of a forward transform on the reference (target) grid.

    Linear transforms have the constant determinant of their matrix; displacement fields
    go through ANTs' ``CreateJacobianDeterminantImage``.
    """
    ref = nb.load(str(reference))
    if kind == 'linear':
        det = float(np.linalg.det(read_itk_affine(xfm)[:3, :3]))
        data = np.full(ref.shape[:3], det, dtype=np.float32)
    else:
        ants = import_ants()
        data = ants.create_jacobian_determinant_image(
            ants.image_read(str(reference)), str(xfm), do_log=False, geom=False).numpy()
        data = data.astype(np.float32)
    return make_image(data, ref.affine)
