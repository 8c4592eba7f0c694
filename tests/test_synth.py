"""The synthesis engine, the label tables, the label network's training and inference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from keyprep.pipeline.errors import MissingInputError
from keyprep.pipeline.synth import labels as L
from keyprep.pipeline.synth.generator import (
    LabelMap, SynthConfig, Synthesizer, gaussian_blur, identity_grid, integrate_svf, load_label_map,
    sample_field,
)

SYNTHSEG_MAPS = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'synthseg' / 'training_label_maps'

QUIET = SynthConfig(shape=(32, 32, 32), res_mm=2.0, rotation_deg=0, scaling=0, shear=0,
                    translation_mm=0, flip_prob=0, nonlin_std_mm=0, bias_std=0, gamma_std=0,
                    res_prob=0, noise_std=0, skull_strip_prob=0)


def toy_label_volume(n: int = 40) -> np.ndarray:
    """A small two-hemisphere 'brain' in generation labels (RAS, 2 mm, x = first axis)."""
    g = np.indices((n, n, n)).astype(float) - (n - 1) / 2
    r = np.sqrt((g ** 2).sum(0))
    vol = np.zeros((n, n, n), dtype=np.int16)
    vol[r < 0.48 * n] = 502  # 'skin'
    left = g[0] < 0
    brain = r < 0.4 * n
    vol[brain & left] = 3
    vol[brain & ~left] = 42
    wm = r < 0.3 * n
    vol[wm & left] = 2
    vol[wm & ~left] = 41
    vent = (np.abs(g[0]) > 2) & (np.abs(g[0]) < 6) & (np.abs(g[1]) < 6) & (np.abs(g[2]) < 3)
    vol[vent & left] = 4
    vol[vent & ~left] = 43
    vol[(np.abs(g[0]) <= 1.5) & (np.abs(g[1]) < 4) & (np.abs(g[2]) < 4)] = 14
    # an asymmetric structure, to see flips
    vol[(g[0] < -4) & (g[0] > -9) & (g[1] > 5) & (g[1] < 9) & (np.abs(g[2]) < 3)] = 17
    return vol


@pytest.fixture(scope='module')
def toy_map(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('maps')
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -39.0
    for i in range(2):
        vol = toy_label_volume(40 + 4 * i)
        nib.save(nib.Nifti1Image(vol, aff), folder / f'toy_{i:02d}.nii.gz')
    return folder


def _maps(folder: Path) -> list[LabelMap]:
    return [load_label_map(f) for f in sorted(folder.glob('*.nii.gz'))]


# ---------------------------------------------------------------- label tables
def test_label_tables_are_complete_and_consistent():
    assert len(L.OUTPUT_LABELS) == 33 and L.OUTPUT_LABELS[0] == 0 and 24 in L.OUTPUT_LABELS
    assert set(L.GENERATION_TO_OUTPUT) == set(L.GENERATION_LABELS)
    assert set(L.GENERATION_TO_OUTPUT.values()) <= set(L.OUTPUT_LABELS)
    # every output structure is produced by some generation label
    assert set(L.GENERATION_TO_OUTPUT.values()) == set(L.OUTPUT_LABELS)
    for left, right in L.LR_PAIRS.items():
        if left in L.OUTPUT_NAMES:
            assert L.OUTPUT_NAMES[left].startswith('Left-') and L.OUTPUT_NAMES[right].startswith('Right-')
            assert L.OUTPUT_NAMES[left][5:] == L.OUTPUT_NAMES[right][6:]
        # a pair maps to a pair
        assert L.LR_PAIRS.get(L.GENERATION_TO_OUTPUT[left], 0) == L.GENERATION_TO_OUTPUT[right] \
            or L.GENERATION_TO_OUTPUT[left] == L.GENERATION_TO_OUTPUT[right] == 0
    flip = L.flip_lut(L.GENERATION_LABELS)
    assert (flip[flip] == np.arange(len(flip))).all()
    assert sorted(flip.tolist()) == list(range(len(flip)))
    rows = L.lut_tsv().strip().split('\n')
    assert rows[0].split('\t') == ['index', 'name', 'abbreviation', 'color'] and len(rows) == 33
    cls = L.generation_classes()
    pos = {lab: i for i, lab in enumerate(L.GENERATION_LABELS)}
    assert cls[pos[17]] == cls[pos[53]] and cls[pos[17]] != cls[pos[18]]
    assert L.relabel(np.array([136, 2, 0]), L.GENERATION_TO_OUTPUT).tolist() == [4, 2, 0]
    with pytest.raises(ValueError, match='without a mapping'):
        L.relabel(np.array([999]), L.GENERATION_TO_OUTPUT)


# ---------------------------------------------------------------- synthesis steps
def test_load_label_map_reorients_to_ras_and_crops(tmp_path):
    vol = toy_label_volume(30)
    aff = np.array([[-2.0, 0, 0, 30], [0, 0, 2, -30], [0, -2, 0, 30], [0, 0, 0, 1]])  # LIA-like
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / 'lia.nii.gz')
    m = load_label_map(tmp_path / 'lia.nii.gz')
    assert nib.aff2axcodes(m.affine) == ('R', 'A', 'S')
    assert m.index.dtype == np.uint8 and m.index.shape[0] <= 30
    # the same world point carries the same label
    src_vox = np.array([10, 12, 14])
    world = aff @ np.r_[src_vox, 1]
    ras_vox = np.rint(np.linalg.inv(m.affine) @ world)[:3].astype(int)
    assert m.labels[m.index[tuple(ras_vox)]] == vol[tuple(src_vox)]
    with pytest.raises(ValueError, match='not generation labels'):
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), 999, np.int16), aff), tmp_path / 'bad.nii.gz')
        load_label_map(tmp_path / 'bad.nii.gz')


def test_gmm_intensities_follow_the_drawn_gaussians(toy_map):
    synth = Synthesizer(_maps(toy_map)[:1], QUIET)
    s = synth.synthesize(0, torch.Generator().manual_seed(3))
    img, gen = s['image'].numpy(), s['generation'].numpy()
    means, stds = (t.numpy() for t in synth.last_intensities)
    # labels far from the clipping bounds (0 and 300) keep their Gaussian shape
    present = [g for g in np.unique(gen) if (gen == g).sum() > 200
               and means[g] > 3 * stds[g] and means[g] + 3 * stds[g] < 300]
    drawn_m = np.array([means[g] for g in present])
    obs_m = np.array([img[gen == g].mean() for g in present])
    a, b = np.polyfit(drawn_m, obs_m, 1)  # min-max normalisation is one affine map
    assert np.corrcoef(drawn_m, obs_m)[0, 1] > 0.999
    for g, m_obs in zip(present, obs_m):
        assert img[gen == g].std() == pytest.approx(abs(a) * stds[g], rel=0.12, abs=0.01)
    # left/right homologues share a Gaussian
    pos = {lab: i for i, lab in enumerate(L.GENERATION_LABELS)}
    assert means[pos[2]] == means[pos[41]] and stds[pos[3]] == stds[pos[42]]


def test_fixed_contrasts_order_tissues(toy_map):
    for contrast, order in [('t1', (2, 3, 4)), ('t2', (4, 3, 2)), ('flair', (3, 2, 4))]:
        synth = Synthesizer(_maps(toy_map)[:1], replace(QUIET, contrast=contrast))
        s = synth.synthesize(0, torch.Generator().manual_seed(0))
        img, out = s['image'].numpy(), np.asarray(L.OUTPUT_LABELS)[s['labels'].numpy()]
        m = [img[out == lab].mean() for lab in order]
        assert m[0] > m[1] > m[2], contrast


def test_bias_gamma_noise_resolution_change_the_image_but_not_the_labels(toy_map):
    maps = _maps(toy_map)[:1]
    base = Synthesizer(maps, QUIET).synthesize(0, torch.Generator().manual_seed(1))
    cfg = replace(QUIET, bias_std=0.5, gamma_std=0.4, noise_std=0.05, fixed_res_mm=(2.0, 2.0, 8.0),
                  res_prob=1.0)
    aug = Synthesizer(maps, cfg).synthesize(0, torch.Generator().manual_seed(1))
    assert torch.equal(base['labels'], aug['labels'])
    assert not torch.allclose(base['image'], aug['image'])
    assert float(aug['image'].min()) == 0.0 and float(aug['image'].max()) == pytest.approx(1.0)
    # the thick-slice axis (z) is smoother than the in-plane axes
    img = aug['image'].numpy()
    dz = np.abs(np.diff(img, axis=2)).mean()
    dx = np.abs(np.diff(img, axis=0)).mean()
    assert dz < 0.7 * dx


def test_gaussian_blur_preserves_mass_and_smooths():
    x = torch.zeros(1, 1, 21, 21, 21)
    x[0, 0, 10, 10, 10] = 1
    y = gaussian_blur(x, [2.0, 1.0, 0.0])
    assert float(y.sum()) == pytest.approx(1.0, rel=1e-5)
    prof = y[0, 0, :, 10, 10].numpy()
    var = (prof * (np.arange(21) - 10) ** 2).sum() / prof.sum()
    assert var == pytest.approx(4.0, rel=0.05)
    assert float(y[0, 0, 10, 10, 11]) == 0.0  # no blur along the third axis


def test_svf_is_smooth_and_invertible():
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 5, 5, 5, generator=gen) * 2.0
    vel = torch.nn.functional.interpolate(coarse, size=(32, 32, 32), mode='trilinear', align_corners=True)
    fwd, inv = integrate_svf(vel), integrate_svf(-vel)
    base = identity_grid((32, 32, 32)).unsqueeze(0)
    # phi^-1(phi(x)) = x: inv sampled at x + fwd(x) cancels fwd(x)
    comp = fwd + sample_field(inv, base + fwd, padding_mode='border')
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert float(fwd.abs().max()) > 4.0  # a large deformation (voxels)...
    assert float(comp[inner].abs().mean()) < 0.03  # ...inverted to a small fraction of a voxel
    assert float(comp[inner].abs().max()) < 0.5
    # positive Jacobian determinant everywhere (diffeomorphic)
    grad = [torch.gradient(fwd[0, a], dim=(0, 1, 2)) for a in range(3)]
    jac = torch.stack([torch.stack(g) for g in grad]) + torch.eye(3).view(3, 3, 1, 1, 1)
    det = torch.linalg.det(jac.permute(2, 3, 4, 0, 1))
    assert float(det.min()) > 0


def test_flip_mirrors_the_anatomy_and_swaps_labels(toy_map):
    maps = _maps(toy_map)[:1]
    plain = Synthesizer(maps, QUIET).synthesize(0, torch.Generator().manual_seed(0))
    flipped = Synthesizer(maps, replace(QUIET, flip_prob=1.0)).synthesize(0, torch.Generator().manual_seed(0))
    assert flipped['flip'] and not plain['flip']
    swap = torch.as_tensor(L.flip_lut(L.OUTPUT_LABELS))
    mirrored = swap[plain['labels'].flip(0)]
    assert float((mirrored == flipped['labels']).float().mean()) > 0.99
    hip = L.OUTPUT_LABELS.index(17)
    xs = torch.nonzero(plain['labels'] == hip)[:, 0].float().mean()
    xs_f = torch.nonzero(flipped['labels'] == L.OUTPUT_LABELS.index(53))[:, 0].float().mean()
    assert xs < 15.5 < xs_f  # left hippocampus on the left; after the flip, a right one on the right


def test_determinism_by_seed(toy_map):
    cfg = replace(SynthConfig(shape=(32, 32, 32)), translation_mm=5)
    synth = Synthesizer(_maps(toy_map), cfg)
    a = synth.sample(2, torch.Generator().manual_seed(7))
    b = synth.sample(2, torch.Generator().manual_seed(7))
    c = synth.sample(2, torch.Generator().manual_seed(8))
    assert torch.equal(a['image'], b['image']) and torch.equal(a['labels'], b['labels'])
    assert not torch.equal(a['image'], c['image'])
    assert a['image'].shape == (2, 1, 32, 32, 32) and a['labels'].dtype == torch.int64


def test_pairs_carry_the_exact_correspondence(toy_map):
    cfg = replace(SynthConfig(shape=(40, 40, 40)), rotation_deg=30, nonlin_std_mm=3.0, translation_mm=4,
                  flip_prob=0.5)
    synth = Synthesizer(_maps(toy_map)[:1], cfg)
    pair = synth.sample_pair(torch.Generator().manual_seed(2))
    corr = pair['fixed_to_moving']
    assert corr.shape == (1, 3, 40, 40, 40)
    moved = sample_field(pair['moving']['labels'][:, None].float(), corr, mode='nearest')[:, 0].long()
    fixed = pair['fixed']['labels']
    brain = fixed > 0
    agree = float((moved[brain] == fixed[brain]).float().mean())
    before = float((pair['moving']['labels'][brain] == fixed[brain]).float().mean())
    assert agree > 0.85 and agree > before + 0.1  # nearest-neighbour sampling twice at 2 mm
    two = Synthesizer(_maps(toy_map), cfg).sample_pair(torch.Generator().manual_seed(2), same_anatomy=False)
    assert two['maps'][0] != two['maps'][1] and two['fixed_to_moving'] is None


@pytest.mark.skipif(not SYNTHSEG_MAPS.is_dir(), reason='SynthSeg training label maps not on this machine '
                    '(training material, ../shared/data/synthseg)')
def test_real_synthseg_map_synthesis():
    m = load_label_map(SYNTHSEG_MAPS / 'training_seg_01.nii.gz')
    synth = Synthesizer([m], SynthConfig(shape=(48, 48, 48)))
    s = synth.sample(1, torch.Generator().manual_seed(0))
    present = set(np.asarray(L.OUTPUT_LABELS)[s['labels'].unique().numpy()].tolist())
    assert {2, 3, 41, 42, 4, 43} <= present


# ---------------------------------------------------------------- network
def test_training_step_checkpoint_resume_and_inference(toy_map, tmp_path):
    from keyprep.pipeline.synth.labeller import LabelNetwork
    from keyprep.pipeline.synth.train import TrainConfig, UNetConfig, export_weights, train

    cfg = TrainConfig(steps=2, checkpoint_every=1, val_every=2, warmup=1, val_grid=(40, 40, 40),
                      val_contrasts=('t1',),
                      synth=SynthConfig(shape=(32, 32, 32)),
                      unet=UNetConfig(features=4, levels=2))
    out = tmp_path / 'run'
    ckpt = train(toy_map, out, cfg, held_out=('toy_01',), log=lambda *_: None)
    state2 = torch.load(ckpt, weights_only=False)
    assert state2['step'] == 2 and state2['held_out'] == ['toy_01']
    log = (out / 'train_log.tsv').read_text().strip().split('\n')
    assert len(log) == 3 and all(np.isfinite(float(r.split('\t')[1])) for r in log[1:])
    assert len((out / 'val_log.tsv').read_text().strip().split('\n')) == 2
    # resume: two more steps continue from step 2 with the saved weights
    ckpt = train(toy_map, out, replace(cfg, steps=4), held_out=('toy_01',), log=lambda *_: None)
    state4 = torch.load(ckpt, weights_only=False)
    assert state4['step'] == 4
    assert any(not torch.equal(state2['model'][k], state4['model'][k]) for k in state2['model'])
    assert len((out / 'train_log.tsv').read_text().strip().split('\n')) == 5
    # exported weights label an image on its own grid
    meta = export_weights(ckpt, tmp_path / 'w.pt')
    assert len(meta['sha256']) == 64
    net = LabelNetwork(tmp_path / 'w.pt')
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    img = nib.Nifti1Image(np.random.default_rng(0).random((30, 34, 28)).astype(np.float32), aff)
    res = net.predict(img)
    assert res.labels.shape == img.shape and np.allclose(res.labels.affine, aff)
    assert set(np.unique(np.asarray(res.labels.dataobj))) <= set(L.OUTPUT_LABELS)
    assert res.mask.get_data_dtype() == np.uint8


def test_bf16_training_step_matches_fp32_and_precision_round_trips(toy_map):
    """The bfloat16 autocast step computes the same losses as float32 (to bf16 rounding), keeps
    float32 weights, and the precision survives the config round trip (old configs: fp32)."""
    from keyprep.pipeline.synth.generator import Synthesizer, load_label_map
    from keyprep.pipeline.synth.train import TrainConfig, UNet3D, UNetConfig, train_step

    synth = Synthesizer([load_label_map(f) for f in sorted(Path(toy_map).glob('*.nii.gz'))],
                        SynthConfig(shape=(32, 32, 32)))
    batch = synth.sample(1, torch.Generator().manual_seed(0))
    terms = {}
    for precision in ('fp32', 'bf16'):
        cfg = TrainConfig(precision=precision, unet=UNetConfig(features=4, levels=2))
        torch.manual_seed(0)
        model = UNet3D(cfg.unet)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        terms[precision] = train_step(model, opt, batch, cfg, torch.device('cpu'))
        assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters())
        assert TrainConfig.from_dict(cfg.to_dict()).precision == precision
    for key in ('dice_loss', 'ce'):
        assert terms['bf16'][key] == pytest.approx(terms['fp32'][key], rel=0.02)
    old = TrainConfig().to_dict()
    del old['precision']
    assert TrainConfig.from_dict(old).precision == 'fp32'
    with pytest.raises(ValueError, match='precision'):
        TrainConfig.from_dict({**old, 'precision': 'fp8'})
    # the command line's default resolves to bf16 only where the hardware runs it natively
    from keyprep.bids_app.train import build_parser
    from keyprep.pipeline.resources import fast_bf16, resolve_precision

    opts = build_parser().parse_args(['synthseg', '--label-maps', 'x', '--output', 'y'])
    assert opts.precision == 'auto'
    assert resolve_precision('auto', 'cpu') == ('bf16' if fast_bf16('cpu') else 'fp32')
    assert resolve_precision('fp32', 'cpu') == 'fp32'
    with pytest.raises(ValueError, match='precision'):
        resolve_precision('fp16')


def test_missing_weights_is_a_clear_error(tmp_path):
    from keyprep.pipeline.synth.labeller import LabelNetwork

    with pytest.raises(MissingInputError, match='weights not found'):
        LabelNetwork(tmp_path / 'nope.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a model')
    from keyprep.pipeline.errors import EXIT_DATA, WeightsError

    with pytest.raises(WeightsError, match='cannot be loaded') as info:  # exit 65, not 66
        LabelNetwork(tmp_path / 'junk.pt')
    assert info.value.exit_code == EXIT_DATA


# ---------------------------------------------------------------- pose search
@pytest.mark.parametrize('angle', [0.0, 75.0, 150.0])
def test_pose_search_finds_any_starting_orientation(angle):
    from keyprep.pipeline import perturb as pt
    from keyprep.pipeline.synth.orient import estimate_pose

    from .conftest import CH2

    head = nib.load(str(CH2))
    ref = estimate_pose(head).matrix
    rng = np.random.default_rng(int(angle) + 1)
    motion = pt.random_similarity(rng, 180.0, 10.0, (1.0, 1.0), center=pt.center_of_mass(head),
                                  angle_deg=angle)
    xfm = pt.KnownTransform(motion)
    grid = pt.fitting_grid(xfm.push(pt.foreground_points(head, 0, step=3)), (2.0, 2.0, 2.0), margin_mm=5)
    moved, _ = pt.apply_known_transform(head, xfm, grid)
    found = estimate_pose(moved)
    expected = motion @ ref
    rel = found.matrix[:3, :3] @ expected[:3, :3].T
    err_deg = np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1)))
    assert err_deg < 5.0
    assert np.linalg.norm(found.matrix[:3, 3] - expected[:3, 3]) < 4.0
    assert found.score > 0.8


def test_labelling_odd_images_does_not_crash(toy_map, tmp_path):
    """Empty, NaN-containing, 4-D and oblique images: labels on the input grid; an empty image
    falls back from the pose search to the header's orientation and says so."""
    from keyprep.pipeline.synth.labeller import LabelNetwork
    from keyprep.pipeline.synth.train import TrainConfig, UNetConfig, export_weights, train

    cfg = TrainConfig(steps=1, checkpoint_every=1, val_every=0, warmup=1,
                      synth=SynthConfig(shape=(32, 32, 32)), unet=UNetConfig(features=4, levels=2))
    ckpt = train(toy_map, tmp_path / 'run', cfg, held_out=(), log=lambda *_: None)
    export_weights(ckpt, tmp_path / 'w.pt')
    net = LabelNetwork(tmp_path / 'w.pt')
    empty = nib.Nifti1Image(np.zeros((20, 22, 18), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    res = net.predict(empty, pose='auto')
    assert res.pose['fallback'] == 'header' and 'no foreground' in res.pose['reason']
    assert res.labels.shape == empty.shape
    data = np.random.default_rng(0).random((20, 22, 18, 2)).astype(np.float32)
    data[3, 3, 3, 0] = np.nan
    rot = np.eye(4)  # oblique: 17 degrees about z, 2 mm voxels
    c, s_ = np.cos(0.3), np.sin(0.3)
    rot[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]) * 2.0
    odd = nib.Nifti1Image(data, rot)
    res = net.predict(odd)
    assert res.labels.shape == data.shape[:3] and np.allclose(res.labels.affine, rot)
    with pytest.raises(ValueError, match='pose'):
        net.predict(odd, pose='sideways')


def test_shipped_network_bf16_labels_agree_with_fp32():
    """bfloat16 inference (used where the hardware runs it natively) changes few labels."""
    from keyprep.pipeline.resources import fast_bf16

    if not fast_bf16('cpu'):
        # 'auto' never picks bf16 here; emulated bf16 convolutions of one head took over 15
        # minutes on a 2-core AMD EPYC without AVX512 (2026-12-04), past the suite's budget
        pytest.skip('this CPU has no native bfloat16 (AVX512-BF16 or AMX): keyprep uses fp32')
    from .conftest import CH2, coarse

    from keyprep.pipeline.synth.labeller import LabelNetwork

    img = coarse(CH2, 2.0)
    out = {p: np.asarray(LabelNetwork(precision=p).predict(img).labels.dataobj) for p in ('fp32', 'bf16')}
    brain = (out['fp32'] > 0) | (out['bf16'] > 0)
    assert brain.sum() > 50_000 / 8
    assert (out['fp32'] == out['bf16'])[brain].mean() > 0.98
    with pytest.raises(ValueError, match='precision'):
        LabelNetwork(precision='fp16')
