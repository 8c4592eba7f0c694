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
    'write_itk_affine',
    'write_itk_displacement_field',
]

#: RAS <-> LPS flip used by ITK.
LPS = np.diag([-1.0, -1.0, 1.0])
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _to_numpy(array) -> np.ndarray:
    """A float64 copy of an array-like (numpy array, nested lists, or a torch tensor on any
    device, with or without autograd history; torch is not imported here)."""
    if hasattr(array, 'detach'):
        array = array.detach().cpu().double().numpy()
    return np.array(array, dtype=np.float64)


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
    fwd_path = out_fwd.with_name(out_fwd.name + '.nii.gz')
    inv_path = out_inv.with_name(out_inv.name + '.nii.gz')
    # one displacement field already on the grid it is applied on: composing it would only
    # resample it onto itself (slow at 1 mm), so it is copied as float32
    if len(fwd) == 1 and _is_field_on(fwd[0], fixed):
        _save_field_float32(fwd[0], fwd_path, remove=False)
    else:
        tmp_f = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(moving)),
                                      list(fwd), compose=str(out_fwd) + '_tmp')
        _save_field_float32(tmp_f, fwd_path)
    # ANTs inverts only '.mat' affines on the fly: an ITK text affine to invert is written
    # inverted instead
    inv, inv_invert = _explicit_inverses(list(inv), list(inv_invert), out_inv)
    if len(inv) == 1 and not inv_invert[0] and _is_field_on(inv[0], moving):
        _save_field_float32(inv[0], inv_path, remove=False)
    else:
        tmp_i = ants.apply_transforms(ants.image_read(str(moving)), ants.image_read(str(fixed)),
                                      list(inv), whichtoinvert=list(inv_invert),
                                      compose=str(out_inv) + '_tmp')
        _save_field_float32(tmp_i, inv_path)
    return fwd_path, inv_path


def _explicit_inverses(paths: list[str], invert: list[bool], prefix: Path
                       ) -> tuple[list[str], list[bool]]:
    """``paths``/``invert`` with every ITK text affine flagged for inversion replaced by
    its inverse written next to ``prefix`` (ANTs inverts only ``.mat`` files itself)."""
    out_paths, out_flags = [], []
    for i, (path, flag) in enumerate(zip(paths, invert)):
        if flag and str(path).endswith('.txt'):
            mat = np.linalg.inv(read_itk_affine(path))
            path = str(write_itk_affine(mat, prefix.with_name(f'{prefix.name}_inv{i}.txt')))
            flag = False
        out_paths.append(str(path))
        out_flags.append(bool(flag))
    return out_paths, out_flags


def _is_field_on(path: str | Path, reference: str | Path) -> bool:
    """Whether ``path`` is an ITK displacement field (5-D NIfTI, 3 components) on the grid
    of the image ``reference``."""
    name = str(path)
    if not name.endswith(('.nii', '.nii.gz')):
        return False
    field, ref = nb.load(name), nb.load(str(reference))
    return (len(field.shape) == 5 and field.shape[3:] == (1, 3)
            and field.shape[:3] == ref.shape[:3]
            and np.allclose(field.affine, ref.affine, atol=1e-4))


def _save_field_float32(src: str, dst: Path, remove: bool = True) -> None:
    """ANTs composes fields in double precision; single precision (~1e-7 relative) halves
    the files and is what ITK's own registration writes. ``remove``: delete ``src``."""
    img = nb.load(src)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    out = nb.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.float32)
    out.to_filename(str(dst))
    if remove:
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


def write_itk_affine(matrix_ras, path: str | os.PathLike) -> Path:
    """Write a RAS point mapping as an ITK ``AffineTransform_double_3_3`` text file.

    ``matrix_ras`` is a 4x4 homogeneous matrix or its top 3x4 block (numpy or torch), acting
    on RAS mm column vectors. ANTs resamples with the mapping of the file as written:
    ``ants.apply_transforms(fixed, moving, [path])`` samples the moving image at
    ``matrix_ras @ x`` for each fixed point ``x``, so a registration's fixed -> moving map is
    written as is. The inverse of :func:`read_itk_affine`: the matrix is converted to LPS
    (``F M F`` with ``F = diag(-1, -1, 1, 1)``) and written with a zero centre, so that ITK's
    ``y = M x + t`` (in LPS) is the same mapping.
    """
    mat = _to_numpy(matrix_ras)
    if mat.shape == (3, 4):
        mat = np.vstack([mat, [0.0, 0.0, 0.0, 1.0]])
    if mat.shape != (4, 4):
        raise ValueError(f'an affine must be 3x4 or 4x4, not {mat.shape}')
    m = _FLIP @ mat @ _FLIP
    params = [*m[:3, :3].ravel(), *m[:3, 3]]
    text = ('#Insight Transform File V1.0\n'
            '#Transform 0\n'
            'Transform: AffineTransform_double_3_3\n'
            f'Parameters: {" ".join(repr(float(v)) for v in params)}\n'
            'FixedParameters: 0 0 0\n')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_itk_displacement_field(disp_ras, affine, path: str | os.PathLike) -> Path:
    """Write an (X, Y, Z, 3) RAS displacement field as an ITK/ANTs displacement-field NIfTI.

    ``disp_ras`` (numpy or torch) holds ``u(x)`` in mm at the voxel centres of the grid with
    voxel-to-RAS ``affine``, for the mapping ``x -> x + u(x)``; as for
    :func:`write_itk_affine`, ``ants.apply_transforms(fixed, moving, [path])`` with a field on
    the fixed grid samples the moving image at ``x + u(x)``. ITK reads a 5-D
    (X, Y, Z, 1, 3) vector image (intent ``vector``) whose vectors are in LPS mm (x and y
    negated); the grid geometry is the NIfTI affine as usual. Stored as float32.
    """
    data = _to_numpy(disp_ras).astype(np.float32)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f'a displacement field must be (X, Y, Z, 3), not {data.shape}')
    data[..., 0] *= -1.0
    data[..., 1] *= -1.0
    img = make_image(data[:, :, :, np.newaxis, :], _to_numpy(affine))
    img.header.set_intent('vector', (), '')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))
    return path


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
