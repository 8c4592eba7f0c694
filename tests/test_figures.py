"""Tests of the reportlets in :mod:`keyprep.pipeline.figures` on small synthetic images."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline import figures

SHAPE = (40, 48, 36)
# anisotropic voxels (1.2 x 1.0 x 2.0 mm), RAS+, origin near the centre
AFFINE = np.array([
    [1.2, 0.0, 0.0, -24.0],
    [0.0, 1.0, 0.0, -30.0],
    [0.0, 0.0, 2.0, -30.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _ellipsoid(scale: float = 1.0, shift: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
    """Boolean ellipsoid in physical units (so that it looks round-ish in mm)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing='ij')
    x = (i - SHAPE[0] / 2 - shift[0]) * 1.2
    y = (j - SHAPE[1] / 2 - shift[1]) * 1.0
    z = (k - SHAPE[2] / 2 - shift[2]) * 2.0
    return (x / (20 * scale)) ** 2 + (y / (20 * scale)) ** 2 + (z / (28 * scale)) ** 2 <= 1


def _brain(shift: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
    """A T1w-like 'brain': dark 'CSF' core, 'gray matter' rim, bright 'white matter'."""
    rng = np.random.default_rng(0)
    img = np.zeros(SHAPE, dtype=np.float32)
    img[_ellipsoid(1.0, shift)] = 60
    img[_ellipsoid(0.75, shift)] = 100
    img[_ellipsoid(0.25, shift)] = 30
    img += rng.normal(0, 2, SHAPE).astype(np.float32) * (img > 0)
    return img


def _save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    nb.Nifti1Image(data, affine).to_filename(path)
    return path


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp('figures')
    brain = _brain()
    mask = _ellipsoid()
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[mask] = 1
    labels[_ellipsoid(0.75)] = 2
    labels[_ellipsoid(0.25)] = 3
    jac = np.ones(SHAPE, dtype=np.float32)
    jac[_ellipsoid(0.5, (4, 0, 0))] = 1.6
    jac[_ellipsoid(0.5, (-4, 0, 0))] = 0.6
    jac_fold = jac.copy()
    jac_fold[22, 25, 19] = -0.3  # one folding voxel inside the mask
    # the mask on a coarser grid, to check resampling onto the image grid
    coarse = AFFINE.copy()
    coarse[:3, :3] *= 2
    i, j, k = np.meshgrid(*(np.arange(n) for n in (20, 24, 18)), indexing='ij')
    world = np.stack([i, j, k, np.ones_like(i)], -1) @ coarse.T
    vox = world @ np.linalg.inv(AFFINE).T
    idx = np.clip(np.rint(vox[..., :3]).astype(int), 0, np.array(SHAPE) - 1)
    mask_coarse = mask[idx[..., 0], idx[..., 1], idx[..., 2]]
    return {
        'image': _save(brain, tmp / 'image.nii.gz'),
        'image4d': _save(brain[..., None], tmp / 'image4d.nii.gz'),
        'mask': _save(mask.astype(np.uint8), tmp / 'mask.nii.gz'),
        'mask_coarse': _save(mask_coarse.astype(np.uint8), tmp / 'mask_coarse.nii.gz', coarse),
        'labels': _save(labels, tmp / 'labels.nii.gz'),
        'before': _save(_brain(shift=(4, -5, 2)), tmp / 'before.nii.gz'),
        'jac': _save(jac, tmp / 'jac.nii.gz'),
        'jac_fold': _save(jac_fold, tmp / 'jac_fold.nii.gz'),
    }


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert('RGB'), dtype=np.int16)


def _check_png(path: Path, min_height: int = 150, max_height: int = 1600) -> np.ndarray:
    assert path.is_file()
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert path.stat().st_size < 500_000
    rgb = _rgb(path)
    height, width, _ = rgb.shape
    assert 1300 <= width <= 1500
    assert min_height <= height <= max_height
    assert rgb.var() > 0
    return rgb


def _count(rgb: np.ndarray, colour: str, tol: int = 60) -> int:
    from matplotlib.colors import to_rgb

    target = np.array([round(255 * c) for c in to_rgb(colour)])
    return int((np.abs(rgb - target).max(axis=-1) <= tol).sum())


def test_import_is_light():
    code = 'import sys, keyprep.pipeline.figures; print("matplotlib" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == 'False'


def test_select_slices_within_extent():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[5:30, 10:40, 8:20] = True
    slices = figures.select_slices(mask, 7)
    assert set(slices) == {'axial', 'coronal', 'sagittal'}
    for view, (lo, hi) in zip(('sagittal', 'coronal', 'axial'), ((5, 29), (10, 39), (8, 19))):
        assert len(slices[view]) == 7
        assert all(lo < s < hi for s in slices[view])
        assert slices[view] == sorted(slices[view])
    # a thin mask yields fewer, distinct slices
    thin = np.zeros(SHAPE, dtype=bool)
    thin[:, :, 10:12] = True
    assert figures.select_slices(thin, 7)['axial'] == [10, 11]


def test_plot_mask(data, tmp_path):
    out = figures.plot_mask(data['image'], data['mask'], tmp_path / 'sub' / 'mask.png',
                            title='brain mask')
    assert out == tmp_path / 'sub' / 'mask.png'
    rgb = _check_png(out)
    assert _count(rgb, figures.MASK_COLOR) > 50
    # a mask on another grid and a 4-D image work too
    out2 = figures.plot_mask(data['image4d'], data['mask_coarse'], tmp_path / 'mask2.png')
    assert _count(_check_png(out2), figures.MASK_COLOR) > 50


def test_plot_labels(data, tmp_path):
    lut = {1: ('Gray Matter', '#6e9bd1'), 2: ('White Matter', 'GM', '#f2e5b0'),
           3: ('Cerebrospinal Fluid', '#d1495b')}
    rgb = _check_png(figures.plot_labels(data['image'], data['labels'], tmp_path / 'lut.png',
                                         lut=lut, title='tissues'))
    # label colours blended with the gray image: bluish pixels of label 1 are present
    blue = (rgb[..., 2] - rgb[..., 0] > 30) & (rgb[..., 2] > 100)
    assert blue.sum() > 50
    rgb2 = _check_png(figures.plot_labels(data['image'], data['labels'],
                                          tmp_path / 'nolut.png'))
    assert (np.ptp(rgb2, axis=-1) > 40).sum() > 50  # coloured, not only gray


def test_plot_registration(data, tmp_path):
    out = figures.plot_registration(data['image'], data['before'], data['image'],
                                    tmp_path / 'reg.png', target_mask=data['mask'],
                                    title='before/after')
    rgb = _check_png(out)
    assert _count(rgb, figures.EDGE_COLOR) > 100
    # without a mask, the edges come from the target itself
    out2 = figures.plot_registration(data['image'], data['before'], data['image'],
                                     tmp_path / 'reg2.png')
    assert _count(_check_png(out2), figures.EDGE_COLOR) > 100


def test_registration_rows_show_same_slices(data, tmp_path):
    # identical before and after images give identical rows
    out = figures.plot_registration(data['image'], data['image'], data['image'],
                                    tmp_path / 'same.png', target_mask=data['mask'])
    rgb = _rgb(out)
    dark = rgb.max(axis=(1, 2)) < 30  # black separator lines between rows
    rows = np.flatnonzero(~dark)
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    bands = [b for b in bands if len(b) > 50]
    assert len(bands) == 2
    top, bottom = bands
    n = min(len(top), len(bottom))
    diff = np.abs(rgb[top[:n], 60:] - rgb[bottom[:n], 60:])  # skip the row labels
    assert np.mean(diff > 40) < 0.001


def test_plot_jacobian_folding(data, tmp_path):
    rgb = _check_png(figures.plot_jacobian(data['jac_fold'], tmp_path / 'fold.png',
                                           mask=data['mask'], title='J'))
    mosaic = rgb[:-90]  # the footer holds the legend patch in the folding colour
    assert _count(mosaic, figures.FOLDING_COLOR, tol=40) > 0
    # no folding: no highlight in the slices; red and blue for expansion and shrinkage
    rgb = _check_png(figures.plot_jacobian(data['jac'], tmp_path / 'nofold.png',
                                           mask=data['mask'], background=data['image']))
    mosaic = rgb[:-90]
    assert _count(mosaic, figures.FOLDING_COLOR, tol=40) == 0
    assert ((mosaic[..., 0] - mosaic[..., 2]) > 60).sum() > 50
    assert ((mosaic[..., 2] - mosaic[..., 0]) > 60).sum() > 50


def test_plot_jacobian_without_mask(data, tmp_path):
    _check_png(figures.plot_jacobian(data['jac_fold'], tmp_path / 'j.png'))


def test_plot_group(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        'participant_id': [f'sub-{i:02d}' for i in range(6)] * 3,
        'method': np.repeat(['antsSyN', 'greedy', 'affine'], 6),
        'dice_mean': rng.uniform(0.5, 0.9, 18),
        'runtime_s': rng.uniform(10, 1000, 18),
    })
    tsv = tmp_path / 'summary.tsv'
    df.to_csv(tsv, sep='\t', index=False)
    for source, metric in ((tsv, 'dice_mean'), (df, 'runtime_s')):
        out = figures.plot_group(source, tmp_path / f'{metric}.png', metric)
        rgb = _rgb(out)
        assert 400 <= rgb.shape[1] <= 1500 and rgb.var() > 0
        assert out.stat().st_size < 300_000
    with pytest.raises(ValueError, match='dice_max'):
        figures.plot_group(df, tmp_path / 'x.png', 'dice_max')
    empty = df.assign(dice_mean=np.nan)
    assert figures.plot_group(empty, tmp_path / 'empty.png', 'dice_mean').is_file()


def test_plot_structure_dice(tmp_path):
    import pandas as pd

    from keyprep.pipeline.synth.labels import OUTPUT_NAMES

    rng = np.random.default_rng(1)
    names = [(k, v) for k, v in OUTPUT_NAMES.items() if k]
    rows = [{'method': m, 'label_set': 'synthseg', 'label_index': k, 'label_name': v,
             'dice': rng.uniform(0.3, 0.9)} for m in ('antsRigid', 'antsSyN') for k, v in names]
    rows += [{'method': 'antsSyN', 'label_set': 'tissue', 'label_index': 1,
              'label_name': 'GM', 'dice': 0.7}]
    df = pd.DataFrame(rows)
    out = figures.plot_structure_dice(df, tmp_path / 'dice.png', title='Dice per structure')
    rgb = _rgb(out)
    assert rgb.shape[0] > rgb.shape[1] / 2 and rgb.var() > 0
    empty = figures.plot_structure_dice(df.assign(dice=np.nan), tmp_path / 'empty.png')
    assert empty.is_file()


def test_png_to_data_uri(data, tmp_path):
    png = figures.plot_mask(data['image'], data['mask'], tmp_path / 'm.png')
    uri = figures.png_to_data_uri(png)
    assert uri.startswith('data:image/png;base64,')
    assert base64.b64decode(uri.split(',', 1)[1]) == png.read_bytes()


def test_plot_jacobian_of_a_linear_transform_states_the_determinant(data, tmp_path):
    """J constant inside the mask (a linear transform): no mosaic of one colour, a short
    figure with the number instead."""
    const = tmp_path / 'const.nii.gz'
    _save(np.full(SHAPE, 1.07, dtype=np.float32), const)
    out = figures.plot_jacobian(const, tmp_path / 'lin.png', mask=data['mask'],
                                background=data['image'], title='antsAffine')
    rgb = _rgb(out)
    assert rgb.shape[1] == 1400 and rgb.shape[0] < 150  # one or two lines of text
    assert ((rgb[..., 0] - rgb[..., 2]) > 60).sum() == 0  # no colour map
    assert ((rgb[..., 2] - rgb[..., 0]) > 60).sum() == 0
    assert (rgb.max(axis=-1) > 150).sum() > 200  # the text
    text = figures.linear_jacobian_text(1.07)
    assert 'J = 1.0700 everywhere' in text and '7.0 % larger' in text
    assert '20.0 % smaller' in figures.linear_jacobian_text(0.8)
    assert 'volumes are kept' in figures.linear_jacobian_text(1.0)
    # a map that varies still gets the mosaic
    assert _rgb(figures.plot_jacobian(data['jac'], tmp_path / 'var.png',
                                      mask=data['mask'])).shape[0] > 300


def _keypoint_table(path: Path, points: np.ndarray, weights: np.ndarray) -> Path:
    lines = ['x\ty\tz\tweight\tindex']
    lines += [f'{x:.3f}\t{y:.3f}\t{z:.3f}\t{w:.3f}\t{i}'
              for i, ((x, y, z), w) in enumerate(zip(points, weights))]
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_plot_keypoints_numbers_corresponding_pairs(data, tmp_path):
    from matplotlib.colors import to_rgb

    rng = np.random.default_rng(3)
    # 30 keypoints inside the ellipsoid 'brain' (world mm), the moving ones shifted by 4 mm
    fixed = rng.uniform(-14, 14, size=(30, 3)) * [1.0, 1.0, 1.3]
    fixed += (AFFINE[:3, :3] @ (np.array(SHAPE) / 2) + AFFINE[:3, 3])
    weights = rng.uniform(0.5, 1.5, 30)
    kp_f = _keypoint_table(tmp_path / 'f.tsv', fixed, weights)
    kp_m = _keypoint_table(tmp_path / 'm.tsv', fixed + [4.0, 0.0, 0.0], weights)
    pairs = figures.select_pairs(fixed, weights, np.arange(30), np.arange(30), weights, 6)
    assert len(pairs) == 6 and len(set(pairs.tolist())) == 6
    assert all(weights[k] ** 2 >= np.median(weights ** 2) for k in pairs)
    out = figures.plot_keypoints(data['before'], kp_m, data['image'], kp_f,
                                 tmp_path / 'kp.png', title='keypoints', n_pairs=6)
    rgb = _check_png(out)
    half = rgb.shape[0] // 2
    for colour in figures.PAIR_COLOURS[:6]:  # each pair, in both rows (moving, target)
        for part in (rgb[:half], rgb[half:]):
            assert _count(part, colour, tol=12) > 15, colour
    for colour in figures.PAIR_COLOURS[6:]:  # only as many colours as pairs
        target = np.array([round(255 * c) for c in to_rgb(colour)])
        assert int((np.abs(rgb - target).max(axis=-1) <= 3).sum()) < 15
    # keypoints missing from the other image are never highlighted
    only = figures.select_pairs(fixed, weights, np.arange(30), np.arange(10), None, 8)
    assert set(only.tolist()) <= set(range(10)) and len(only) > 0


def test_structure_dice_and_group_follow_the_given_engine_order():
    from keyprep.pipeline.figures.plots import _ordered

    assert _ordered(['antsSyN', 'antsAffine', 'antsRigid', 'x'],
                    ['antsRigid', 'antsAffine', 'antsSyN']) == [
        'antsRigid', 'antsAffine', 'antsSyN', 'x']
    assert _ordered(['b', 'a'], None) == ['a', 'b']
