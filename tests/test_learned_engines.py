"""The CARL and DIO engines through the engine contract: both start from another method's
affine (the chain is exported and recorded), give their variants from one run, export
transforms both ways (CARL's and dioDiffeo's own inverses; dio's free-form field inverted
by the registry), warp exactly as their exported transforms do, and record their weights.

The networks here have random weights (small configurations on the 4 mm test brains):
these tests check the engines' geometry and bookkeeping, not the models' accuracy, which
their model cards and benchmarks measure.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from keyprep.pipeline.transforms import apply_transforms, read_displacement_field, write_itk_affine


@pytest.fixture(scope='module')
def carl_weights(tmp_path_factory) -> Path:
    from keyprep.pipeline.carl.network import FORMAT, CarlConfig, CarlNet

    torch.manual_seed(0)
    cfg = CarlConfig(shape=(48, 48, 48), res_mm=4.0, enc_channels=8, enc_blocks=1,
                     dilations=(1, 2), feat_dim=8, pad=2, refine1=(8, 8), refine2=(4, 8))
    net = CarlNet(cfg)
    path = tmp_path_factory.mktemp('carl') / 'carl.pt'
    torch.save({'format': FORMAT, 'config': cfg.to_dict(), 'state_dict': net.state_dict(),
                'step': 0}, path)
    return path


@pytest.fixture(scope='module')
def dio_weights(tmp_path_factory) -> Path:
    from keyprep.pipeline.dio.network import FORMAT, DioConfig, DioFeatureNet

    torch.manual_seed(0)
    cfg = DioConfig.from_dict({**DioConfig().to_dict(), 'res_mm': 4.0,
                               'iterations': (20, 10, 5)})
    net = DioFeatureNet(cfg)
    path = tmp_path_factory.mktemp('dio') / 'dio.pt'
    torch.save({'format': FORMAT, 'config': cfg.to_dict(), 'state_dict': net.state_dict(),
                'step': 0}, path)
    return path


@pytest.fixture(scope='module')
def start(small_brains, tmp_path_factory) -> dict:
    """A starting affine (the known motion of the test pair, a 12 degree rotation and a
    shift, as an affine engine would find it) and the fixed brain mask."""
    root = tmp_path_factory.mktemp('start')
    fixed, moving = nb.load(str(small_brains['fixed'])), nb.load(str(small_brains['moving']))
    # moving = same voxels, rotated affine: fixed point x -> moving point M_m M_f^-1 x
    xfm = write_itk_affine(moving.affine @ np.linalg.inv(fixed.affine), root / 'init.txt')
    mask = root / 'mask.nii.gz'
    nb.Nifti1Image((fixed.get_fdata() > 0).astype(np.uint8), fixed.affine).to_filename(mask)
    return {'xfm': xfm, 'mask': mask}


def _same_as_exported(run, small_brains, tmp_path):
    again = apply_transforms(small_brains['moving'], small_brains['fixed'], [run.fwd_xfm],
                             tmp_path / f'{run.method}_again.nii.gz')
    a, b = nb.load(str(again)).get_fdata(), nb.load(run.warped).get_fdata()
    inside = (a > 0) & (b > 0)
    assert inside.sum() > 1000 and np.corrcoef(a[inside], b[inside])[0, 1] > 0.97


def test_carl_engine(small_brains, carl_weights, start, tmp_path):
    from keyprep.pipeline.registration import run_engine_variants

    runs = run_engine_variants('carl', small_brains['fixed'], small_brains['moving'], tmp_path,
                               fixed_mask=start['mask'], params={'weights': str(carl_weights),
                                                                 'io_steps': 2},
                               init_transform=start['xfm'], init_method='keymorphAffine')
    assert [r.method for r in runs] == ['carl', 'carlIO']
    for run in runs:
        assert run.chain == ['keymorphAffine', run.method]
        assert run.inverse['source'] == 'engine'  # the network run with the images swapped
        assert np.isfinite(run.inverse['consistency']['mean_mm'])
        assert run.weights['model'] == 'carl' and run.weights['path'] == str(carl_weights)
        _same_as_exported(run, small_brains, tmp_path)
        fwd, _ = read_displacement_field(run.fwd_xfm)
        inv, _ = read_displacement_field(run.inv_xfm)
        assert fwd.shape[:3] == nb.load(str(small_brains['fixed'])).shape
        assert inv.shape[:3] == nb.load(str(small_brains['moving'])).shape
        # the chain holds the starting affine: the composed field is far from zero
        assert np.abs(fwd).max() > 5.0
    assert runs[1].extras['io_loss_first_last'][0] != runs[1].extras['io_loss_first_last'][1]
    assert 'io_loss_first_last' not in runs[0].extras
    assert runs[1].extras['io_similarity'] == 'lncc'  # the fixture's weights carry no recipe
    # keyprep's field-space IO ran after the weight-space one, and its loss fell
    field = runs[1].extras['field_io']
    assert field['steps'] > 0 and field['loss_first_last'][1] < field['loss_first_last'][0]
    assert 'field_io' not in runs[0].extras


def test_dio_engine_representations(small_brains, dio_weights, start, tmp_path):
    from keyprep.pipeline.registration import run_engine_variants
    from keyprep.pipeline.transforms import jacobian_map

    runs = run_engine_variants('dio', small_brains['fixed'], small_brains['moving'], tmp_path,
                               fixed_mask=start['mask'], params={'weights': str(dio_weights)},
                               init_transform=start['xfm'], init_method='keymorphAffine')
    by = {r.method: r for r in runs}
    assert list(by) == ['dio', 'dioDiffeo', 'dioAffine']
    for run in runs:  # every inverse from DIO itself, saying how it was made
        assert run.inverse['source'] == 'engine'
    assert by['dio'].inverse['method'] == 'fixed-point inversion on the working grid'
    assert by['dio'].inverse['residual_mean_vox'] < 0.05, by['dio'].inverse
    assert 'inverse' not in by['dio'].extras  # recorded once, in the inverse record
    assert by['dioDiffeo'].inverse['method'].startswith('exp(-v)')
    assert by['dioAffine'].inverse['method'] == 'the inverse matrix'
    for run in runs:
        assert run.chain == ['keymorphAffine', run.method]
        assert run.extras['representation'] in ('ffd', 'diffeo', 'affine')
        _same_as_exported(run, small_brains, tmp_path)
    jac = jacobian_map(by['dioDiffeo'].fwd_xfm, small_brains['fixed'], 'deformable')
    assert (np.asanyarray(jac.dataobj) > 0).all()  # a diffeomorphism does not fold
    # one representation only: the plain engine name
    only = run_engine_variants('dio', small_brains['fixed'], small_brains['moving'],
                               tmp_path / 'ffd', params={'weights': str(dio_weights),
                                                         'representations': ['ffd']},
                               init_transform=start['xfm'], init_method='keymorphAffine')
    assert [r.method for r in only] == ['dio']


def _intensity_labels(path: Path, out: Path) -> Path:
    """Three 'structures' from the image's intensity tertiles inside the brain (labels
    move with the image, as a label network's would)."""
    img = nb.load(str(path))
    data = img.get_fdata()
    brain = data > 0
    cuts = np.quantile(data[brain], [1 / 3, 2 / 3])
    lab = np.where(brain, 2 + np.digitize(data, cuts), 0).astype(np.int16)
    nb.Nifti1Image(lab, img.affine).to_filename(out)
    return out


def test_dio_engine_label_prompting(small_brains, dio_weights, start, tmp_path):
    from keyprep.pipeline.engines import EngineOptions, get_engine
    from keyprep.pipeline.registration import run_engine_variants

    labels = {k: str(_intensity_labels(small_brains[k], tmp_path / f'{k}_labels.nii.gz'))
              for k in ('fixed', 'moving')}
    kw = dict(fixed_mask=start['mask'], init_transform=start['xfm'],
              init_method='keymorphAffine')
    params = {'weights': str(dio_weights), 'representations': ['diffeo'], 'label_weight': 2.0}
    run, = run_engine_variants('dio', small_brains['fixed'], small_brains['moving'],
                               tmp_path / 'prompted', labels=labels, params=params, **kw)
    assert run.method == 'dioDiffeo'
    assert run.extras['label_prompt'] == {'weight': 2.0, 'used': True, 'structures': 3,
                                          'setting': 2.0, 'weight_from': 'given'}
    assert run.extras['labels_in_objective'] is True  # QC will not trust their Dice
    _same_as_exported(run, small_brains, tmp_path)
    # without the moving image's labels the engine runs on its features and says why
    run, = run_engine_variants('dio', small_brains['fixed'], small_brains['moving'],
                               tmp_path / 'unprompted', labels={'fixed': labels['fixed']},
                               params=params, **kw)
    assert run.extras['label_prompt']['used'] is False
    assert run.extras['labels_in_objective'] is False
    assert 'moving' in run.extras['label_prompt']['why']
    engine = get_engine('dio')
    text = engine.boilerplate(EngineOptions(params=params))
    assert 'label prompting (weight 2)' in text
    for bad in (-1, 'often', float('nan'), 'inf', 1e400):
        with pytest.raises(ValueError):
            engine.parameters(EngineOptions(params={'label_weight': bad}))
    # by default the weight follows the contrasts: 16 across contrasts; for one contrast
    # none with the image term on (the default), 1 without it
    assert engine.parameters(EngineOptions())['label_weight'] == 'auto'
    assert 'across contrasts (weight 16; none for images of one contrast)' in \
        engine.boilerplate(EngineOptions())
    assert 'weight 1 for images of one contrast, 16 across' in engine.boilerplate(
        EngineOptions(params={'image_weight': 0}))
    # the command line's --dio-label-weight reaches the engine
    from keyprep.bids_app.parser import build_parser, engine_params

    opts = build_parser().parse_args([str(tmp_path), str(tmp_path / 'out'), 'participant',
                                      '--dio-label-weight', '2'])
    assert engine_params(opts)['dio']['label_weight'] == 2.0
    opts = build_parser().parse_args([str(tmp_path), str(tmp_path / 'out'), 'participant',
                                      '--dio-label-weight', 'AUTO'])
    assert engine_params(opts)['dio']['label_weight'] == 'auto'
    with pytest.raises(SystemExit):
        build_parser().parse_args([str(tmp_path), str(tmp_path / 'out'), 'participant',
                                   '--dio-label-weight', '-2'])
    assert 'dio' not in engine_params(build_parser().parse_args(
        [str(tmp_path), str(tmp_path / 'out'), 'participant']))
    # image prompting: on by default (weight 4, window 5), set or switched off from the CLI
    params = engine.parameters(EngineOptions())
    assert (params['image_weight'], params['image_window']) == (4.0, 5)
    assert 'image prompting (weight 4)' in engine.boilerplate(EngineOptions())
    off = EngineOptions(params={'image_weight': 0})
    assert 'image prompting' not in engine.boilerplate(off)
    assert engine.cache_key(off)['image'] != engine.cache_key(EngineOptions())['image']
    # the label components kept in the solver are register_arrays' default, in the cache key
    import inspect

    from keyprep.pipeline.dio.register import register_arrays
    assert engine.cache_key(EngineOptions())['prompt_channels'] == 6 == \
        inspect.signature(register_arrays).parameters['prompt_channels'].default
    for bad in ({'image_weight': -1}, {'image_weight': 'x'}, {'image_weight': float('nan')},
                {'image_window': 4}, {'image_window': 1}, {'image_window': 2.5},
                {'image_window': True}):
        with pytest.raises(ValueError):
            engine.parameters(EngineOptions(params=bad))
    opts = build_parser().parse_args([str(tmp_path), str(tmp_path / 'out'), 'participant',
                                      '--dio-image-weight', '0', '--dio-image-window', '7'])
    assert engine_params(opts)['dio'] == {'image_weight': 0.0, 'image_window': 7}
    for bad in (['--dio-image-weight', '-1'], ['--dio-image-window', '4']):
        with pytest.raises(SystemExit):
            build_parser().parse_args([str(tmp_path), str(tmp_path / 'out'), 'participant',
                                       *bad])


def test_carl_io_label_prompting(small_brains, carl_weights, start, tmp_path):
    """carlIO adds the soft Dice of both images' structure labels to instance optimisation's
    loss (weight 1 by default): the sidecar says so and QC is told its structure Dice is not
    independent; carl (the network pass) never sees the labels; without a moving label map,
    or at weight 0, IO runs on the images alone and says why."""
    from keyprep.pipeline.engines import EngineOptions, get_engine
    from keyprep.pipeline.registration import run_engine_variants

    labels = {k: str(_intensity_labels(small_brains[k], tmp_path / f'{k}_labels.nii.gz'))
              for k in ('fixed', 'moving')}
    kw = dict(fixed_mask=start['mask'], init_transform=start['xfm'],
              init_method='keymorphAffine')
    params = {'weights': str(carl_weights), 'io_steps': 2}
    carl, carl_io = run_engine_variants('carl', small_brains['fixed'], small_brains['moving'],
                                        tmp_path / 'prompted', labels=labels, params=params,
                                        **kw)
    assert 'label_prompt' not in carl.extras and not carl.extras.get('labels_in_objective')
    assert carl_io.extras['label_prompt'] == {'weight': 1.0, 'field_weight': 0.0,
                                              'used': True, 'structures': 3}
    assert carl_io.extras['labels_in_objective'] is True
    _same_as_exported(carl_io, small_brains, tmp_path)
    # the same IO without labels: another loss, another result
    _, plain = run_engine_variants('carl', small_brains['fixed'], small_brains['moving'],
                                   tmp_path / 'weight0', labels=labels,
                                   params={**params, 'label_weight': 0}, **kw)
    assert plain.extras['labels_in_objective'] is False
    assert plain.extras['io_loss_first_last'][0] < carl_io.extras['io_loss_first_last'][0]
    _, missing = run_engine_variants('carl', small_brains['fixed'], small_brains['moving'],
                                     tmp_path / 'unprompted', labels={'fixed': labels['fixed']},
                                     params=params, **kw)
    assert missing.extras['labels_in_objective'] is False
    assert 'moving' in missing.extras['label_prompt']['why']
    # the defaults: no weight-space IO, field-space IO without a label term: the sidecar
    # says no label entered the objective (same contrast: no transfer either)
    _, field = run_engine_variants('carl', small_brains['fixed'], small_brains['moving'],
                                   tmp_path / 'field', labels=labels,
                                   params={'weights': str(carl_weights), 'field_steps': 3}, **kw)
    assert field.extras['labels_in_objective'] is False
    assert field.extras['label_prompt']['weight'] == field.extras['label_prompt'][
        'field_weight'] == 0.0
    assert field.extras['label_prompt']['used'] is False
    assert field.extras['field_io']['steps'] == 3 and 'io_loss_first_last' not in field.extras
    assert field.extras['field_io']['images'] == 'as registered'
    engine = get_engine('carl')
    assert 'label prompting' in engine.boilerplate(EngineOptions(params=params))
    assert 'label prompting' not in engine.boilerplate(
        EngineOptions(params={**params, 'label_weight': 0}))
    for bad in (-1, 'often', float('nan'), 'inf', True):
        with pytest.raises(ValueError):
            engine.parameters(EngineOptions(params={'label_weight': bad}))
    from keyprep.bids_app.parser import build_parser, engine_params

    base = [str(tmp_path), str(tmp_path / 'out'), 'participant']
    opts = build_parser().parse_args([*base, '--carl-io-steps', '0', '--carl-label-weight', '2'])
    assert engine_params(opts)['carl'] == {'io_steps': 0, 'label_weight': 2.0}
    assert engine.parameters(EngineOptions())['symmetric'] is True  # the measured default
    # the paper's kind of IO is off by default (keyprep's field-space IO replaces it); 5
    # steps get 1e-4, other step counts keep lr x steps
    defaults = engine.parameters(EngineOptions())
    assert defaults['io_steps'] == 0 and defaults['field_steps'] > 0
    assert engine.parameters(EngineOptions(params={'io_steps': 5}))['io_lr'] == \
        pytest.approx(1e-4)
    assert engine.parameters(EngineOptions(params={'io_steps': 50}))['io_lr'] == \
        pytest.approx(1e-5)
    assert engine.parameters(EngineOptions(params={'io_steps': 50, 'io_lr': 2e-5}))[
        'io_lr'] == 2e-5
    assert 'learning rate 0.0001' in engine.boilerplate(EngineOptions(params={'io_steps': 5}))
    assert 'weights reset per pair' not in engine.boilerplate(EngineOptions())
    for bad in (0, -1e-4, 'fast', True, float('inf'), float('nan')):
        with pytest.raises(ValueError, match='io_lr'):
            engine.parameters(EngineOptions(params={'io_lr': bad}))
    assert defaults['io_train'] == 'refine'
    with pytest.raises(ValueError, match='io_train'):
        engine.parameters(EngineOptions(params={'io_train': 'encoder'}))
    opts = build_parser().parse_args([*base, '--carl-io-lr', '1e-3', '--carl-io-train', 'all'])
    assert engine_params(opts)['carl'] == {'io_lr': 1e-3, 'io_train': 'all'}
    opts = build_parser().parse_args([*base, '--carl-symmetric', 'off'])
    assert engine_params(opts)['carl'] == {'symmetric': False}
    assert 'symmetrisation' not in engine.boilerplate(EngineOptions(params={'symmetric': False}))
    assert 'symmetrisation' in engine.boilerplate(EngineOptions(params={'symmetric': True}))
    for bad in (['--carl-io-steps', '-1'], ['--carl-label-weight', 'inf'],
                ['--carl-io-lr', '0'], ['--carl-io-lr', 'nan'], ['--carl-io-train', 'encoder'],
                ['--carl-symmetric', 'yes']):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])
    for bad in ('on', 1, None.__class__):
        with pytest.raises(ValueError, match='symmetric'):
            engine.parameters(EngineOptions(params={'symmetric': bad}))
    # keyprep's cascade: --carl-passes, validated, in the boilerplate and the cache key
    assert defaults['passes'] == 1
    opts = build_parser().parse_args([*base, '--carl-passes', '2'])
    assert engine_params(opts)['carl'] == {'passes': 2}
    for bad in (['--carl-passes', '0'], ['--carl-passes', '1.5']):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])
    for bad in (0, -1, 1.5, '2', True):
        with pytest.raises(ValueError, match='passes'):
            engine.parameters(EngineOptions(params={'passes': bad}))
    assert 'cascade' in engine.boilerplate(EngineOptions(params={'passes': 2}))
    assert 'cascade' not in engine.boilerplate(EngineOptions(params={'passes': 1}))
    assert engine.cache_key(EngineOptions(params={'passes': 2}))['passes'] == 2


def test_carl_field_io_parameters_cli_and_variants(tmp_path):
    """keyprep's field-space instance optimisation of carlIO: measured defaults, validated
    parameters, CLI flags, the boilerplate and the cache key; carlIO exists whenever either
    kind of IO runs."""
    from keyprep.bids_app.parser import build_parser, engine_params
    from keyprep.pipeline.engines import EngineOptions, get_engine
    from keyprep.pipeline.engines.carl import (DEFAULT_FIELD_LABEL_WEIGHT, DEFAULT_FIELD_LEVEL,
                                               DEFAULT_FIELD_LR, DEFAULT_FIELD_STEPS)

    engine = get_engine('carl')
    d = engine.parameters(EngineOptions())
    assert (d['field_steps'], d['field_lr'], d['field_level'], d['field_label_weight']) == (
        DEFAULT_FIELD_STEPS, DEFAULT_FIELD_LR, DEFAULT_FIELD_LEVEL, DEFAULT_FIELD_LABEL_WEIGHT)
    names = lambda **p: [n for n, _ in engine.variants(EngineOptions(params=p))]
    assert names(io_steps=0, field_steps=0) == ['carl']
    assert names(io_steps=0, field_steps=5) == ['carl', 'carlIO']
    assert names(io_steps=3, field_steps=0) == ['carl', 'carlIO']
    carl, carl_io = engine.variants(EngineOptions(params={'io_steps': 3, 'field_steps': 7}))
    assert carl[1] == {'io_steps': 0, 'field_steps': 0}
    assert carl_io[1] == {'io_steps': 3, 'field_steps': 7}
    text = engine.boilerplate(EngineOptions(params={'field_steps': 7}))
    assert 'refines the two fields themselves with 7 Adam steps' in text
    assert 'refines the two fields' not in engine.boilerplate(
        EngineOptions(params={'field_steps': 0}))
    assert 'soft Dice at weight 2' in engine.boilerplate(
        EngineOptions(params={'field_steps': 7, 'field_label_weight': 2}))
    assert engine.cache_key(EngineOptions(params={'field_steps': 7}))['field_steps'] == 7
    for key, bad in (('field_steps', -1), ('field_steps', 1.5), ('field_steps', True),
                     ('field_level', -1), ('field_lr', 0), ('field_lr', float('nan')),
                     ('field_label_weight', -1), ('field_label_weight', 'inf')):
        with pytest.raises(ValueError, match=key):
            engine.parameters(EngineOptions(params={key: bad}))
    base = [str(tmp_path), str(tmp_path / 'out'), 'participant']
    opts = build_parser().parse_args([*base, '--carl-field-steps', '0',
                                      '--carl-field-label-weight', '0.5'])
    assert engine_params(opts)['carl'] == {'field_steps': 0, 'field_label_weight': 0.5}
    for bad in (['--carl-field-steps', '-2'], ['--carl-field-label-weight', 'nan']):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])
    assert engine.cache_key(EngineOptions())['passes'] == 1


def test_dio_auto_label_weight_follows_the_contrasts(small_brains, dio_weights, start,
                                                     tmp_path):
    """'auto' prompting: weight 16 for a T2w image registered to a T1w one; with the image
    term on (the default) none for two T1w images and where the contrasts are not known, and
    1 for them with the image term off; the sidecar says which and why."""
    from keyprep.pipeline.engines.dio import (AUTO_LABEL_WEIGHTS,
                                              AUTO_LABEL_WEIGHTS_FEATURES_ONLY,
                                              resolve_label_weight)
    from keyprep.pipeline.registration import run_engine_variants

    assert resolve_label_weight('auto', {'fixed': 'T1w', 'moving': 'T2w'})[0] == 16.0
    assert resolve_label_weight('auto', {'fixed': 'T1w', 'moving': 'T1w'})[0] == 0.0
    assert resolve_label_weight('auto', {'fixed': 'T1w'}) == (
        0.0, 'auto: contrasts unknown, taken as one contrast, image term on')
    assert resolve_label_weight('auto', {'fixed': 'T1w', 'moving': 'T2w'}, 0.0)[0] == 16.0
    assert resolve_label_weight('auto', {'fixed': 'T1w', 'moving': 'T1w'}, 0.0)[0] == 1.0
    assert resolve_label_weight('auto', {'fixed': 'T1w'}, 0.0) == (
        1.0, 'auto: contrasts unknown, taken as one contrast, features only')
    assert AUTO_LABEL_WEIGHTS_FEATURES_ONLY == {'same': 1.0, 'cross': 16.0}
    assert resolve_label_weight(0.0, {'fixed': 'T1w', 'moving': 'T2w'}) == (0.0, 'given')
    labels = {k: str(_intensity_labels(small_brains[k], tmp_path / f'{k}_labels.nii.gz'))
              for k in ('fixed', 'moving')}
    kw = dict(fixed_mask=start['mask'], init_transform=start['xfm'],
              init_method='keymorphAffine', labels=labels,
              params={'weights': str(dio_weights), 'representations': ['diffeo']})
    said = {}
    for moving in ('T1w', 'T2w'):
        run, = run_engine_variants('dio', small_brains['fixed'], small_brains['moving'],
                                   tmp_path / moving, contrasts={'fixed': 'T1w',
                                                                'moving': moving}, **kw)
        said[moving] = run.extras['label_prompt']
    assert said['T1w']['weight'] == AUTO_LABEL_WEIGHTS['same'] == 0.0
    assert said['T1w']['used'] is False
    assert 'T1w to T1w, one contrast, image term on' in said['T1w']['weight_from']
    assert said['T2w']['weight'] == AUTO_LABEL_WEIGHTS['cross'] == 16.0
    assert said['T2w']['setting'] == 'auto' and said['T2w']['used'] is True
    assert 'T2w to T1w, across contrasts' in said['T2w']['weight_from']


def test_dio_prompt_labels_follow_the_starting_affine(small_brains, start, tmp_path):
    """The moving image's labels reach the fixed grid through the starting affine, as the
    moving image does: there they agree with the fixed image's labels far better than the
    same labels resampled without it (the pair differs by a 12 degree turn and a shift)."""
    from keyprep.pipeline.engines import EngineOptions, get_engine

    labels = {k: str(_intensity_labels(small_brains[k], tmp_path / f'{k}_labels.nii.gz'))
              for k in ('fixed', 'moving')}
    engine = get_engine('dio')
    agree = {}
    for name, xfm in (('start', start['xfm']), ('none', None)):
        opts = EngineOptions(labels=labels, init_transform=str(xfm) if xfm else None)
        (fl, ml), said = engine.prompt_labels(small_brains['fixed'], tmp_path / name, opts, 1.0)
        assert said == {'weight': 1.0, 'used': True} and fl.shape == ml.shape
        brain = fl > 0
        agree[name] = float((fl[brain] == ml[brain]).mean())
    assert agree['start'] > 0.7 and agree['start'] > agree['none'] + 0.1, agree


def test_cli_brings_the_starting_affine(tmp_path, carl_weights, dio_weights):
    from keyprep.bids_app.parser import build_parser, parse_args

    text = build_parser().format_help()
    for option in ('--carl-weights', '--dio-weights', '--carl-init', '--dio-init'):
        assert option in text
    (tmp_path / 'ds').mkdir()
    base = [str(tmp_path / 'ds'), str(tmp_path / 'o'), 'participant',
            '--carl-weights', str(carl_weights), '--dio-weights', str(dio_weights)]
    opts = parse_args([*base, '--methods', 'carl', 'dio'])
    assert opts.methods == ['keymorphAffine', 'carl', 'dio']
    assert opts.engine_params['carl'] == {'weights': str(carl_weights)}
    opts = parse_args([*base, '--methods', 'dio', '--dio-init', 'antsAffine'])
    assert opts.methods == ['antsAffine', 'dio']
    assert opts.engine_params['dio'] == {'weights': str(dio_weights), 'init': 'antsAffine'}


def test_methods_all_names_engines_without_weights(tmp_path, carl_weights, monkeypatch, capsys):
    """--methods all runs every engine whose weights exist; a learned engine without shipped
    weights is named on stderr with the option that gives them, and runs once given."""
    import dataclasses

    from keyprep.bids_app.parser import parse_args
    from keyprep.pipeline.engines import base as engine_base

    model = engine_base.learned_models()['carl']
    monkeypatch.setitem(engine_base._MODELS, 'carl', dataclasses.replace(
        model, default_weights=lambda: tmp_path / 'not-shipped.pt'))
    (tmp_path / 'ds').mkdir()
    base = [str(tmp_path / 'ds'), str(tmp_path / 'o'), 'participant', '--methods', 'all']
    opts = parse_args(base)
    assert 'carl' not in opts.methods and 'carl' in opts.methods_unavailable
    assert {'antsSyN', 'keymorphAffine'} <= set(opts.methods)
    err = capsys.readouterr().err
    assert 'not running carl' in err and '--carl-weights' in err
    opts = parse_args([*base, '--carl-weights', str(carl_weights)])
    assert 'carl' in opts.methods and opts.methods.index('keymorphAffine') < opts.methods.index('carl')


@pytest.mark.parametrize('method', ['carl', 'dio'])
def test_label_guided_contrast_transfer(method, small_brains, carl_weights, dio_weights, start,
                                        tmp_path):
    """``contrast_transfer``: across contrasts (BIDS suffixes) with both label maps, ``auto``
    re-renders both images in the target's contrast for CARL (DIO's default is off); the
    sidecar says which mode and why, QC is told the labels were in the objective, and the
    registration differs from the one without it; without label maps it is off, saying why."""
    from keyprep.pipeline.engines import EngineOptions, get_engine
    from keyprep.pipeline.registration import run_engine_variants

    weights = str(carl_weights if method == 'carl' else dio_weights)
    extra = ({'io_steps': 0, 'field_steps': 0} if method == 'carl'
             else {'representations': ['ffd'], 'label_weight': 0})
    labels = {k: str(_intensity_labels(small_brains[k], tmp_path / f'{k}_labels.nii.gz'))
              for k in ('fixed', 'moving')}
    kw = dict(fixed_mask=start['mask'], init_transform=start['xfm'],
              init_method='keymorphAffine', contrasts={'fixed': 'T1w', 'moving': 'T2w'})

    def run(folder, setting, labels=labels):
        params = {'weights': weights, **extra}
        if setting is not None:
            params['contrast_transfer'] = setting
        (res,) = run_engine_variants(method, small_brains['fixed'], small_brains['moving'],
                                     tmp_path / folder, labels=labels, params=params, **kw)
        return res

    on = run('on', None if method == 'carl' else 'auto')
    assert on.extras['contrast_transfer']['mode'] == 'both'
    assert 'across contrasts' in on.extras['contrast_transfer']['why']
    assert on.extras['labels_in_objective'] is True
    _same_as_exported(on, small_brains, tmp_path)
    off = run('off', 'off')
    assert off.extras['contrast_transfer']['mode'] == 'off'
    assert off.extras['labels_in_objective'] is False
    warped = [nb.load(str(r.warped)).get_fdata() for r in (on, off)]
    assert not np.allclose(warped[0], warped[1])
    moving = run('moving', 'moving')
    assert moving.extras['contrast_transfer']['mode'] == 'moving'
    nolabels = run('nolabels', 'moving', labels={'fixed': labels['fixed']})
    assert nolabels.extras['contrast_transfer'] == {
        'setting': 'moving', 'mode': 'off', 'why': 'no label maps of both images'}
    engine = get_engine(method)
    default = engine.parameters(EngineOptions())['contrast_transfer']
    assert default == ('auto' if method == 'carl' else 'off')
    assert ("keyprep's addition" in engine.boilerplate(EngineOptions())) == (method == 'carl')
    assert engine.cache_key(EngineOptions(params={'contrast_transfer': 'both'})) != \
        engine.cache_key(EngineOptions(params={'contrast_transfer': 'off'}))
    with pytest.raises(ValueError):
        engine.parameters(EngineOptions(params={'contrast_transfer': 'sometimes'}))


def test_carl_field_io_compares_the_real_images_across_contrasts(small_brains, carl_weights,
                                                                 start, tmp_path):
    """Across contrasts the network sees both images re-rendered from their labels; with a
    network trained on squared LNCC (keyprep's recipes) the field-space IO compares the real
    images instead (sign-blind similarity), and says so; the paper's LNCC keeps the re-rendered
    ones. The two choices give different fields."""
    from keyprep.pipeline.registration import run_engine_variants

    payload = torch.load(carl_weights, weights_only=True)
    lncc2 = tmp_path / 'carl_lncc2.pt'
    torch.save({**payload, 'recipe': {'similarity': 'lncc2'}}, lncc2)
    labels = {k: str(_intensity_labels(small_brains[k], tmp_path / f'{k}_labels.nii.gz'))
              for k in ('fixed', 'moving')}
    kw = dict(fixed_mask=start['mask'], init_transform=start['xfm'],
              init_method='keymorphAffine', contrasts={'fixed': 'T1w', 'moving': 'T2w'},
              labels=labels)
    runs = {}
    for name, weights in (('lncc2', lncc2), ('lncc', carl_weights)):
        _, runs[name] = run_engine_variants(
            'carl', small_brains['fixed'], small_brains['moving'], tmp_path / name,
            params={'weights': str(weights), 'field_steps': 3}, **kw)
        assert runs[name].extras['contrast_transfer']['mode'] == 'both'
        assert runs[name].extras['io_similarity'] == name
    assert runs['lncc2'].extras['field_io']['images'] == 'original'
    assert runs['lncc'].extras['field_io']['images'] == 'as registered'
    a, _ = read_displacement_field(runs['lncc2'].fwd_xfm)
    b, _ = read_displacement_field(runs['lncc'].fwd_xfm)
    assert not np.allclose(a, b)
