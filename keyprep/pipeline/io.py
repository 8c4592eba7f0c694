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
    'FIELD_OF_VIEW_MM',
    'MAX_VOXELS',
    'VOXEL_SIZE_MM',
    'atomic_write_bytes',
    'atomic_write_text',
    'check_geometry',
    'check_image',
    'conform',
    'form_conflict',
    'load_image',
    'make_image',
    'publish_file',
    'save_image',
]


#: Plausible voxel size of a brain MRI, per axis (mm): outside it the header is in the wrong
#: units (metres, microns) or broken, and the label network's grid over the field of view
#: would need absurd memory (50 mm voxels: a 2.3 m grid, about 20 GB).
VOXEL_SIZE_MM = (0.1, 10.0)
#: Plausible field of view per voxel axis (mm): a head fits in 500 mm; under 20 mm there is
#: no brain to register.
FIELD_OF_VIEW_MM = (20.0, 500.0)
#: Most voxels in one image (1024^3 / 4 = 268 million: 1 GiB as float32), checked from the
#: header before the data are read.
MAX_VOXELS = 1024 ** 3 // 4


def load_image(path: str | os.PathLike, *, what: str = 'image',
               warnings: list[str] | None = None) -> nb.Nifti1Image:
    """Load a NIfTI image, read its data once and validate it.

    Raises
    ------
    MissingInputError
        The file does not exist.
    ImageError
        The file is corrupt or truncated, is 4-D with more than one volume, has NaN or
        infinite values, is empty/constant, has a singular affine, or has an implausible
        geometry (:func:`check_geometry`: voxel sizes, field of view, voxel count).

    A 4-D image with a single volume is accepted and squeezed to 3-D. The voxel count is
    checked from the header, before the data are read. When ``warnings`` is a list, what
    was resolved but deserves a word (a qform/sform conflict, :func:`form_conflict`) is
    appended to it.

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
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            extra = f' with {shape[3]} volumes' if len(shape) == 4 else ''
            raise ImageError(f'{name}: image is {len(shape)}-D{extra}; '
                             'an anatomical image must be a single 3-D volume')
        n_voxels = int(np.prod(shape, dtype=np.int64))
        if n_voxels > MAX_VOXELS:
            dims = ' x '.join(map(str, shape))
            raise ImageError(f'{name}: image has {n_voxels:,} voxels ({dims}), more than the '
                             f'{MAX_VOXELS:,} keyprep accepts; resample it to a coarser grid')
        data = np.asanyarray(img.dataobj)
    except ImageError:
        raise
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
    if warnings is not None:
        conflict = form_conflict(img, name)
        if conflict:
            warnings.append(conflict)
    out = nb.Nifti1Image(np.asarray(data), img.affine, img.header)
    out.header.set_data_shape(data.shape)
    return out


def form_conflict(img, name: str = 'image', tol_mm: float = 0.5) -> str | None:
    """A one-line note when both the qform and the sform of a NIfTI header are set and place
    the image differently (a corner of the field of view more than ``tol_mm`` apart), saying
    which one keyprep uses: the sform, as nibabel, FSL and FreeSurfer do (ITK may read the
    qform; keyprep writes both equal, so every later step agrees). ``None`` otherwise.

    >>> img = nb.Nifti1Image(np.zeros((10, 10, 10), 'f4'), np.eye(4))
    >>> img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    >>> img.set_sform(np.eye(4), code=2)
    >>> form_conflict(img, 'x.nii')  # doctest: +ELLIPSIS
    'x.nii: the qform (code 1, scanner) and sform (code 2, aligned) of the header disagree ...'
    """
    header = getattr(img, 'header', None)
    if not isinstance(header, nb.Nifti1Header):
        return None
    qcode, scode = int(header['qform_code']), int(header['sform_code'])
    if qcode <= 0 or scode <= 0:
        return None
    qform, sform = header.get_qform(), header.get_sform()
    shape = np.asarray(header.get_data_shape()[:3]) - 1
    corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1])
                        for k in (0, shape[2])], dtype=float).T
    dist = float(np.max(np.linalg.norm((qform @ corners - sform @ corners)[:3], axis=0)))
    if not np.isfinite(dist) or dist <= tol_mm:
        return None
    codes = {1: 'scanner', 2: 'aligned', 3: 'talairach', 4: 'mni', 5: 'template'}
    return (f'{name}: the qform (code {qcode}, {codes.get(qcode, "?")}) and sform (code '
            f'{scode}, {codes.get(scode, "?")}) of the header disagree (up to {dist:.1f} mm '
            'apart over the field of view); the sform is used, as nibabel, FSL and FreeSurfer '
            'do, and both are set to it in the outputs')


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
    check_geometry(data.shape, affine, name)


def check_geometry(shape, affine: np.ndarray, name: str = 'image') -> None:
    """Raise :class:`ImageError` when the voxel sizes, the field of view or the number of
    voxels are outside what a brain MRI can have (:data:`VOXEL_SIZE_MM` per axis,
    :data:`FIELD_OF_VIEW_MM` per voxel axis, :data:`MAX_VOXELS`); the message names the
    offending value.

    >>> check_geometry((46, 55, 46), np.diag([50.0, 50.0, 50.0, 1.0]), 'big.nii.gz')
    Traceback (most recent call last):
    ...
    keyprep.pipeline.errors.ImageError: big.nii.gz: voxel size 50 x 50 x 50 mm is outside ...
    >>> check_geometry((182, 218, 182), np.eye(4), 'mni.nii.gz')  # a 1 mm head: fine
    """
    shape = tuple(int(n) for n in shape[:3])
    zooms = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(0))
    lo, hi = VOXEL_SIZE_MM
    if not np.all((zooms >= lo) & (zooms <= hi)):
        raise ImageError(f'{name}: voxel size {_mm(zooms)} mm is outside the plausible range '
                         f'{lo:g}-{hi:g} mm per axis (a header in metres or microns?)')
    fov = zooms * np.asarray(shape)
    lo, hi = FIELD_OF_VIEW_MM
    if not np.all((fov >= lo) & (fov <= hi)):
        raise ImageError(f'{name}: field of view {_mm(fov)} mm ({" x ".join(map(str, shape))} '
                         f'voxels of {_mm(zooms)} mm) is outside the plausible range '
                         f'{lo:g}-{hi:g} mm per axis')
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels > MAX_VOXELS:
        raise ImageError(f'{name}: image has {n_voxels:,} voxels, more than the '
                         f'{MAX_VOXELS:,} keyprep accepts; resample it to a coarser grid')


def _mm(values) -> str:
    return ' x '.join(f'{float(v):.3g}' for v in values)


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
