"""CARL training (keyprep.pipeline.carl.train, ``keyprep train carl``): exact resumption
across the diffusion -> GradICON switch, validation through register_arrays, export and
the weights check. Toy label maps, a 32^3 network, one CPU thread."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from keyprep.pipeline.carl.network import CarlConfig, check_carl_weights, load_carl
from keyprep.pipeline.carl.train import CarlTrainConfig, Trainer, export_weights, train
from keyprep.pipeline.synth.generator import SynthConfig, label_map_from_array
from tests.test_keymorph_network import toy_volume

torch.set_num_threads(1)

TINY = CarlConfig(shape=(32, 32, 32), res_mm=4.0, enc_channels=8, enc_blocks=1,
                  dilations=(1, 2), feat_dim=8, pad=2, refine1=(4, 8), refine2=(4, 8))


@pytest.fixture(scope='module')
def toy_maps():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -35.0
    maps = [label_map_from_array(toy_volume(36 + 2 * i, i), aff, f'toy_{i}') for i in range(5)]
    return maps[:3], maps[3:]


def tiny_cfg(**kw) -> CarlTrainConfig:
    base = dict(model=TINY, synth=SynthConfig(translation_mm=8.0, skull_strip_prob=1.0,
                                              nonlin_std_mm=2.0, res_prob=0.0),
                steps=3, diffusion_steps=2, warmup=1, lr=1e-3, checkpoint_every=1,
                val_every=0, val_translation_mm=4.0)
    base.update(kw)
    return CarlTrainConfig(**base)


def test_resume_is_exact_across_the_phase_switch(tmp_path, toy_maps):
    """Steps 1-2 (diffusion), stop, resume for step 3 (GradICON, fresh Adam): the same weights
    and losses as one uninterrupted run."""
    cfg = tiny_cfg()
    straight = tmp_path / 'straight'
    train(None, straight, cfg, maps=toy_maps, held_out=(), log=lambda *_: None)
    split = tmp_path / 'split'
    train(None, split, replace(cfg, steps=2), maps=toy_maps, held_out=(), log=lambda *_: None)
    ckpt2 = torch.load(split / 'checkpoint.pt', weights_only=True)
    assert ckpt2['step'] == 2 and ckpt2['phase'] == 'diffusion'
    train(None, split, cfg, maps=toy_maps, held_out=(), log=lambda *_: None)
    a = torch.load(straight / 'checkpoint.pt', weights_only=True)
    b = torch.load(split / 'checkpoint.pt', weights_only=True)
    assert a['step'] == b['step'] == 3 and a['phase'] == 'gradicon'
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    rows_a = (straight / 'train_log.tsv').read_text().splitlines()
    rows_b = (split / 'train_log.tsv').read_text().splitlines()
    assert [r.split('\t')[:5] for r in rows_a] == [r.split('\t')[:5] for r in rows_b]
    assert rows_a[3].split('\t')[1] == 'gradicon' and len(rows_a) == 4
    # the optimiser was renewed at the switch: its steps count from the switch
    assert int(a['optimiser']['state'][0]['step']) == 1


def test_pairs_are_seeded_and_both_phases_train(toy_maps):
    cfg = tiny_cfg()
    t = Trainer(toy_maps[0], cfg)
    b1, b2 = t.pair_batch(5), t.pair_batch(5)
    assert torch.equal(b1['a'], b2['a']) and torch.equal(b1['b'], b2['b'])
    assert b1['a'].shape == (1, 1, 32, 32, 32)
    assert float(b1['a'].min()) >= 0 and float(b1['a'].max()) <= 1
    assert t.phase(1) == 'diffusion' and t.phase(2) == 'gradicon'
    for step in (0, 2):
        terms = t.step(step)
        assert np.isfinite(terms['loss']) and terms['reg'] >= 0


def test_validation_through_register_arrays_and_export(tmp_path, toy_maps):
    train_maps, held = toy_maps
    cfg = tiny_cfg(steps=1, val_every=1)
    out = tmp_path / 'run'
    train(None, out, cfg, maps=(train_maps, held + [train_maps[0]]), held_out=(),
          log=lambda *_: None)
    rows = (out / 'val_log.tsv').read_text().splitlines()
    assert rows[0].split('\t')[:6] == ['step', 'dice', 'dice_identity', 'fold_pct', 'ic_vox',
                                       'seconds']
    values = rows[1].split('\t')
    assert values[0] == '1' and 0 <= float(values[1]) <= 1 and 0 <= float(values[3]) <= 100
    meta = export_weights(out / 'checkpoint.pt', tmp_path / 'carl.pt', recipe='tiny')
    assert meta['step'] == 1 and check_carl_weights(tmp_path / 'carl.pt')['sha256'] == meta['sha256']
    model, info = load_carl(tmp_path / 'carl.pt')
    assert info['format'] == 'keyprep-carl-1' and info['recipe']['name'] == 'tiny'
    assert info['config'] == TINY.to_dict() and info['recipe']['diffusion_steps'] == 2


def test_validation_pairs_get_the_engines_contrast_transfer(toy_maps):
    """With ``val_contrast_transfer`` (recipe ``cpu-deployed``) a cross-contrast validation
    pair is re-rendered from its labels (``both``: every structure one intensity, the fixed
    image's median there, in both images); one-contrast pairs are left as synthesised."""
    from keyprep.pipeline.carl.train import RECIPES
    from keyprep.pipeline.contrast import label_medians

    assert RECIPES['cpu-deployed'].val_contrast_transfer
    train_maps, held = toy_maps
    maps = held + [train_maps[0]]
    plain = Trainer(train_maps, tiny_cfg(), held_out=maps)._validation_set()
    moved = Trainer(train_maps, tiny_cfg(val_contrast_transfer=True),
                    held_out=maps)._validation_set()
    assert [p['name'] for p in plain] == [p['name'] for p in moved]
    for p, q in zip(plain, moved):
        cross = p['name'].split(' ')[1].split('<-')
        if cross[0] == cross[1]:
            assert np.array_equal(p['fixed'], q['fixed']) and np.array_equal(p['moving'], q['moving'])
            continue
        fl, ml = p['fixed_labels'].numpy(), p['moving_labels'].numpy()
        med = label_medians(p['fixed'], fl, p['fixed'] != 0)
        inside = q['fixed'] != 0
        want = np.vectorize(lambda v: med.get(int(v), np.nan))(fl[inside])
        assert np.allclose(q['fixed'][inside], want)
        m_in = q['moving'] != 0
        assert len(np.unique(q['moving'][m_in & (ml == ml[m_in][0])])) == 1
        assert not np.array_equal(p['moving'], q['moving'])


def test_held_out_maps_never_train(toy_maps):
    train_maps, held = toy_maps
    leaked = [replace(train_maps[0], name='training_seg_14')]
    with pytest.raises(ValueError, match='held-out'):
        train(None, '/nonexistent/never-made', tiny_cfg(), maps=(leaked, held),
              log=lambda *_: None)


def test_cli_carl_missing_label_maps(tmp_path):
    from keyprep.bids_app.train import run_train
    from keyprep.pipeline.errors import EXIT_NO_INPUT, EXIT_USAGE

    assert run_train(['carl', '--label-maps', str(tmp_path / 'none'), '--output',
                      str(tmp_path / 'out'), '--device', 'cpu']) == EXIT_NO_INPUT
    assert run_train(['carl', '--output', str(tmp_path / 'out')]) == EXIT_USAGE
    assert run_train(['carl', '--label-maps', str(tmp_path), '--output', str(tmp_path / 'o'),
                      '--recipe', 'nope']) == EXIT_USAGE
    from keyprep.bids_app.train import build_parser

    opts = build_parser().parse_args(['carl', '--label-maps', 'maps', '--output', 'out',
                                      '--same-contrast', '1', '--similarity', 'lncc'])
    assert opts.p_same_contrast == 1.0 and opts.similarity == 'lncc' and opts.recipe == 'cpu'


def test_label_term_run_starts_from_another_runs_network(tmp_path, toy_maps):
    """``init_from`` copies the network of another run (fresh optimiser, step 0: with a zero
    learning rate the weights stay exactly those of the source), the label term is logged in
    its own column and the run resumes like any other."""
    src = tmp_path / 'src'
    train(None, src, tiny_cfg(steps=2), maps=toy_maps, held_out=(), log=lambda *_: None)
    cfg = tiny_cfg(steps=2, diffusion_steps=0, lr=0.0, dice_weight=1.0,
                   init_from=str(src / 'checkpoint.pt'))
    out = tmp_path / 'dice'
    train(None, out, cfg, maps=toy_maps, held_out=(), log=lambda *_: None)
    a = torch.load(src / 'checkpoint.pt', weights_only=True)['model']
    b = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert b['step'] == 2 and b['phase'] == 'gradicon'
    assert all(torch.equal(a[k], b['model'][k]) for k in a)
    rows = [r.split('\t') for r in (out / 'train_log.tsv').read_text().splitlines()]
    assert rows[0][-1] == 'dice' and len(rows) == 3
    assert all(0 < float(r[-1]) <= 2 for r in rows[1:])  # two directions of 1 - soft Dice
    with pytest.raises(ValueError, match='dice_weight'):
        tiny_cfg(dice_weight=-1.0)
    # an exported weights file (float32 here) starts a run too: the same network
    exported = export_weights(src / 'checkpoint.pt', tmp_path / 'w.pt', half=False)['path']
    out2 = tmp_path / 'from-weights'
    train(None, out2, replace(cfg, init_from=exported), maps=toy_maps, held_out=(),
          log=lambda *_: None)
    c = torch.load(out2 / 'checkpoint.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], c[k]) for k in a)
    other = replace(cfg, model=replace(TINY, feat_dim=4), init_from=exported)
    with pytest.raises(ValueError, match='another CARL architecture'):
        train(None, tmp_path / 'bad', other, maps=toy_maps, held_out=(), log=lambda *_: None)


def test_label_term_drives_the_network_to_the_labels(toy_maps):
    """A few steps with only the label term (LNCC and GradICON weighted by zero) lower it on
    the same pair: the gradient of the soft Dice reaches the network through the warp."""
    cfg = tiny_cfg(diffusion_steps=0, lam=0.0, dice_weight=1.0, lr=3e-3, warmup=1)
    t = Trainer(toy_maps[0], cfg)
    batch = t.pair_batch(0)
    first = t.step(0, batch)['dice']
    for s in range(1, 12):
        last = t.step(s, batch)['dice']
    assert last < first - 0.02, (first, last)


def test_cross_contrast_pairs_and_older_recipes_keep_their_pairs(toy_maps):
    """``p_cross_contrast``: pairs in two different named contrasts, each image in its own
    (the fixed one's tissue intensities follow its contrast's table); 0 (every recipe but
    cpu-postaffine) draws nothing more, so a run resumed under a newer keyprep sees the same
    pairs."""
    from keyprep.pipeline.carl.train import RECIPES
    from keyprep.pipeline.synth.generator import CONTRASTS, Synthesizer

    cfg = tiny_cfg(p_same_contrast=0.0, p_cross_contrast=1.0)
    t = Trainer(toy_maps[0], cfg)
    seen = set()
    for step in range(12):
        b = t.pair_batch(step)
        fixed_c, moving_c = b['contrast'].split('<-')
        assert fixed_c != moving_c and {fixed_c, moving_c} <= set(CONTRASTS)
        seen.add(b['contrast'])
    assert len(seen) >= 4
    # the image of each side is the one its contrast gives with the same draws
    synth = Synthesizer(toy_maps[0], cfg.synth)
    pair = synth.sample_pair(torch.Generator().manual_seed(7), same_anatomy=False,
                             contrasts=('t2', 't1'))
    again = synth.sample_pair(torch.Generator().manual_seed(7), same_anatomy=False,
                              contrasts=('t2', 't1'))
    assert torch.equal(pair['fixed']['image'], again['fixed']['image'])
    mixed = synth.sample_pair(torch.Generator().manual_seed(7), same_anatomy=False,
                              contrasts=('t1', 't1'))
    assert torch.equal(pair['moving']['labels'], mixed['moving']['labels'])
    assert not torch.equal(pair['fixed']['image'], mixed['fixed']['image'])
    assert synth.config.contrast is None  # restored
    # older recipes: p_cross_contrast 0 and the same pairs as before the option existed
    old = tiny_cfg()
    assert old.p_cross_contrast == 0 and RECIPES['cpu-dice'].p_cross_contrast == 0
    old = replace(old, p_same_contrast=0.0)
    a = Trainer(toy_maps[0], old).pair_batch(3)
    assert a['contrast'] == 'random'
    gen = torch.Generator().manual_seed(old.seed * 1_000_003 + 3)
    same_anatomy = float(torch.rand((), generator=gen)) < old.p_same_anatomy
    float(torch.rand((), generator=gen))  # the same-contrast draw, and nothing else
    ref = Synthesizer(toy_maps[0], old.synth).sample_pair(gen, same_anatomy=same_anatomy)
    assert torch.equal(a['la'], ref['moving']['labels'])
    assert torch.equal(a['a'], Trainer._brain(ref['moving']))
    post = RECIPES['cpu-postaffine']
    assert post.synth.translation_mm <= 3 and post.val_translation_mm == 0
    dep = RECIPES['cpu-deployed']  # one contrast per pair, label term at full resolution
    assert dep.p_same_contrast == 1.0 and dep.label_level == 0 and dep.dice_weight > 0
    t = Trainer(toy_maps[0], tiny_cfg(p_same_contrast=dep.p_same_contrast,
                                      p_cross_contrast=dep.p_cross_contrast))
    assert all(t.pair_batch(step)['contrast'] in CONTRASTS for step in range(4))
