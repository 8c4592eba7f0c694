"""The label network's inference path, its self-check, and the tissue fallback.

* the tiled (sliding-window) inference: geometry, blending, air tiles;
* validation == deployment: training's ``evaluate``, ``score_volumes`` (used by
  ``benchmarks/eval_synthseg.py``) and ``LabelNetwork.predict`` give the same labels;
* the self-check catches a deliberately misaligned pose, and ``pose='auto'`` recovers from a
  header rotation of a head synthesised on SynthSeg's native 256^3 LIA 1 mm grid;
* Atropos tissue classes: deterministic, and invariant to a header-only rotation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

nib = pytest.importorskip('nibabel')


def _rotation(axis: str, deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler(axis, deg, degrees=True).as_matrix()
    return out


# ---------------------------------------------------------------- sliding window
def test_tiles_cover_and_overlap():
    from keyprep.pipeline.synth.inference import tile_starts

    for size in (40, 64, 65, 96, 104, 128, 131):
        starts = tile_starts(size, 64, 0.5)
        covered = np.zeros(max(size, 64), bool)
        for s in starts:
            covered[s:s + 64] = True
        assert covered[:size].all() and starts[0] == 0
        assert starts[-1] + 64 == max(size, 64)
        assert all(b - a <= 32 for a, b in zip(starts, starts[1:]))  # at least 50 % overlap


def test_sliding_window_blends_and_skips_air():
    """A per-voxel 'network' gives the same probabilities tiled as whole; tiles of air are not
    run and come out as background."""
    from keyprep.pipeline.synth.inference import sliding_window_probabilities

    calls = []

    def forward(x):  # two classes, a function of the voxel only: tiling must not change it
        calls.append(x.shape[0])
        p1 = x.clamp(0, 1)
        return torch.cat([1 - p1, p1], 1)

    x = torch.zeros(1, 1, 96, 80, 70)
    x[:, :, 10:40, 10:40, 10:40] = torch.rand(1, 1, 30, 30, 30, generator=torch.Generator().manual_seed(0))
    probs, info = sliding_window_probabilities(forward, x, 2, roi=(32, 32, 32), overlap=0.5)
    assert probs.shape == (1, 2, 96, 80, 70)
    expect = torch.cat([1 - x, x], 1)
    assert torch.allclose(probs, expect, atol=1e-5)
    assert info['skipped'] > 0 and info['tiles'] + info['skipped'] == 5 * 4 * 4
    assert probs[0, 0, 80:, 70:, 60:].eq(1).all()  # air: background, never a label
    empty, info0 = sliding_window_probabilities(forward, torch.zeros(1, 1, 64, 64, 64), 2,
                                                roi=(32, 32, 32))
    assert info0['tiles'] == 0 and empty[0, 0].eq(1).all()


def test_sliding_window_region_bounds_labels():
    """With a region, tiles outside it are not run and voxels outside it are background."""
    from keyprep.pipeline.synth.inference import sliding_window_probabilities

    x = torch.full((1, 1, 96, 64, 64), 0.5)
    x[0, 0, -1, -1, -1] = 0.0  # the background level: every tile has 'head' above it
    region = torch.zeros(96, 64, 64, dtype=torch.bool)
    region[10:30, 10:30, 10:30] = True
    probs, info = sliding_window_probabilities(lambda t: torch.cat([1 - t, t], 1), x, 2,
                                               roi=(32, 32, 32), region=region)
    assert torch.allclose(probs[0, 1][region], torch.tensor(0.5), atol=1e-5)
    assert probs[0, 0][~region].eq(1).all() and probs[0, 1][~region].eq(0).all()
    assert info['skipped'] > 0


def test_region_accepts_a_coarse_brain_mask_and_refuses_a_head_mask():
    """The reference mask bounds where labels may be when its volume is a brain's: a large
    brain's mask at a coarse resolution (2525 cm^3 measured on a 3 mm demo head, where the
    earlier bound of 2500 left the whole field of view to the network) is accepted; a
    whole-head mask and a speck are not."""
    from keyprep.pipeline.synth.labeller import REGION_MASK_CM3, LabelNetwork

    net = LabelNetwork.cached(None, 'cpu')
    grid = np.stack(np.meshgrid(*[np.arange(112)] * 3, indexing='ij'))
    dist_mm = np.sqrt(((grid - 55.5) ** 2).sum(0)) * net.res_mm
    x = torch.zeros(1, 1, 112, 112, 112)

    def ball(cm3):
        radius = (3 * cm3 * 1000 / (4 * np.pi)) ** (1 / 3)
        return dist_mm <= radius

    for cm3, accepted in ((2525.0, True), (1200.0, True), (4500.0, False), (200.0, False)):
        mask = ball(cm3)
        region = net._region(x, mask)
        assert (region is not None) == accepted, (cm3, REGION_MASK_CM3)
        if accepted:
            assert region.numpy()[mask].all() and not region.numpy().all()


def test_sliding_window_pads_small_volumes():
    from keyprep.pipeline.synth.inference import sliding_window_probabilities

    x = torch.rand(1, 1, 20, 30, 70, generator=torch.Generator().manual_seed(1))
    probs, info = sliding_window_probabilities(lambda t: torch.cat([1 - t, t], 1), x, 2,
                                               roi=(32, 32, 32))
    assert probs.shape == (1, 2, 20, 30, 70)
    assert torch.allclose(probs[0, 1], x[0, 0], atol=1e-5)


def test_instance_norm_network_needs_tiles():
    """The reason for tiling: with InstanceNorm, a 64^3 crop inside a larger field of view is
    labelled differently when the network sees the whole field of view."""
    from keyprep.pipeline.synth.unet import UNet3D, UNetConfig

    torch.manual_seed(0)
    net = UNet3D(UNetConfig(features=4, levels=3, max_features=16, out_channels=3)).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    big = torch.zeros(1, 1, 128, 128, 128)
    big[:, :, 32:96, 32:96, 32:96] = x
    with torch.no_grad():
        alone = net(x)
        inside = net(big)[:, :, 32:96, 32:96, 32:96]
    assert not torch.allclose(alone, inside, atol=1e-3)


# ---------------------------------------------------------------- validation == deployment
@pytest.fixture(scope='module')
def small_volumes():
    """A held-out-style volume (T2-like, with skull) synthesised from Colin27's map
    (mricron-data), at 2 mm on a 64 x 80 x 64 grid to keep the test quick: two inference
    tiles, blended, for each of the six passes the test makes (three paths, each with its
    flipped pass), where the whole head (88 x 104 x 88) took twelve."""
    from keyprep.pipeline.synth import anatomies
    from keyprep.pipeline.synth.validation import heldout_volumes

    return heldout_volumes([anatomies.colin27_label_map()], contrasts=('t2',), skull=(True,),
                           shape=(64, 80, 64), res_mm=2.0)


def test_training_validation_is_the_deployment_path(small_volumes):
    """Training's evaluate() and score_volumes() score exactly what LabelNetwork.predict, the
    labeller of a participant run, writes."""
    from keyprep.pipeline.synth.labeller import LabelNetwork
    from keyprep.pipeline.synth.train import TrainConfig, evaluate
    from keyprep.pipeline.synth.unet import UNet3D
    from keyprep.pipeline.synth.validation import score_volumes, structure_dice

    shipped = LabelNetwork(precision='fp32')
    model = UNet3D(shipped.config)
    model.load_state_dict(shipped.model.state_dict())
    model.train()  # as in the middle of training
    cfg = TrainConfig(unet=shipped.config, precision='fp32', val_pose='header')
    res = evaluate(model, small_volumes, cfg, step=1, device='cpu')
    assert model.training  # restored
    direct = score_volumes(shipped, small_volumes, pose='header')
    assert res['per_volume'] == pytest.approx(direct['per_volume'], abs=1e-9)
    for v in small_volumes:
        pred = np.asarray(shipped.predict(v.image, pose='header').labels.dataobj)
        mean = float(np.mean(list(structure_dice(pred, v.truth).values())))
        assert direct['per_volume'][v.name] == pytest.approx(mean, abs=1e-9)
    assert len(res['worst']) == min(3, len(small_volumes))


# ---------------------------------------------------------------- self-check and pose
def _lia_head(deg_axis: tuple[str, float]):
    """Colin27's map synthesised with skull on SynthSeg's native grid (256^3, 1 mm, LIA),
    T1-like, rotated in its header only; returns (image, brain mask, truth labels)."""
    from keyprep.pipeline.synth import anatomies
    from keyprep.pipeline.synth.validation import heldout_volumes

    vol = _lia_head.cache = getattr(_lia_head, 'cache', None) or heldout_volumes(
        [anatomies.colin27_label_map()], contrasts=('t1',), skull=(True,),
        shape=(256, 256, 256))[0]
    ras = nib.orientations.axcodes2ornt('RAS')
    lia = nib.orientations.axcodes2ornt('LIA')
    xfm = nib.orientations.ornt_transform(ras, lia)
    data = nib.orientations.apply_orientation(vol.image.get_fdata(dtype=np.float32), xfm)
    truth = nib.orientations.apply_orientation(vol.truth, xfm)
    aff = vol.image.affine @ nib.orientations.inv_ornt_aff(xfm, vol.image.shape)
    aff = _rotation(*deg_axis) @ aff
    assert nib.aff2axcodes(nib.Nifti1Image(data, vol.image.affine @ nib.orientations.inv_ornt_aff(
        xfm, vol.image.shape)).affine) == ('L', 'I', 'A')
    brain = ((truth > 0) & (truth != 24)).astype(np.uint8)
    return nib.Nifti1Image(data, aff), nib.Nifti1Image(brain, aff), truth


def test_intensity_fit_gates_and_counts_as_a_pose_check():
    """Labels that follow the image's boundaries pass ``intensity_fit``; the same labels
    turned by 90 degrees against the image fail it, and that failure starts the pose search."""
    from keyprep.pipeline.synth.labeller import POSE_CHECKS
    from keyprep.pipeline.synth.selfcheck import MIN_INTENSITY_FIT, check_labels

    rng = np.random.default_rng(0)
    labels = np.zeros((40, 40, 40), dtype=np.int16)
    labels[5:35, 5:35, 5:35] = 2
    labels[12:28, 8:20, 10:30] = 10
    labels[12:28, 22:34, 10:30] = 17
    means = {0: 0.0, 2: 1.0, 10: 0.6, 17: 0.3}
    image = np.vectorize(means.get)(labels).astype(np.float32) + rng.normal(0, 0.05, labels.shape)
    right = check_labels(labels, image=image)
    turned = check_labels(np.rot90(labels, axes=(1, 2)).copy(), image=image)
    assert right.values['intensity_fit'] > 0.9 and 'intensity_fit' not in right.failed
    assert turned.values['intensity_fit'] < MIN_INTENSITY_FIT and 'intensity_fit' in turned.failed
    assert 'intensity_fit' in POSE_CHECKS


@pytest.mark.slow
def test_self_check_catches_misaligned_pose():
    from keyprep.pipeline.synth.labeller import LabelNetwork

    img, mask, _ = _lia_head(('x', 0.0))
    net = LabelNetwork()
    wrong = _rotation('y', 90.0)  # template -> image: a pose 90 degrees off
    res = net.predict(img, pose=wrong, reference_mask=mask, flip_tta=False)
    assert res.check['ok'] is False and res.check['failed']
    assert [a['pose'] for a in res.check['attempts']] == ['given']


@pytest.mark.slow
@pytest.mark.parametrize('rotation', [('x', 90.0)])
def test_auto_pose_on_native_lia_grid(rotation):
    """Skull on, 256^3 LIA 1 mm, rotated in the header: the labels pass their self-check
    (after a pose search where the header is wrong) and land on the anatomy.

    One rotation (about 2 minutes on 2 cores): 90 degrees about x swaps two axes, the
    hardest case for the header's pose. The header-right path runs in every end-to-end
    test, and the pose search itself at 0, 75 and 150 degrees in
    ``tests/test_synth.py::test_pose_search_finds_any_starting_orientation``."""
    from keyprep.pipeline.synth.labeller import LabelNetwork
    from keyprep.pipeline.synth.validation import structure_dice

    img, mask, truth = _lia_head(rotation)
    res = LabelNetwork().predict(img, reference_mask=mask, flip_tta=False)
    assert res.check['ok'], res.check
    if rotation[1]:
        assert res.check['attempts'][0] == {'pose': 'header', 'ok': False,
                                            'failed': res.check['attempts'][0]['failed']}
        assert not res.check['attempts'][0]['ok']
    dice = np.mean(list(structure_dice(np.asarray(res.labels.dataobj), truth).values()))
    assert dice > 0.4, dice


# ---------------------------------------------------------------- tissue classes
@pytest.fixture(scope='module')
def colin_brain_2mm():
    from keyprep.pipeline.io import conform
    from keyprep.pipeline.targets import mricron_file

    ch2 = nib.load(str(mricron_file('ch2bet.nii.gz')))
    data = np.asarray(ch2.dataobj, dtype=np.float32)[::2, ::2, ::2]  # 2 mm, to be quick
    return nib.Nifti1Image(data, ch2.affine @ np.diag([2.0, 2.0, 2.0, 1.0])), conform


def _tissue(img, conform):
    from keyprep.pipeline.anatomy import tissue_segmentation

    c = conform(img)
    data = np.asarray(c.dataobj, dtype=np.float32)
    return tissue_segmentation(data, c.affine, data > 0)


def test_tissue_segmentation_is_deterministic(colin_brain_2mm, tmp_path, monkeypatch):
    import tempfile

    # the system temp folder of this test: ants.atropos would leave prob%02d images there
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    img, conform = colin_brain_2mm
    a, b = _tissue(img, conform), _tissue(img, conform)
    assert np.array_equal(a, b)
    assert all((a == k).sum() > 1000 for k in (1, 2, 3))
    assert sorted(p.name for p in scratch.iterdir()) == []  # nothing left behind
    assert tempfile.gettempdir() == str(scratch)  # and the default restored


@pytest.mark.parametrize('rotation', [('x', 90.0), ('z', 180.0)])
def test_tissue_classes_invariant_to_header_rotation(colin_brain_2mm, rotation):
    img, conform = colin_brain_2mm
    ref = _tissue(img, conform)
    rot = nib.Nifti1Image(np.asarray(img.dataobj), _rotation(*rotation) @ img.affine)
    seg = _tissue(rot, conform)
    for k in (1, 2, 3):
        v0, v1 = int((ref == k).sum()), int((seg == k).sum())
        assert abs(v1 - v0) <= 0.02 * v0, (k, v0, v1)


def test_brain_mask_from_labels_excludes_extracerebral_csf():
    """The mask keeps the brain and the sulcal CSF between gyri, not the CSF shell around it."""
    from keyprep.pipeline.synth.labeller import brain_mask_from_labels

    shape = (40, 40, 40)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    r = np.sqrt((xx - 20.0) ** 2 + (yy - 20.0) ** 2 + (zz - 20.0) ** 2)
    labels = np.zeros(shape, np.int16)
    labels[r < 15] = 24  # CSF shell around the brain
    labels[r < 12] = 3  # cortex
    labels[r < 6] = 4  # ventricle inside
    labels[(r < 12) & (np.abs(xx - 20) < 1) & (yy > 20)] = 24  # a 1-voxel-wide sulcus
    labels[(r < 5) & (xx == 20)] = 0  # a hole inside the brain
    labels[2:4, 2:4, 2:4] = 2  # a detached speck
    mask = brain_mask_from_labels(labels, (1.0, 1.0, 1.0), closing_mm=2.0)
    assert mask.dtype == bool and mask.shape == shape
    assert not mask[r >= 13].any()  # the CSF shell (and the speck) are out
    assert mask[r < 11].all()  # the sulcus is closed, the hole is filled
    # without closing the sulcus stays open
    open_mask = brain_mask_from_labels(labels, (1.0, 1.0, 1.0), closing_mm=0.0)
    assert not open_mask[(r < 11) & (np.abs(xx - 20) < 1) & (yy > 24)].any()
    # anisotropic voxels: the ball is in mm (2 mm voxels along x -> radius 1 voxel)
    aniso = brain_mask_from_labels(labels[::2], (2.0, 1.0, 1.0))
    assert aniso.shape == labels[::2].shape and not aniso[r[::2] >= 13].any()
    assert not brain_mask_from_labels(np.full(shape, 24, np.int16)).any()


def test_pose_candidates_take_each_search_best_first():
    """After the header's pose: the mask search's best candidate, the intensity search's
    best, then their alternatives in turn (the demo's 58-degree head needed the intensity
    search's first candidate, which the mask search's alternatives had pushed past the
    limit of labellings)."""
    from keyprep.pipeline.io import conform
    from keyprep.pipeline.synth.labeller import MAX_POSE_ATTEMPTS, LabelNetwork
    from keyprep.pipeline.targets import mricron_file

    ch2 = nib.load(str(mricron_file('ch2bet.nii.gz')))
    data = np.asarray(ch2.dataobj, dtype=np.float32)[::3, ::3, ::3]
    img = conform(nib.Nifti1Image(data, _rotation('x', 120.0) @ ch2.affine
                                  @ np.diag([3.0, 3.0, 3.0, 1.0])))
    mask = nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine)
    info, timings = {}, {'pose_s': 0.0}
    names = [n for n, _ in LabelNetwork._pose_candidates(img, mask, info, timings)]
    assert names[:2] == ['mask-search', 'intensity-search'], names
    rest = names[2:]
    alts = {kind: sorted((n for n in rest if n.startswith(kind + '-')),
                         key=lambda n: int(n.rsplit('-', 1)[1]))
            for kind in ('mask-search', 'intensity-search')}
    assert sorted(rest) == sorted(alts['mask-search'] + alts['intensity-search'])
    expected = [n for pair in itertools.zip_longest(alts['mask-search'],
                                                    alts['intensity-search'])
                for n in pair if n is not None]
    assert rest == expected and rest, names  # in turn, each search's second best first
    assert set(info) >= {'mask_search', 'intensity_search'}
    assert MAX_POSE_ATTEMPTS >= 3  # the header, then at least each search's best
