"""Image input/output: validation, conforming to RAS, atomic writes.

Every image that enters keyprep goes through :func:`load_image`, which turns the
failure modes users meet in the wild (truncated downloads, 4-D files given as
anatomicals, NaNs, blank volumes, broken headers) into one clear
:class:`~keyprep.pipeline.errors.ImageError` instead of a traceback deep in a node.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from .errors import ImageError, MissingInputError

__all__ = [
    'atomic_write_bytes',
    'atomic_write_text',
    'check_image',
    'conform',
    'load_image',
    'make_image',
    'publish_file',
    'save_image',
]


def load_image(path: str | os.PathLike, *, what: str = 'image') -> nb.Nifti1Image:
    """Load a NIfTI image, read its data once and validate it.

    Raises
    ------
    MissingInputError
        The file does not exist.
    ImageError
        The file is corrupt or truncated, is 4-D with more than one volume, has NaN or
        infinite values, is empty/constant, or has a singular affine.

    A 4-D image with a single volume is accepted and squeezed to 3-D.

    >>> import numpy as np, nibabel as nb
    >>> p = tmp_path / 'x.nii.gz'
    >>> nb.Nifti1Image(np.random.rand(4, 4, 4, 2).astype('f4'), np.eye(4)).to_filename(p)
    >>> load_image(p)
    Traceback (most recent call last):
    ...
    keyprep.pipeline.errors.ImageError: x.nii.gz: image is 4-D with 2 volumes; ...
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f'{what} not found: {path}')
    name = path.name
    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise ImageError(f'{name}: cannot read the image ({_short(exc)}); '
                         'the file is corrupt or truncated') from None
    except Exception as exc:  # nibabel raises several exception types on bad headers
        raise ImageError(f'{name}: not a readable NIfTI image ({_short(exc)})') from None
    if not isinstance(img, (nb.Nifti1Image, nb.Nifti2Image)):
        img = nb.Nifti1Image(data, img.affine)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        extra = f' with {data.shape[3]} volumes' if data.ndim == 4 else ''
        raise ImageError(f'{name}: image is {data.ndim}-D{extra}; '
                         'an anatomical image must be a single 3-D volume')
    check_image(data, img.affine, name)
    out = nb.Nifti1Image(np.asarray(data), img.affine, img.header)
    out.header.set_data_shape(data.shape)
    return out


def check_image(data: np.ndarray, affine: np.ndarray, name: str = 'image') -> None:
    """Raise :class:`ImageError` when an array cannot be used as an anatomical image.

    >>> check_image(np.zeros((3, 3, 3)), np.eye(4), 'blank')
    Traceback (most recent call last):
    ...
    keyprep.pipeline.errors.ImageError: blank: image is empty (all voxels are 0.0)
    >>> check_image(np.full((3, 3, 3), np.nan), np.eye(4), 'nan')
    Traceback (most recent call last):
    ...
    keyprep.pipeline.errors.ImageError: nan: 27 of 27 voxels are NaN or infinite
    """
    if min(data.shape) < 2:
        raise ImageError(f'{name}: image has shape {data.shape}; every axis needs 2 voxels or more')
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ImageError(f'{name}: {bad} of {data.size} voxels are NaN or infinite')
    lo, hi = np.min(data), np.max(data)
    if lo == hi:
        raise ImageError(f'{name}: image is empty (all voxels are {float(lo)})')
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise ImageError(f'{name}: the header has a singular or non-finite affine')


def make_image(data: np.ndarray, affine: np.ndarray, dtype=None) -> nb.Nifti1Image:
    """A NIfTI image whose qform and sform both hold ``affine`` (units: mm), so that
    nibabel and ITK/ANTs read the same geometry.

    >>> img = make_image(np.zeros((2, 2, 2), 'u1'), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> int(img.header['qform_code']), int(img.header['sform_code']), img.get_data_dtype()
    (1, 1, dtype('uint8'))
    """
    data = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    img = nb.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header['xyzt_units'] = 10  # mm, s
    return img


def conform(img: nb.Nifti1Image, dtype: type = np.float32) -> nb.Nifti1Image:
    """Reorient to the closest RAS voxel order, keeping the exact world geometry.

    Only axis permutations and flips are applied to the voxel grid, so the affine
    (including obliquity and anisotropic voxel sizes) describes exactly the same
    positions as the input. The qform and sform are both set to the resulting affine
    so that every reader (nibabel, ITK/ANTs) sees the same geometry.

    >>> aff = np.diag([-1.0, 2.0, 3.0, 1.0])
    >>> img = nb.Nifti1Image(np.arange(24, dtype='f4').reshape(2, 3, 4), aff)
    >>> out = conform(img)
    >>> nb.aff2axcodes(out.affine)
    ('R', 'A', 'S')
    >>> bool(np.allclose(out.affine @ [1, 0, 0, 1], img.affine @ [0, 0, 0, 1]))
    True
    """
    ras = nb.as_closest_canonical(img)
    data = np.asanyarray(ras.dataobj).astype(dtype, copy=False)
    return make_image(data, ras.affine.copy())


def save_image(img: nb.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write an image atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ''.join(path.suffixes[-2:]) if path.name.endswith('.nii.gz') else path.suffix
    fd, tmp = tempfile.mkstemp(prefix='.' + path.name.split('.')[0] + '.', suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        img.to_filename(tmp)
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + path.name + '.', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as fh:
            fh.write(data)
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode('utf-8'))


def _umask_mode() -> int:
    """Permissions a normally created file gets (``0o666`` less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish_file(tmp: str, path: Path) -> None:
    """Give ``tmp`` ordinary permissions (mkstemp makes it private), then rename it."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return (msg[0] if msg else type(exc).__name__)[:160]
