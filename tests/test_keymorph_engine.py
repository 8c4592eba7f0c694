"""KeyMorph engines: variants from one run (lambda sweep, refinement), keypoint tables,
test-time refinement, the groupwise template, their figures, and the workflow graphs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from keyprep.pipeline.engines import EngineOptions, get_engine
from keyprep.pipeline.keymorph import refine as R
from keyprep.pipeline.keymorph.keypoints import read_keypoints
from keyprep.pipeline.registration import run_engine, run_engine_variants
from keyprep.pipeline.transforms import (
    apply_transforms,
    read_displacement_field,
    read_itk_affine,
)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def random_weights(tmp_path_factory) -> Path:
    """A tiny randomly initialised detector: enough for everything but accuracy."""
    from keyprep.pipeline.keymorph.network import FORMAT, DetectorConfig, KeypointDetector

    torch.manual_seed(0)
    cfg = DetectorConfig(n_keypoints=16, features=(4, 8), pool_after=(1,), res_mm=8.0,
                         shape=(32, 32, 32))
    path = tmp_path_factory.mktemp('km') / 'random.pt'
    torch.save({'format': FORMAT, 'detector': cfg.to_dict(),
                'state_dict': KeypointDetector(cfg).state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def masks(small_brains, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('masks')
    out = {}
    for key in ('fixed', 'moving'):
        img = nb.load(str(small_brains[key]))
        out[key] = root / f'{key}_mask.nii.gz'
        nb.Nifti1Image((np.asanyarray(img.dataobj) > 0).astype('u1'), img.affine).to_filename(
            out[key])
    return out


def _truth(small_brains) -> np.ndarray:
    """The known map fixed mm -> moving mm of the test pair (same voxels, moved affine)."""
    f, m = nb.load(str(small_brains['fixed'])), nb.load(str(small_brains['moving']))
    return m.affine @ np.linalg.inv(f.affine)


def _brain_points(path: Path, step: int = 7) -> np.ndarray:
    img = nb.load(str(path))
    ijk = np.argwhere(np.asanyarray(img.dataobj) > 0)[::step]
    return ijk @ img.affine[:3, :3].T + img.affine[:3, 3]


# ------------------------------------------------------------------------------- variants
def test_variant_names_and_parameters():
    tps, aff, rig = get_engine('keymorphTPS'), get_engine('keymorphAffine'), \
        get_engine('keymorphRigid')

    def names(engine, **params):
        return [n for n, _ in engine.variants(EngineOptions(params=params))]

    assert names(tps) == ['keymorphTPS']
    assert names(tps, lambdas=[0.1]) == ['keymorphTPS']
    assert names(tps, lambdas=[0, 0.1, 10]) == ['keymorphTPSlam0', 'keymorphTPSlam0p1',
                                                'keymorphTPSlam10']
    assert names(tps, lambdas=[0, 1], refine='deformable') == [
        'keymorphTPSlam0', 'keymorphTPSlam1', 'keymorphTPSlam0Refined', 'keymorphTPSlam1Refined']
    assert names(tps, refine='affine') == ['keymorphTPS']  # affine refines the linear engines
    assert names(aff, refine='affine') == ['keymorphAffine', 'keymorphAffineRefined']
    assert names(rig, refine='deformable') == ['keymorphRigid', 'keymorphRigidRefined']
    assert names(aff) == ['keymorphAffine']
    params = aff.parameters(EngineOptions(sloppy=True, params={'refine': 'affine'}))
    assert params['refine_steps'] == 8 and 'lambdas' not in params
    with pytest.raises(ValueError, match='unknown parameter'):
        aff.parameters(EngineOptions(params={'lambdas': [1.0]}))
    with pytest.raises(ValueError, match='distinct'):
        tps.parameters(EngineOptions(params={'lambdas': [1, 1]}))
    with pytest.raises(ValueError, match='refine'):
        aff.parameters(EngineOptions(params={'refine': 'maybe'}))
    assert [x.key for x in aff.extra_outputs(EngineOptions())] == ['keypoints_moving',
                                                                  'keypoints_fixed']
    text = tps.boilerplate(EngineOptions(params={'lambdas': [0, 1], 'refine': 'deformable'}))
    assert 'lambda = 0, 1' in text and 'Refined' in text
    assert 'arsigny2006' in tps.cite(EngineOptions(params={'refine': 'deformable'}))
    assert 'arsigny2006' not in tps.cite(EngineOptions())


def test_run_engine_refuses_several_variants(small_brains, random_weights, tmp_path):
    with pytest.raises(ValueError, match='run_engine_variants'):
        run_engine('keymorphAffine', small_brains['fixed'], small_brains['moving'], tmp_path,
                   params={'weights': str(random_weights), 'refine': 'affine',
                           'refine_steps': 1})


def test_tps_sweep_one_detection_every_lambda(small_brains, masks, random_weights, tmp_path):
    runs = run_engine_variants('keymorphTPS', small_brains['fixed'], small_brains['moving'],
                               tmp_path, fixed_mask=masks['fixed'], moving_mask=masks['moving'],
                               params={'weights': str(random_weights), 'lambdas': [0, 10]},
                               sloppy=True)
    assert [r.method for r in runs] == ['keymorphTPSlam0', 'keymorphTPSlam10']
    assert all(r.engine == 'keymorphTPS' and r.transform_kind == 'deformable' for r in runs)
    assert runs[0].runtime_s == runs[1].runtime_s  # one run, shared by its variants
    assert [r.variant_params['lambda'] for r in runs] == [0.0, 10.0]
    lam0, lam10 = runs
    # the same keypoint files for every variant, one row per keypoint, mm of each image
    assert lam0.files == lam10.files
    pf, wf, idx = read_keypoints(lam0.files['keypoints_fixed'])
    pm, _, idx_m = read_keypoints(lam0.files['keypoints_moving'])
    assert pf.shape == pm.shape == (16, 3) and idx.tolist() == idx_m.tolist() == list(range(16))
    assert np.allclose(wf, 1.0)  # an unweighted model
    # lambda = 0 interpolates the keypoints; a large lambda does not
    assert lam0.extras['keypoint_residual_mm'] < 1e-3
    assert lam10.extras['keypoint_residual_mm'] > 0.1
    # the exported forward field maps the fixed keypoints onto the moving ones (lambda = 0)
    from scipy import ndimage as ndi

    u, aff = read_displacement_field(lam0.fwd_xfm)
    vox = (pf - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    disp = np.stack([ndi.map_coordinates(u[..., k], vox.T, order=1) for k in range(3)], 1)
    inside = np.all((vox > 1) & (vox < np.array(u.shape[:3]) - 2), axis=1)
    assert inside.sum() >= 8
    assert np.abs(pf + disp - pm)[inside].max() < 0.5
    # the inverse is the aligners' fixed-point inverse, with its error recorded
    for run in runs:
        assert 0 <= run.extras['inverse_error_mean_mm'] < 0.05
        assert run.extras['inverse_error_max_mm'] < 0.5
        again = apply_transforms(small_brains['moving'], small_brains['fixed'], [run.fwd_xfm],
                                 tmp_path / f'{run.method}_again.nii.gz')
        assert np.allclose(nb.load(str(again)).get_fdata(), nb.load(run.warped).get_fdata(),
                           atol=1e-3)


def test_keypoint_subset(small_brains, random_weights, tmp_path):
    run = run_engine('keymorphRigid', small_brains['fixed'], small_brains['moving'], tmp_path,
                     params={'weights': str(random_weights), 'n_keypoints': 6})
    pf, _, idx = read_keypoints(run.files['keypoints_fixed'])
    _, _, idx_m = read_keypoints(run.files['keypoints_moving'])
    assert len(idx) == 6 and idx.tolist() == idx_m.tolist() and len(set(idx.tolist())) == 6
    assert run.extras['n_keypoints'] == 6
    mat = read_itk_affine(run.fwd_xfm)
    assert np.allclose(mat[:3, :3] @ mat[:3, :3].T, np.eye(3), atol=1e-6)  # rigid
    assert np.linalg.det(mat[:3, :3]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match='at least 4'):
        run_engine('keymorphRigid', small_brains['fixed'], small_brains['moving'],
                   tmp_path / 'b', params={'weights': str(random_weights), 'n_keypoints': 3})


def test_trained_keypoints_recover_the_motion(small_brains, keymorph_weights, tmp_path):
    """Keypoints of the moving brain match the fixed brain's moved by the known motion."""
    run = run_engine('keymorphAffine', small_brains['fixed'], small_brains['moving'], tmp_path,
                     params={'weights': str(keymorph_weights)})
    pf, _, _ = read_keypoints(run.files['keypoints_fixed'])
    pm, _, _ = read_keypoints(run.files['keypoints_moving'])
    truth = _truth(small_brains)
    moved = pf @ truth[:3, :3].T + truth[:3, 3]
    assert np.median(np.linalg.norm(moved - pm, axis=1)) < 6.0  # 4 mm voxels
    mat = read_itk_affine(run.fwd_xfm)
    pts = _brain_points(small_brains['fixed'])
    err = np.linalg.norm(pts @ (mat - truth)[:3, :3].T + (mat - truth)[:3, 3], axis=1)
    assert err.mean() < 3.0


# ------------------------------------------------------------------------------- refinement
def test_similarities():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand((1, 1, 12, 12, 12), generator=gen)
    b = torch.rand((1, 1, 12, 12, 12), generator=gen)
    assert float(R.lncc_loss(a, a)) == pytest.approx(-1.0, abs=5e-3)
    assert float(R.lncc_loss(a, 1 - a)) == pytest.approx(-1.0, abs=5e-3)  # squared cc
    assert float(R.lncc_loss(a, b)) > -0.3
    assert float(R.mind_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(R.mind_loss(a, 1 - a)) == pytest.approx(0.0, abs=1e-4)  # contrast-free
    assert float(R.mind_loss(a, b)) > 0.05
    for name in ('lncc', 'mind', 'mi'):
        loss = R.make_similarity(name, a)
        assert float(loss(a)) < float(loss(b))
    with pytest.raises(ValueError):
        R.make_similarity('ssd', a)


@pytest.fixture(scope='module')
def refine_images(small_brains, masks):
    return R.prepare_images(nb.load(str(small_brains['fixed'])),
                            nb.load(str(small_brains['moving'])),
                            nb.load(str(masks['fixed'])), nb.load(str(masks['moving'])))


def _perturbed(truth: np.ndarray, centre: np.ndarray, deg: float, shift) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    p = np.eye(4)
    p[:3, :3] = Rotation.from_rotvec(np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
                                     * np.radians(deg)).as_matrix()
    p[:3, 3] = shift
    c1, c2 = np.eye(4), np.eye(4)
    c1[:3, 3], c2[:3, 3] = -centre, centre
    return truth @ c2 @ p @ c1


@pytest.mark.parametrize('rigid, similarity', [(True, 'lncc'), (False, 'mi')])
def test_linear_refinement_recovers_the_motion(small_brains, refine_images, rigid, similarity):
    truth = _truth(small_brains)
    init = _perturbed(truth, refine_images.centre_mm, 6.0, (3.0, -2.0, 2.0))
    pts = _brain_points(small_brains['fixed'])

    def error(mat):
        return np.linalg.norm(pts @ (mat[:3] - truth[:3])[:, :3].T + (mat[:3] - truth[:3])[:, 3],
                              axis=1).mean()

    assert error(init) > 4.0
    res = R.refine_linear(refine_images, init, rigid=rigid, steps=30, similarity=similarity)
    assert min(res.losses) < res.losses[0]
    assert error(res.matrix) < 1.0  # 4 mm voxels, refined on a 2 mm grid
    if rigid:
        a = res.matrix[:, :3]
        assert np.allclose(a @ a.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(a) == pytest.approx(1.0, abs=1e-5)


def test_svf_refinement_is_invertible_and_improves(small_brains, refine_images):
    from keyprep.pipeline.keymorph.aligners import displacement_grid

    truth = _truth(small_brains)
    init = _perturbed(truth, refine_images.centre_mm, 3.0, (2.0, 0.0, -1.0))
    base = displacement_grid(init[:3], refine_images.grid_affine,
                             refine_images.shape).permute(3, 0, 1, 2)[None]
    corr = R.refine_svf(refine_images, base, steps=8, similarity='lncc')
    assert min(corr.losses) < corr.losses[0] - 0.01
    assert corr.max_displacement_mm > 0.5
    # exp(-v) inverts exp(v) up to the discretisation of scaling and squaring
    pts = torch.as_tensor(_brain_points(small_brains['fixed'], 3), dtype=torch.float32)
    err = (corr.apply(corr.apply(pts), inverse=True) - pts).norm(dim=1)
    assert float(err.mean()) < 0.1 and float(err.max()) < 0.5 * refine_images.res_mm
    wrong = (corr.apply(corr.apply(pts)) - pts).norm(dim=1)  # psi o psi is not the identity
    assert float(wrong.mean()) > 5 * float(err.mean())
    # diffeomorphic: positive Jacobian determinant of psi on the refinement grid
    d = corr.forward[0].numpy() / refine_images.res_mm  # voxels
    grads = [np.gradient(d[k], axis=(0, 1, 2)) for k in range(3)]
    jac = np.stack([np.stack(g, -1) for g in grads], -2) + np.eye(3)
    assert np.linalg.det(jac).min() > 0



def test_svf_integration_on_the_control_grid_matches_the_fine_grid(refine_images):
    """refine_svf's exp(v) (scaling and squaring on the 8 mm control grid, then upsampled)
    against integrating the upsampled velocity on the refinement grid: a small fraction of a
    voxel apart."""
    from keyprep.pipeline.synth.generator import integrate_svf

    torch.manual_seed(0)
    shape = refine_images.shape
    factor = 4  # 8 mm control spacing on the 2 mm grid
    cshape = tuple(max(2, -(-(s - 1) // factor) + 1) for s in shape)
    vel = 3.0 * torch.randn((1, 3) + cshape)  # mm, a few mm of smooth motion
    vel = torch.nn.functional.avg_pool3d(vel, 3, stride=1, padding=1, count_include_pad=False)
    res = refine_images.res_mm
    fine = torch.nn.functional.interpolate(vel, size=shape, mode='trilinear', align_corners=True)
    ref = integrate_svf(fine / res, 7) * res
    coarse = R.svf_displacement(vel, shape, res, 7)
    err = (coarse - ref).norm(dim=1)
    assert float(ref.norm(dim=1).max()) > 2.0  # the field is not trivial
    assert float(err.mean()) < 0.05 * res and float(err.max()) < 0.25 * res
    # a degenerate axis (one voxel) gives a finite field, not a division by zero
    flat = R.svf_displacement(torch.ones(1, 3, 2, 2, 2), (1, 5, 5), res)
    assert flat.shape == (1, 3, 1, 5, 5) and bool(torch.isfinite(flat).all())


def test_refinement_adam_is_torch_adam():
    """keyprep's test-time Adam (no torch.optim: its import costs 1.6 s) is torch's."""
    from keyprep.pipeline.optim import Adam

    torch.manual_seed(0)
    a = torch.randn(7, requires_grad=True)
    start = a.detach().clone()
    b = a.detach().clone().requires_grad_(True)
    ta, mine = torch.optim.Adam([a], lr=0.1), Adam([b], lr=0.1)
    for step in range(25):
        for p, opt in ((a, ta), (b, mine)):
            opt.zero_grad()
            ((p - 3) ** 4 + p.sin()).sum().backward()
            opt.step()
    assert float((a - b).detach().abs().max()) < 1e-5
    assert float((b.detach() - start).abs().min()) > 0.5  # it moved: not a trivial match


def test_deformable_refinement_defaults():
    from keyprep.pipeline.engines.keymorph import (
        DEFAULT_REFINE_STEPS,
        DEFAULT_SVF_REFINE_RES_MM,
        DEFAULT_SVF_REFINE_STEPS,
    )

    opts = EngineOptions(params={'refine': 'deformable'})
    tps = get_engine('keymorphTPS').parameters(opts)
    assert tps['refine_steps'] == DEFAULT_SVF_REFINE_STEPS == 20
    assert tps['refine_resolution_mm'] == DEFAULT_SVF_REFINE_RES_MM == 4.0
    aff = get_engine('keymorphAffine').parameters(opts)
    assert aff['refine_steps'] == DEFAULT_REFINE_STEPS and aff['refine_resolution_mm'] == 2.0
    assert '4 mm grid for 20 steps' in get_engine('keymorphTPS').boilerplate(opts)

def test_engine_refined_variants(small_brains, masks, random_weights, tmp_path):
    params = {'weights': str(random_weights), 'refine': 'deformable', 'refine_steps': 2}
    rigid = run_engine_variants('keymorphRigid', small_brains['fixed'], small_brains['moving'],
                                tmp_path / 'r', fixed_mask=masks['fixed'],
                                moving_mask=masks['moving'], params=params,
                                contrasts={'fixed': 'T1w', 'moving': 'T2w'})
    assert [r.method for r in rigid] == ['keymorphRigid', 'keymorphRigidRefined']
    ref = rigid[1]
    assert ref.extras['refined'] and ref.extras['refine_similarity'] == 'mind'
    assert ref.extras['refine_steps'] == 2 and ref.extras['refine_loss_end'] <= \
        ref.extras['refine_loss_start']
    mat = read_itk_affine(ref.fwd_xfm)
    assert np.linalg.det(mat[:3, :3]) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(mat @ read_itk_affine(ref.inv_xfm), np.eye(4), atol=1e-5)
    tps = run_engine_variants('keymorphTPS', small_brains['fixed'], small_brains['moving'],
                              tmp_path / 't', fixed_mask=masks['fixed'],
                              moving_mask=masks['moving'], params=params,
                              contrasts={'fixed': 'T1w', 'moving': 'T1w'})
    assert [r.method for r in tps] == ['keymorphTPS', 'keymorphTPSRefined']
    ref = tps[1]
    assert ref.extras['refine_similarity'] == 'lncc'
    assert ref.extras['inverse_error_mean_mm'] < 0.1
    assert ref.extras['inverse_error_max_mm'] < 1.0
    again = apply_transforms(small_brains['moving'], small_brains['fixed'], [ref.fwd_xfm],
                             tmp_path / 'again.nii.gz')
    assert np.allclose(nb.load(str(again)).get_fdata(), nb.load(ref.warped).get_fdata(),
                       atol=1e-3)


# ------------------------------------------------------------------------------- groupwise
def test_procrustes_mean_recovers_the_shape():
    from scipy.spatial.transform import Rotation

    from keyprep.pipeline.keymorph.groupwise import procrustes_mean

    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 3)) * 30
    rigid, affine = [], []
    for _ in range(5):
        rot = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
        shift = rng.normal(size=3) * 20
        rigid.append(base @ rot.T + shift)
        lin = rot @ np.diag(rng.uniform(0.85, 1.15, 3))
        affine.append(base @ lin.T + shift + rng.normal(size=(30, 3)) * 0.5)
    res = procrustes_mean(np.stack(rigid), kind='rigid')
    assert res.converged and res.residual_mm.max() < 1e-6
    # the mean is the base shape in the first cloud's pose
    assert np.allclose(res.mean, rigid[0], atol=1e-6)
    assert np.allclose(res.transforms[0], np.eye(4)[:3], atol=1e-6)
    res = procrustes_mean(np.stack(affine), kind='affine')
    assert res.converged
    assert res.residual_mm.max() < 1.0  # the 0.5 mm noise per coordinate
    # maps average to the identity in the common pose: no brain sets the size
    lin = res.transforms[:, :, :3]
    assert abs(np.linalg.det(lin).prod() ** (1 / len(lin)) - 1) < 0.05


def test_groupwise_template(small_brains, masks, keymorph_weights, tmp_path):
    from keyprep.pipeline.keymorph.groupwise import build_template

    res = build_template([small_brains['fixed'], small_brains['moving']],
                         [masks['fixed'], masks['moving']], tmp_path, weights=keymorph_weights,
                         resolution=4.0)
    tpl, mask = nb.load(res.template), nb.load(res.mask)
    assert np.asanyarray(mask.dataobj).sum() > 1000
    pts, _, idx = read_keypoints(res.keypoints)
    assert pts.shape[0] == len(idx) > 4
    # the two brains are the same anatomy: the template is that brain, in the first's frame
    on_fixed = apply_transforms(res.template, small_brains['fixed'],
                                [str(_identity(tmp_path))], tmp_path / 'tpl_on_fixed.nii.gz')
    a = nb.load(str(on_fixed)).get_fdata().ravel()
    b = nb.load(str(small_brains['fixed'])).get_fdata().ravel()
    a, b = a - a.mean(), b - b.mean()
    assert float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) > 0.9
    assert tpl.header.get_zooms()[:3] == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError, match='two brains'):
        build_template([small_brains['fixed']], [masks['fixed']], tmp_path / 'one',
                       weights=keymorph_weights)


def _identity(folder: Path) -> Path:
    from keyprep.pipeline.transforms import identity_transform

    return identity_transform(folder / 'identity.txt')


# ------------------------------------------------------------------------------- figures
def test_keypoint_and_variant_figures(small_brains, random_weights, tmp_path):
    from keyprep.pipeline import figures

    runs = run_engine_variants('keymorphTPS', small_brains['fixed'], small_brains['moving'],
                               tmp_path, params={'weights': str(random_weights),
                                                 'lambdas': [0, 1, 10]})
    out = figures.plot_keypoints(small_brains['moving'], runs[0].files['keypoints_moving'],
                                 small_brains['fixed'], runs[0].files['keypoints_fixed'],
                                 tmp_path / 'kp.png', title='keypoints')
    rgb = np.asarray(__import__('PIL.Image', fromlist=['Image']).open(out).convert('RGB'))
    from matplotlib.colors import to_rgb

    # the numbered pairs appear in both rows (moving on top, target below), same colours
    half = rgb.shape[0] // 2
    for colour in figures.PAIR_COLOURS[:4]:
        target = np.round(np.array(to_rgb(colour)) * 255)
        for part in (rgb[:half], rgb[half:]):
            assert (np.abs(part.astype(int) - target).max(-1) <= 12).sum() > 20
    out = figures.plot_variants(small_brains['fixed'], [r.warped for r in runs],
                                [r.method for r in runs], tmp_path / 'var.png',
                                prefix='keymorphTPS', title='sweep')
    rgb = np.asarray(__import__('PIL.Image', fromlist=['Image']).open(out).convert('RGB'))
    assert rgb.shape[1] == 1400
    edge = np.array([0, 255, 255])
    assert (np.abs(rgb.astype(int) - edge).max(-1) <= 60).sum() > 300
    with pytest.raises(ValueError):
        figures.plot_variants(small_brains['fixed'], [runs[0].warped], ['a', 'b'],
                              tmp_path / 'bad.png')


# ------------------------------------------------------------------------------- workflows
def _groups(root: Path, subjects=('01', '02')):
    from keyprep.bids_app.bids import AnatImage, ProcessingGroup

    groups = []
    for sub in subjects:
        g = ProcessingGroup(sub, None)
        path = root / f'sub-{sub}/anat/sub-{sub}_T1w.nii.gz'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        g.images.append(AnatImage(path, 'T1w', sub, None))
        groups.append(g)
    return groups


def _build(tmp_path, groups, methods, target='MNI152NLin2009aSym', **kw):
    from keyprep.pipeline.targets import parse_target
    from keyprep.workflows.base import init_keyprep_wf

    spec = parse_target(target)
    return init_keyprep_wf(groups=groups, target=spec, target_file=spec.path, skip_source=None,
                           methods=methods, bids_dir=tmp_path, output_dir=tmp_path / 'out',
                           work_dir=tmp_path / 'work', run_uuid='test', **kw)


def _graph(wf):
    from nipype.pipeline.engine.utils import generate_expanded_graph

    return generate_expanded_graph(wf._create_flat_graph())


def test_variant_graph_one_register_node_per_engine(tmp_path, random_weights):
    groups = _groups(tmp_path, ('01',))
    params = {'keymorphTPS': {'weights': str(random_weights), 'lambdas': [0, 0.1, 10]},
              'keymorphAffine': {'weights': str(random_weights), 'refine': 'affine'}}
    graph = _graph(_build(tmp_path, groups, ['antsRigid', 'keymorphAffine', 'keymorphTPS'],
                          engine_params=params, sloppy=True))
    nodes = {n.fullname: n for n in graph.nodes()}
    regs = sorted(n.split('.')[-2] for n in nodes if n.endswith('.register'))
    assert regs == ['reg_T1w_antsRigid_wf', 'reg_T1w_keymorphAffine_wf',
                    'reg_T1w_keymorphTPS_wf']
    tps_reg = next(n for name, n in nodes.items()
                   if name.endswith('reg_T1w_keymorphTPS_wf.register'))
    assert tps_reg.inputs.params['lambdas'] == [0, 0.1, 10]
    assert tps_reg.inputs.moving_contrast == 'T1w'
    variants = ['keymorphTPSlam0', 'keymorphTPSlam0p1', 'keymorphTPSlam10']
    for v in variants:
        qc = [n for name, n in nodes.items() if name.endswith(f'keymorphTPS_wf.{v}_wf.qc')]
        assert len(qc) == 1
        select = next(n for name, n in nodes.items()
                      if name.endswith(f'keymorphTPS_wf.{v}_wf.select'))
        assert {p.fullname for p in graph.predecessors(select)} == {tps_reg.fullname}
        assert select.inputs.variant == v
        sinks = [n for name, n in nodes.items() if f'ds_T1w_{v}_' in name]
        descs = {n.inputs.entities.get('desc') for n in sinks}
        assert descs == {v} and len(sinks) == 8  # xfm x2, warped, dseg x2, jacobian, figs x2
    # linear engine with refinement: two chains; the ANTs engine is unchanged (flat)
    assert [n for n in nodes if n.endswith('keymorphAffine_wf.keymorphAffineRefined_wf.qc')]
    assert [n for n in nodes if n.endswith('reg_T1w_antsRigid_wf.qc')]
    assert not [n for n in nodes if 'antsRigid_wf.' in n and n.endswith('.select')]
    # 1 + 2 + 3 registration results in the QC tables
    merge = next(n for name, n in nodes.items() if name.endswith('.merge_qc_summary'))
    assert len(list(graph.predecessors(merge))) == 6
    # keypoints: written once per image although two engines declare them
    kp = [name for name in nodes
          if 'keypoints' in name.split('.')[-1] and '.ds_T1w_' in name]
    assert sorted(n.split('.')[-1] for n in kp) == [
        'ds_T1w_keymorphAffine_fig_keypoints', 'ds_T1w_keypoints_fixed',
        'ds_T1w_keypoints_fixed_json', 'ds_T1w_keypoints_moving', 'ds_T1w_keypoints_moving_json']
    fixed_sink = next(nodes[n] for n in kp if n.endswith('ds_T1w_keypoints_fixed'))
    assert fixed_sink.inputs.entities == {'desc': 'keypoints', 'extension': '.tsv',
                                          'space': 'MNI152NLin2009aSym'}
    assert [n for n in nodes if n.endswith('ds_T1w_keymorphTPS_fig_variants')]
    assert [n for n in nodes if n.endswith('reg_T1w_keymorphTPS_wf.fig_variants')]


def test_groupwise_graph(tmp_path, random_weights):
    import networkx as nx

    groups = _groups(tmp_path, ('01', '02', '03'))
    wf = _build(tmp_path, groups, ['antsRigid', 'keymorphAffine'], target='groupwise:res-2',
                engine_params={'keymorphAffine': {'weights': str(random_weights)}},
                keymorph_weights=str(random_weights))
    graph = _graph(wf)
    assert nx.is_directed_acyclic_graph(graph)
    nodes = {n.fullname: n for n in graph.nodes()}
    tpl = [n for name, n in nodes.items() if name.endswith('groupwise_wf.template')]
    assert len(tpl) == 1
    tpl = tpl[0]
    assert tpl.inputs.resolution == 2.0 and tpl.inputs.weights == str(random_weights)
    ancestors = {n.fullname for n in nx.ancestors(graph, tpl)}
    for sub in ('01', '02', '03'):  # every participant's preprocessing feeds the template
        assert any(f'sub_{sub}_anat_wf.anat_T1w_wf.' in a for a in ancestors)
    regs = [n for name, n in nodes.items() if name.endswith('.register')]
    assert len(regs) == 6
    for reg in regs:  # and every registration waits for it
        assert tpl in nx.ancestors(graph, reg)
    sinks = {name.split('.')[-1]: n for name, n in nodes.items() if 'groupwise_wf.ds_' in name}
    assert sinks['ds_template'].inputs.relative_path == \
        'tpl-keyprepGroupwise/tpl-keyprepGroupwise_res-2_T1w.nii.gz'
    assert sinks['ds_template_keypoints'].inputs.relative_path == \
        'tpl-keyprepGroupwise/tpl-keyprepGroupwise_res-2_desc-keypoints_T1w.tsv'
    with pytest.raises(ValueError, match='two participants'):
        _build(tmp_path, groups[:1], ['antsRigid'], target='groupwise')


def test_cli_options(tmp_path, random_weights, capsys, monkeypatch):
    from keyprep.bids_app.parser import parse_args
    from keyprep.bids_app.run import run
    from keyprep.pipeline.errors import EXIT_USAGE, KeyprepError

    bids = tmp_path / 'ds'
    bids.mkdir()
    base = [str(bids), str(tmp_path / 'out'), 'participant']
    opts = parse_args([*base, '--methods', 'all', '--keymorph-weights', str(random_weights),
                       '--keymorph-lambdas', '0', '0.1', '0', '--keymorph-refine',
                       'deformable', '--keymorph-refine-steps', '12', '--keymorph-keypoints',
                       '8'])
    assert {'antsRigid', 'keymorphRigid', 'keymorphAffine', 'keymorphTPS'} <= set(opts.methods)
    assert opts.engine_params['keymorphTPS'] == {
        'weights': str(random_weights), 'refine': 'deformable', 'refine_steps': 12,
        'n_keypoints': 8, 'lambdas': [0.0, 0.1]}
    assert 'lambdas' not in opts.engine_params['keymorphAffine']
    monkeypatch.chdir(random_weights.parent)  # a relative path works from any node folder
    opts = parse_args([*base, '--methods', 'keymorphRigid', '--target', 'groupwise',
                       '--keymorph-weights', random_weights.name])
    assert opts.keymorph_weights == random_weights
    assert opts.engine_params['keymorphRigid']['weights'] == str(random_weights)
    assert 'pose_search' not in opts.engine_params['keymorphRigid']  # the engine's default
    opts = parse_args([*base, '--methods', 'keymorphAffine', '--keymorph-pose-search', 'none'])
    assert opts.engine_params['keymorphAffine'] == {'pose_search': 'none'}
    assert run([*base, '--keymorph-pose-search', 'sphere']) == EXIT_USAGE
    opts = parse_args([*base, '--methods', 'keymorphTPS', '--keymorph-keypoint-source', 'labels'])
    assert opts.engine_params['keymorphTPS'] == {'keypoint_source': 'labels'}
    assert run([*base, '--keymorph-keypoint-source', 'oracle']) == EXIT_USAGE
    assert parse_args(base).methods == ['antsRigid', 'antsAffine', 'antsSyN']
    assert parse_args(base).engine_params == {}
    assert run([*base, '--keymorph-lambdas', '-1']) == EXIT_USAGE
    assert run([*base, '--keymorph-refine', 'lots']) == EXIT_USAGE
    with pytest.raises(KeyprepError, match='weights not found'):
        parse_args([*base, '--methods', 'keymorphAffine', '--keymorph-weights',
                    str(tmp_path / 'none.pt')])
    with pytest.raises(KeyprepError, match='at least 4'):
        parse_args([*base, '--methods', 'keymorphAffine', '--keymorph-weights',
                    str(random_weights), '--keymorph-keypoints', '3'])
    assert run(['--help']) == 0
    text = ' '.join(capsys.readouterr().out.split())
    for flag in ('--keymorph-weights', '--keymorph-lambdas', '--keymorph-refine ',
                 '--keymorph-refine-steps', '--keymorph-keypoints', '--keymorph-pose-search',
                 '--keymorph-keypoint-source',
                 'groupwise'):
        assert flag in text
    assert 'keymorphAffineRefined' in text and 'keymorphTPSlam' in text


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def e2e_keymorph(tmp_path_factory, keymorph_weights):
    """Two brains, a groupwise template, a lambda sweep with refinement, through the CLI."""
    from keyprep.bids_app.run import run

    from .conftest import CH2BET, coarse, rotated_copy, write_bids

    root = tmp_path_factory.mktemp('e2e_km')
    brain = coarse(CH2BET, 4.0)
    bids = write_bids(root / 'ds', {'01': brain,
                                    '02': rotated_copy(brain, 15.0, axis=1, shift=(3, 0, -2))})
    out, work = root / 'out', root / 'work'
    args = [str(bids), str(out), 'participant', '-w', str(work), '--nprocs', '2',
            '--omp-nthreads', '1', '--sloppy', '--methods', 'keymorphAffine', 'keymorphTPS',
            '--target', 'groupwise:res-4', '--keymorph-weights', str(keymorph_weights),
            '--keymorph-lambdas', '0.1', '1', '--keymorph-refine', 'deformable',
            '--keymorph-refine-steps', '2']
    return {'code': run(args), 'out': out, 'bids': bids}


# lambda 0.1, not 0: with the default keypoints (about 31 structure centroids) lambda 0
# interpolates them exactly and distorts the brain between them (sub-02 of this run: Dice
# 0.50 at lambda 0, 0.60 at lambda 1, 0.58 for the affine)
VARIANTS = ['keymorphAffine', 'keymorphAffineRefined', 'keymorphTPSlam0p1', 'keymorphTPSlam1',
            'keymorphTPSlam0p1Refined', 'keymorphTPSlam1Refined']


@pytest.mark.slow
def test_e2e_keymorph_outputs(e2e_keymorph):
    import pandas as pd

    out = e2e_keymorph['out']
    assert e2e_keymorph['code'] == 0
    tpl = out / 'tpl-keyprepGroupwise'
    for name in ('tpl-keyprepGroupwise_res-4_T1w.nii.gz', 'tpl-keyprepGroupwise_res-4_T1w.json',
                 'tpl-keyprepGroupwise_res-4_desc-keypoints_T1w.tsv',
                 'tpl-keyprepGroupwise_res-4_desc-keypoints_T1w.json',
                 'tpl-keyprepGroupwise_res-4_desc-brain_mask.nii.gz'):
        assert (tpl / name).is_file(), name
    meta = __import__('json').loads((tpl / 'tpl-keyprepGroupwise_res-4_T1w.json').read_text())
    assert meta['Sources'] == ['bids:raw:sub-01/anat/sub-01_T1w.nii.gz',
                               'bids:raw:sub-02/anat/sub-02_T1w.nii.gz']
    assert meta['ProcrustesConverged']
    for sub in ('01', '02'):
        anat = out / f'sub-{sub}' / 'anat'
        for v in VARIANTS:
            for name in (f'sub-{sub}_space-keyprepGroupwise_desc-{v}_T1w.nii.gz',
                         f'sub-{sub}_space-keyprepGroupwise_desc-{v}_jacobian.nii.gz',
                         f'sub-{sub}_space-keyprepGroupwise_seg-synthseg_desc-{v}_dseg.nii.gz'):
                assert (anat / name).is_file(), name
            ext = '.txt' if v.startswith('keymorphAffine') else '.nii.gz'
            assert (anat / f'sub-{sub}_from-T1w_to-keyprepGroupwise_mode-image_desc-{v}_xfm'
                    f'{ext}').is_file()
        moving = anat / f'sub-{sub}_desc-keypoints_T1w.tsv'
        fixed = anat / f'sub-{sub}_space-keyprepGroupwise_desc-keypoints_T1w.tsv'
        pm, _, im = read_keypoints(moving)
        pf, _, ifx = read_keypoints(fixed)
        assert pm.shape == pf.shape and im.tolist() == ifx.tolist()
        assert (anat / f'sub-{sub}_desc-keypoints_T1w.json').is_file()
        figs = out / f'sub-{sub}' / 'figures'
        assert (figs / f'sub-{sub}_space-keyprepGroupwise_desc-keypoints_T1w.png').is_file()
        assert (figs / f'sub-{sub}_space-keyprepGroupwise_desc-keymorphTPSvariants_T1w.png'
                ).is_file()
        summary = pd.read_csv(anat / f'sub-{sub}_desc-registrationsummary_qc.tsv', sep='\t')
        assert sorted(summary['method']) == sorted(VARIANTS)
        assert (summary['dice_mean'] > 0.5).all()
        side = __import__('json').loads((anat / f'sub-{sub}_from-T1w_to-keyprepGroupwise_'
                                         'mode-image_desc-keymorphTPSlam0p1_xfm.json').read_text())
        assert side['engine'] == 'keymorphTPS' and side['variant_params'] == {
            'lambda': 0.1, 'refined': False}
        assert side['extras']['inverse_error_max_mm'] < 1.0
    html = (out / 'sub-01.html').read_text()
    assert 'keymorphTPSlam1Refined' in html and 'Keypoints of the image' in html
    assert 'side by side' in html
    assert 'gower1975' in (out / 'logs' / 'CITATION.md').read_text()


@pytest.mark.slow
def test_e2e_keymorph_transform_reproduces_warped(e2e_keymorph, tmp_path):
    out = e2e_keymorph['out']
    anat = out / 'sub-02' / 'anat'
    ref = out / 'tpl-keyprepGroupwise' / 'tpl-keyprepGroupwise_res-4_desc-brain_T1w.nii.gz'
    for v, ext in (('keymorphTPSlam0p1Refined', '.nii.gz'), ('keymorphAffine', '.txt')):
        xfm = anat / f'sub-02_from-T1w_to-keyprepGroupwise_mode-image_desc-{v}_xfm{ext}'
        mine = apply_transforms(anat / 'sub-02_desc-preproc_T1w.nii.gz', ref, [xfm],
                                tmp_path / f'{v}.nii.gz')
        assert nb.load(str(mine)).shape[:3] == nb.load(str(ref)).shape[:3]
        warped = nb.load(str(anat / f'sub-02_space-keyprepGroupwise_desc-{v}_T1w.nii.gz'))
        a = nb.load(str(mine)).get_fdata().ravel()
        b = warped.get_fdata().ravel()
        keep = b != 0
        a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
        assert float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) > 0.9


def test_qc_tables_after_a_crash_keep_each_variant(tmp_path):
    """A crash in one variant's chain fails that variant only; a crash of the engine's own
    node fails all its variants (the rows the run's recovery writes)."""
    import pandas as pd

    from keyprep.bids_app.qctables import complete_qc_tables

    groups = _groups(tmp_path / 'ds', ('01',))
    wf = 'keyprep_wf'
    reg = tmp_path / 'work' / wf / 'sub_01_wf' / 'reg_T1w_keymorphTPS_wf'
    for v in ('keymorphTPSlam0', 'keymorphTPSlam1'):
        (reg / f'{v}_wf' / 'qc').mkdir(parents=True)
        for name in ('qc_summary.tsv', 'qc_long.tsv'):
            pd.DataFrame([{'participant_id': 'sub-01', 'method': v, 'status': 'pass'}]).to_csv(
                reg / f'{v}_wf' / 'qc' / name, sep='\t', index=False)
    out = tmp_path / 'out'
    crash = out / 'sub-01' / 'log' / 'crash.txt'
    crash.parent.mkdir(parents=True)
    crash.write_text('Node: x\n')
    variants = {'keymorphTPS': ['keymorphTPSlam0', 'keymorphTPSlam1']}

    def statuses(node):
        complete_qc_tables(out_dir=out, work_dir=tmp_path / 'work', wf_name=wf, groups=groups,
                           methods=['keymorphTPS'], target='MNI152NLin2009aSym',
                           bids_dir=tmp_path / 'ds', skip_source=None,
                           crashes={f'{wf}.sub_01_wf.reg_T1w_keymorphTPS_wf.{node}': crash},
                           variants=variants)
        table = pd.read_csv(out / 'sub-01/anat/sub-01_desc-registrationsummary_qc.tsv',
                            sep='\t')
        return dict(zip(table['method'], table['status']))

    assert statuses('keymorphTPSlam1_wf.jacobian') == {'keymorphTPSlam0': 'pass',
                                                       'keymorphTPSlam1': 'fail'}
    assert statuses('register') == {'keymorphTPSlam0': 'fail', 'keymorphTPSlam1': 'fail'}
