"""KeyMorph detector, conforming, losses and training (tiny sizes, CPU, no ../shared data)."""

from __future__ import annotations

import math
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from keyprep.pipeline.errors import MissingInputError
from keyprep.pipeline.keymorph import losses as L
from keyprep.pipeline.keymorph.network import (
    DetectorConfig, KeyMorphModel, KeypointDetector, center_of_mass, conform, read_model_card,
)
from keyprep.pipeline.keymorph.train import (
    KeyMorphTrainConfig, Trainer, export_weights, random_affine, train,
)
from keyprep.pipeline.synth.generator import SynthConfig, label_map_from_array, sample_field

torch.set_num_threads(1)

TINY = DetectorConfig(n_keypoints=8, features=(4, 8, 8), pool_after=(2,), res_mm=6.0,
                      shape=(32, 32, 32), stem='strided')  # stride 4: 8^3 heatmaps


def toy_volume(n: int = 36, seed: int = 0) -> np.ndarray:
    """A small two-hemisphere brain in generation labels (2 mm voxels), slightly different
    per ``seed`` so that two maps are two anatomies."""
    rng = np.random.default_rng(seed)
    g = np.indices((n, n, n)).astype(float) - (n - 1) / 2
    g[1] *= 0.85 + 0.1 * rng.random()
    r = np.sqrt((g ** 2).sum(0))
    vol = np.zeros((n, n, n), dtype=np.int16)
    vol[r < 0.47 * n] = 502  # skin
    left = g[0] < 0
    vol[(r < 0.4 * n) & left], vol[(r < 0.4 * n) & ~left] = 3, 42
    vol[(r < 0.28 * n) & left], vol[(r < 0.28 * n) & ~left] = 2, 41
    vent = (np.abs(g[0]) > 2) & (np.abs(g[0]) < 6) & (np.abs(g[1]) < 6) & (np.abs(g[2]) < 3)
    vol[vent & left], vol[vent & ~left] = 4, 43
    c = 4 + int(rng.integers(0, 3))
    vol[(g[0] < -c) & (g[0] > -c - 5) & (g[1] > 5) & (g[1] < 9) & (np.abs(g[2]) < 3)] = 17
    vol[(g[0] > c) & (g[0] < c + 4) & (g[1] < -4) & (g[1] > -9) & (np.abs(g[2]) < 3)] = 53
    vol[(np.abs(g[0]) < 3) & (g[2] < -8) & (g[2] > -13) & (np.abs(g[1]) < 4)] = 16
    return vol


@pytest.fixture(scope='module')
def toy_maps():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -35.0
    return [label_map_from_array(toy_volume(36 + 2 * i, i), aff, f'toy_{i}') for i in range(3)]


def tiny_cfg(**kw) -> KeyMorphTrainConfig:
    base = dict(detector=TINY, synth=SynthConfig(translation_mm=4.0, skull_strip_prob=1.0,
                                                  nonlin_std_mm=2.0, res_prob=0.0),
                pretrain_steps=2, steps=2, pretrain_ramp=2, warmup=1, checkpoint_every=1,
                val_every=0, loss_stride=2, val_rotations=(0.0, 180.0))
    base.update(kw)
    return KeyMorphTrainConfig(**base)


# ---------------------------------------------------------------------------- CoM layer
def test_center_of_mass_is_exact_on_delta_and_gaussian():
    heat = torch.zeros(1, 2, 10, 12, 14)
    heat[0, 0, 3, 5, 7] = 2.0
    centre = torch.tensor([4.3, 5.6, 6.2], dtype=torch.float64)
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (10, 12, 14)],
                                   indexing='ij'), -1)
    heat[0, 1] = torch.exp(-0.5 * ((g - centre) ** 2).sum(-1) / 1.2 ** 2).float()
    pts = center_of_mass(heat)
    assert torch.allclose(pts[0, 0], torch.tensor([3.0, 5.0, 7.0]), atol=1e-6)
    assert torch.allclose(pts[0, 1].double(), centre, atol=1e-4)
    # on a map downsampled 4x, cell c is the centre of input voxels 4c..4c+3
    pts4 = center_of_mass(heat, stride=4)
    assert torch.allclose(pts4[0, 0], torch.tensor([13.5, 21.5, 29.5]), atol=1e-5)
    # a dead (all-zero) channel sits at the grid centre, not at a corner
    dead = center_of_mass(torch.zeros(1, 1, 10, 12, 14))
    assert torch.allclose(dead[0, 0], torch.tensor([4.5, 5.5, 6.5]), atol=1e-6)


def test_center_of_mass_is_translation_equivariant():
    gen = torch.Generator().manual_seed(0)
    heat = torch.zeros(2, 5, 16, 16, 16)
    heat[..., 3:9, 4:10, 2:8] = torch.rand(2, 5, 6, 6, 6, generator=gen)
    base = center_of_mass(heat, stride=2)
    for shift in [(1, 0, 0), (0, 3, 2), (5, 4, 6)]:
        moved = torch.roll(heat, shifts=shift, dims=(2, 3, 4))
        expected = base + 2 * torch.tensor(shift, dtype=torch.float32)  # stride 2: 2 voxels a cell
        assert torch.allclose(center_of_mass(moved, stride=2), expected, atol=1e-4)


def test_detector_shapes_and_translation_equivariance():
    torch.manual_seed(0)
    net = KeypointDetector(TINY).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert out['points'].shape == (2, 8, 3) and out['heatmaps'].shape == (2, 8, 8, 8, 8)
    assert out['weights'] is None
    assert torch.allclose(out['heatmaps'].flatten(2).sum(-1), torch.ones(2, 8), atol=1e-5)
    assert bool((out['points'] >= 0).all() and (out['points'] <= 31).all())
    # convolutions, pooling and the per-image normalisation commute with a translation by a
    # multiple of the stride: away from the zero-padded borders, the maps of a shifted object
    # are the shifted maps (the CoM of such maps then shifts exactly, previous test)
    big = replace(TINY, shape=(64, 64, 64))
    net = KeypointDetector(big).eval()
    x = torch.zeros(1, 1, 64, 64, 64)
    gen = torch.Generator().manual_seed(1)
    x[..., 28:37, 27:36, 29:35] = torch.rand(9, 9, 6, generator=gen) + 0.5
    with torch.no_grad():
        base = net(x)['heatmaps'][0]
        moved = net(torch.roll(x, shifts=(4, -4, 8), dims=(2, 3, 4)))['heatmaps'][0]
    s = (1, -1, 2)  # in heatmap cells (stride 4)
    inner = [slice(3 + max(0, -d), 13 - max(0, d)) for d in s]
    shifted = [slice(sl.start + d, sl.stop + d) for sl, d in zip(inner, s)]
    assert torch.allclose(moved[:, shifted[0], shifted[1], shifted[2]],
                          base[:, inner[0], inner[1], inner[2]], rtol=2e-3, atol=1e-8)
    region = base[:, inner[0], inner[1], inner[2]]
    assert float(region.amax() / region.amin().clamp_min(1e-12)) > 2  # not a constant map


def test_weighted_detector_gives_positive_mean_one_weights():
    for mode in ('mass', 'head'):
        net = KeypointDetector(replace(TINY, weighted=mode))
        w = net(torch.rand(2, 1, 32, 32, 32))['weights']
        assert w.shape == (2, 8) and bool((w > 0).all())
        assert torch.allclose(w.mean(-1), torch.ones(2), atol=1e-5)
    assert DetectorConfig(weighted=True).weighted == 'mass'
    with pytest.raises(ValueError):
        DetectorConfig(shape=(30, 32, 32))


# ---------------------------------------------------------------------------- conform
def test_conform_places_a_known_world_point():
    # an LPS-oriented image with 1.5 mm voxels and a Gaussian blob at a known RAS point
    n = 60
    aff = np.array([[-1.5, 0, 0, 40.0], [0, -1.5, 0, 30.0], [0, 0, 1.5, -50.0], [0, 0, 0, 1]])
    ijk = np.indices((n, n, n)).reshape(3, -1).T
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    blob = np.array([-5.0, -12.0, -3.0])
    data = np.exp(-0.5 * ((world - blob) ** 2).sum(-1) / 8.0 ** 2).reshape(n, n, n) * 100
    img = nib.Nifti1Image(data.astype(np.float32), aff)
    cfg = DetectorConfig(shape=(32, 32, 32), res_mm=3.0)
    conf = conform(img, cfg)
    assert conf.tensor.shape == (1, 1, 32, 32, 32)
    assert float(conf.tensor.min()) >= 0 and float(conf.tensor.max()) <= 1
    # the grid is centred on the intensity centre of mass (the blob)
    assert np.allclose(conf.to_world([15.5, 15.5, 15.5]), blob, atol=0.5)
    vox = conf.to_voxel(blob)
    assert np.allclose(conf.to_world(vox), blob)
    # the blob's centre of intensity in the conformed tensor is where the world point maps
    t = conf.tensor[0, 0].double()
    g = np.indices((32, 32, 32)).reshape(3, -1)
    com = (g * t.numpy().reshape(-1)).sum(1) / t.sum().item()
    assert np.allclose(com, vox, atol=0.2)
    # with a mask, outside the mask is zero
    mask = nib.Nifti1Image((data > 30).astype(np.uint8), aff)
    conf_m = conform(img, cfg, mask=mask)
    far = conf_m.to_voxel(blob + np.array([30.0, 0, 0]))
    i, j, k = (int(round(v)) for v in far)
    assert float(conf_m.tensor[0, 0, i, j, k]) == 0


# ---------------------------------------------------------------------------- losses
def _gaussian_heatmap(shape, mean, cov) -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape],
                                   indexing='ij'), -1)
    d = g - torch.as_tensor(mean, dtype=torch.float64)
    prec = torch.linalg.inv(torch.as_tensor(cov, dtype=torch.float64))
    h = torch.exp(-0.5 * torch.einsum('...i,ij,...j->...', d, prec, d))
    return (h / h.sum()).float()[None, None]


def test_kl_is_zero_for_a_gaussian_and_positive_for_two_blobs():
    cov = [[4.0, 1.0, 0.0], [1.0, 2.5, 0.5], [0.0, 0.5, 3.0]]
    gauss = _gaussian_heatmap((20, 20, 20), (9.3, 10.1, 9.7), cov)
    assert float(L.kl_gaussian_loss(gauss)) < 1e-3
    two = 0.5 * (_gaussian_heatmap((20, 20, 20), (5, 10, 10), np.eye(3))
                 + _gaussian_heatmap((20, 20, 20), (15, 10, 10), np.eye(3)))
    assert float(L.kl_gaussian_loss(two)) > 0.3
    # a delta is a degenerate Gaussian
    delta = torch.zeros(1, 1, 8, 8, 8)
    delta[0, 0, 3, 4, 5] = 1
    assert float(L.kl_gaussian_loss(delta)) < 1e-6
    # gradient flows to the heatmap (stop-gradient only through the target's moments)
    h = two.clone().requires_grad_(True)
    L.kl_gaussian_loss(h).backward()
    assert h.grad is not None and float(h.grad.abs().sum()) > 0


def test_variance_loss_and_moments_of_a_known_gaussian():
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 2.5, 0.5], [0.0, 0.5, 3.0]])
    heat = _gaussian_heatmap((24, 24, 24), (11.2, 12.0, 11.6), cov)
    mu, sig = L.heatmap_moments(heat.double(), stride=1)
    assert np.allclose(mu[0, 0].numpy(), [11.2, 12.0, 11.6], atol=1e-3)
    assert np.allclose(sig[0, 0].numpy(), cov, atol=2e-3)
    # stride 2 (cells of 2 voxels): covariance in input voxels is 4x
    _, sig2 = L.heatmap_moments(heat.double(), stride=2)
    assert np.allclose(sig2[0, 0].numpy(), 4 * cov, atol=1e-2)
    # in the normalised frame of a 48^3 input grid (stride 2): scale (2 / 48)^2
    expected = np.linalg.norm(4 * cov * (2 / 48) ** 2)
    assert float(L.variance_loss(heat, 2, (48, 48, 48), 'fro')) == pytest.approx(expected, rel=1e-2)
    fro_sq = float(L.variance_loss(heat, 2, (48, 48, 48), 'fro_sq'))
    assert fro_sq == pytest.approx(expected ** 2, rel=2e-2)
    spec = np.linalg.eigvalsh(4 * cov * (2 / 48) ** 2)[-1]
    assert float(L.variance_loss(heat, 2, (48, 48, 48), 'spectral')) == pytest.approx(spec,
                                                                                     rel=1e-2)
    stats = L.heatmap_statistics(heat, stride=2, res_mm=2.0)
    assert stats['spectral_mm2'] == pytest.approx(np.linalg.eigvalsh(cov)[-1] * 16, rel=1e-2)
    assert stats['kl_sum'] < 1e-3


def test_repulsion_is_larger_for_clustered_points():
    gen = torch.Generator().manual_seed(0)
    spread = torch.rand(1, 16, 3, generator=gen) * 2 - 1
    clustered = spread * 0.02
    assert float(L.repulsion_loss(clustered)) > 5 * float(L.repulsion_loss(spread))
    same = torch.zeros(1, 4, 3)
    assert float(L.repulsion_loss(same)) == pytest.approx(math.log(2), abs=1e-4)
    assert float(L.repulsion_loss(same, form='sigmoid')) == pytest.approx(0.5, abs=1e-4)
    far = torch.tensor([[[0.0, 0, 0], [10.0, 0, 0]]])
    assert float(L.repulsion_loss(far, tau=0.1)) < 1e-30 + 1e-12
    s = L.keypoint_spread(torch.tensor([[[0.0, 0, 0], [3.0, 4.0, 0]]]))
    assert s['spread_mm'] == pytest.approx(5.0) and s['rms_mm'] == pytest.approx(2.5)


def test_similarities_on_closed_cases():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 12, 12, 12, generator=gen)
    b = torch.rand(1, 1, 12, 12, 12, generator=gen)
    oh = torch.zeros(1, 3, 4, 4, 4)
    oh[:, 1, :2], oh[:, 2, 2:] = 1, 1
    assert float(L.soft_dice_loss(oh, oh)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.soft_dice_loss(oh[:, [0, 2, 1]], oh)) == pytest.approx(1.0, abs=1e-5)
    assert float(L.mse_loss(a, a)) == 0.0
    assert float(L.lncc_loss(a, 2 * a + 1)) == pytest.approx(0.0, abs=1e-3)
    assert float(L.lncc_loss(a, b)) > 0.5
    # NMI (Parzen-smoothed, so below 2 for identical images): -1 for independent images,
    # the same for an inverted contrast as for identical images, in between for a mixture
    same = float(L.mutual_information_loss(a, a))
    assert same < -1.3
    assert float(L.mutual_information_loss(a, 1 - a)) == pytest.approx(same, abs=1e-4)
    indep = float(L.mutual_information_loss(a, b))
    assert indep == pytest.approx(-1.0, abs=0.05)
    assert same < float(L.mutual_information_loss(a, (a + 0.3 * b) / 1.3)) < indep


# ---------------------------------------------------------------------------- training
def test_pretraining_targets_follow_the_warp(toy_maps):
    cfg = tiny_cfg(detector=replace(TINY, n_keypoints=64), pretrain_svf_mm=4.0)
    tr = Trainer(toy_maps, cfg)
    step = 5
    batch = tr.pretrain_batch(step)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    canon = tr.reference.synthesize(0, gen)['image'][None, None]
    at_p0 = sample_field(canon, tr.p0.T.reshape(1, 3, -1, 1, 1)).flatten()
    at_target = sample_field(batch['image'], batch['target'][0].T.reshape(1, 3, -1, 1, 1)).flatten()
    rand = torch.rand(64, 3, generator=torch.Generator().manual_seed(3)) * 31
    at_random = sample_field(batch['image'], rand.T.reshape(1, 3, -1, 1, 1)).flatten()
    corr = np.corrcoef(at_p0.numpy(), at_target.numpy())[0, 1]
    assert corr > 0.8 and corr > np.corrcoef(at_p0.numpy(), at_random.numpy())[0, 1] + 0.3
    # rotation curriculum of the second stage: from the pretraining's range to the full one
    tr = Trainer(toy_maps[:1], tiny_cfg(pretrain_rotation_deg=60.0, rotation_ramp=10))
    assert tr.pretrain_rotation == 60.0
    assert tr.rotation(2) == pytest.approx(72.0) and tr.rotation(11) == pytest.approx(180.0)
    assert tr.rotation(500) == pytest.approx(180.0)
    mat = random_affine(torch.Generator().manual_seed(0), 180.0, 0.0, 0.0, 0.0)
    assert torch.allclose(mat[:, :3] @ mat[:, :3].T, torch.eye(3, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize('mode,sim', [('supervised', 'mse'), ('unsupervised', 'mse'),
                                      ('unsupervised', 'mi')])
def test_training_steps_change_the_weights(toy_maps, mode, sim):
    cfg = tiny_cfg(mode=mode, unsup_sim=sim, kl_weight=1.0, var_weight=0.01, rep_weight=0.001)
    tr = Trainer(toy_maps[:2], cfg)
    before = [p.detach().clone() for p in tr.model.parameters()]
    terms = tr.step(0)  # pretraining
    assert terms['aligner'] == '-' and np.isfinite(terms['loss']) and terms['err_mm'] > 0
    mid = [p.detach().clone() for p in tr.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, mid))
    kinds = []
    for step in (2, 3):  # second stage (dice, or image + consistency)
        terms = tr.step(step)
        kinds.append(terms['aligner'])
        assert np.isfinite(terms['loss']) and terms['kl'] > 0 and terms['rep'] > 0
    after = [p.detach().clone() for p in tr.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(mid, after))
    if mode == 'unsupervised' and sim == 'mse':
        assert 'consistency' in kinds


def test_checkpoint_resume_reproduces_the_run_and_exports(toy_maps, tmp_path):
    cfg = tiny_cfg(steps=3)
    maps = (toy_maps[:2], toy_maps[1:])
    quiet = lambda *a: None  # noqa: E731
    train(None, tmp_path / 'a', cfg, maps=maps, log=quiet)
    for _ in range(5):  # one step per call (the time limit is hit after each step)
        train(None, tmp_path / 'b', cfg, maps=maps, log=quiet, max_minutes=0)
    rows_a = (tmp_path / 'a' / 'train_log.tsv').read_text().splitlines()
    rows_b = (tmp_path / 'b' / 'train_log.tsv').read_text().splitlines()
    assert len(rows_a) == 6 and len(rows_b) == 6
    for ra, rb in zip(rows_a, rows_b):  # same losses, aligners and lambdas, step by step
        assert ra.split('\t')[:12] == rb.split('\t')[:12]
    assert (tmp_path / 'a' / 'pretrained.pt').exists()
    # evaluation and export of the run
    tr = Trainer(maps[0], cfg, held_out=maps[1] + [toy_maps[0]])
    res = tr.evaluate()
    assert {'dice_affine_0', 'dice_tps_180', 'dice_rigid_0', 'repeat_mm_180', 'kl_sum',
            'spectral_mm2', 'spread_mm'} <= set(res)
    assert all(0 <= res[k] <= 1 for k in res if k.startswith('dice'))
    meta = export_weights(tmp_path / 'a' / 'checkpoint.pt', tmp_path / 'km.pt',
                          card={'note': 'test'})
    assert meta['bytes'] < 200_000 and meta['step'] == 5
    card = read_model_card(tmp_path / 'km.pt')
    assert card['sha256'] == meta['sha256'] and card['note'] == 'test'
    model = KeyMorphModel.load(tmp_path / 'km.pt')
    assert model.card['training_step'] == 5 and model.cfg == TINY
    data = np.zeros((40, 40, 40), np.float32)
    data[10:30, 12:28, 10:30] = 50
    data[15:20, 15:25, 14:22] = 90
    pts, w = model.detect(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])))
    assert pts.shape == (8, 3) and w.shape == (8,) and np.all(w == 1)
    assert np.all(np.abs(pts - [39.0, 39.0, 39.0]) < 100)  # around the image's centre (mm)


def test_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / 'nope.pt'
    with pytest.raises(MissingInputError, match='nope.pt'):
        KeyMorphModel.load(missing)
    assert read_model_card(missing) == {}


def test_train_cli_parses_keymorph_and_reports_missing_maps(tmp_path):
    from keyprep.bids_app.train import build_parser, run_train
    from keyprep.pipeline.errors import EXIT_NO_INPUT, EXIT_USAGE

    opts = build_parser().parse_args(['keymorph', '--label-maps', str(tmp_path), '--output',
                                      str(tmp_path / 'run'), '--spatial-reg', '--rep-weight',
                                      '0.01', '--weighted', 'mass', '--threads', '1'])
    assert opts.model == 'keymorph' and opts.recipe == 'cpu-2.5mm' and opts.rep_weight == 0.01
    code = run_train(['keymorph', '--label-maps', str(tmp_path / 'missing'), '--output',
                      str(tmp_path / 'run')])
    assert code == EXIT_NO_INPUT
    assert run_train(['keymorph', '--label-maps', str(tmp_path), '--output', str(tmp_path),
                      '--recipe', 'nope']) == EXIT_USAGE


def test_shipped_weights(small_brains):
    """The shipped detector matches its model card's checksum, loads, and puts its keypoints
    spread out inside a real brain (its accuracy is measured by the benchmark, see the card)."""
    import hashlib
    import json

    from keyprep.pipeline.keymorph.network import KeyMorphModel, default_weights

    path = default_weights()
    card = json.loads(path.with_suffix('.json').read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card['sha256']
    assert path.stat().st_size < 5e6
    assert (path.parent / 'MODEL_CARD.md').read_text().count(card['sha256']) >= 1
    torch.set_num_threads(1)
    img = nib.load(str(small_brains['fixed']))
    pts, w = KeyMorphModel.load(path).detect(img)
    assert pts.shape == (128, 3) and np.isfinite(pts).all() and (w > 0).all()
    data = np.asarray(img.dataobj) > 0
    ijk = np.argwhere(data)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    lo, hi = world.min(0) - 10, world.max(0) + 10
    assert ((pts > lo) & (pts < hi)).all(1).mean() > 0.9
    spread = np.linalg.norm(pts[:, None] - pts[None], axis=-1).mean()
    assert spread > 30.0  # mm: not collapsed to the centre


def test_centroid_pretraining_targets_are_the_structures_centroids(toy_maps):
    """Centroid pretraining: every keypoint's target is the centroid of its structure in the
    warped sample's own labels (any training anatomy, any pose); absent structures are masked."""
    from keyprep.pipeline.keymorph.train import N_LABELS

    cfg = tiny_cfg(detector=replace(TINY, n_keypoints=40), pretrain_target='centroids',
                   pretrain_svf_mm=0.0, pretrain_rotation_deg=45.0)
    tr = Trainer(toy_maps, cfg)
    for step in (3, 7):
        batch = tr.pretrain_batch(step)
        labels, target, valid = batch['labels'], batch['target'][0], batch['valid'][0]
        assert labels.shape == batch['image'].shape[2:] and valid.shape == (40,)
        present = set(torch.unique(labels).tolist()) - {0}
        assert 0 < valid.sum() < 40  # the toy maps lack most of the 32 structures
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)
                                            for n in labels.shape], indexing='ij'))
        for k in range(40):
            struct = 1 + k % (N_LABELS - 1)
            if not valid[k]:
                assert struct not in present or (labels == struct).sum() < 8
                continue
            m = labels == struct
            cent = torch.stack([grid[i][m].mean() for i in range(3)]).float()
            # the exact centroid of the continuous warp vs the nearest-neighbour labels: < 1 voxel
            assert (cent - target[k]).norm() < 1.0, (k, cent, target[k])
        terms = tr.pretrain_step(step, batch)
        assert np.isfinite(terms['loss']) and terms['err_mm'] > 0


def test_lr_hold_then_cosine(toy_maps):
    tr = Trainer(toy_maps[:1], tiny_cfg(pretrain_steps=0, steps=101, warmup=1, lr=1e-4,
                                        lr_final=1e-5, lr_hold=0.8))
    assert tr.lr(1) == pytest.approx(1e-4) and tr.lr(80) == pytest.approx(1e-4)
    assert 1e-5 < tr.lr(90) < 1e-4 and tr.lr(101) == pytest.approx(1e-5, rel=1e-3)
