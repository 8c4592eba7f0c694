"""Label-map bundles and the GPU hand-off helpers (checkpoint parts, collect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from keyprep.pipeline.synth import handoff
from keyprep.pipeline.synth.bundle import is_bundle, load_bundle, save_bundle
from keyprep.pipeline.synth.generator import SynthConfig, Synthesizer, label_map_from_array
from keyprep.pipeline.synth.train import load_training_maps

from .test_synth import toy_label_volume, toy_map  # noqa: F401 - the toy maps fixture

REPO = Path(__file__).resolve().parents[1]


def _extra():
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    aff[:3, 3] = -20
    return label_map_from_array(toy_label_volume(28), aff, 'icbm2009a')


def test_bundle_round_trip_gives_equal_maps_and_identical_samples(toy_map, tmp_path):  # noqa: F811
    maps, _ = load_training_maps(toy_map, held_out=())
    path = save_bundle(tmp_path / 'maps.npz', maps, {'icbm': _extra()}, source=str(toy_map))
    assert is_bundle(path) and not is_bundle(toy_map)
    b = load_bundle(path)
    assert [m.name for m in b.maps] == ['toy_00', 'toy_01'] and list(b.extras) == ['icbm']
    for got, want in zip(b.maps + [b.extras['icbm']], maps + [_extra()]):
        assert got.name == want.name and got.labels == want.labels
        assert got.index.dtype == np.uint8 and np.array_equal(got.index, want.index)
        assert np.array_equal(got.affine, want.affine)
        assert np.array_equal(got.centre_mm, want.centre_mm)
    # the synthesiser draws bit-identical samples (all augmentations on) from either source
    cfg = SynthConfig(shape=(32, 32, 32))
    a = Synthesizer(maps, cfg).sample(2, torch.Generator().manual_seed(7))
    c = Synthesizer(b.maps, cfg).sample(2, torch.Generator().manual_seed(7))
    assert torch.equal(a['image'], c['image']) and torch.equal(a['labels'], c['labels'])
    # the trainer's loader splits a bundle as it splits the folder
    train_b, test_b = load_training_maps(path, held_out=('toy_01',))
    assert [m.name for m in train_b] == ['toy_00'] and [m.name for m in test_b] == ['toy_01']
    with pytest.raises(ValueError, match='not a keyprep label-map bundle'):
        np.savez(tmp_path / 'other.npz', x=np.zeros(2))
        load_bundle(tmp_path / 'other.npz')


def test_train_cli_accepts_a_bundle_with_its_extra_anatomy(toy_map, tmp_path):  # noqa: F811
    from keyprep.bids_app.train import run_train

    maps, _ = load_training_maps(toy_map, held_out=())
    bundle = save_bundle(tmp_path / 'maps.npz', maps, {'icbm': _extra()})
    out = tmp_path / 'run'
    code = run_train(['synthseg', '--label-maps', str(bundle), '--output', str(out),
                      '--extra-anatomies', 'icbm', '--held-out', 'toy_01', '--steps', '1',
                      '--val-every', '0', '--device', 'cpu', '--threads', '1',
                      '--precision', 'fp32'])
    assert code == 0
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['step'] == 1 and state['train_maps'] == ['toy_00', 'icbm2009a']
    assert state['held_out'] == ['toy_01']


def test_training_path_imports_no_nibabel(toy_map, tmp_path):  # noqa: F811
    """The GPU machine has no nibabel, nipype or pydot: the trainer's import path and the
    bundle loader must not need them."""
    maps, _ = load_training_maps(toy_map, held_out=())
    bundle = save_bundle(tmp_path / 'maps.npz', maps)
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('nibabel', 'nipype', 'pydot', 'bids', 'ants'):
                    raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
        sys.meta_path.insert(0, Block())
        from keyprep.bids_app.train import build_parser
        build_parser().parse_args(['synthseg', '--label-maps', 'x', '--output', 'y'])
        from keyprep.pipeline.synth import handoff, train
        from keyprep.pipeline.synth.bundle import load_bundle
        from keyprep.pipeline.synth.generator import Synthesizer
        Synthesizer(load_bundle({str(bundle)!r}).maps).sample(1)
        assert 'nibabel' not in sys.modules
        print('ok')
    """)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert res.returncode == 0 and res.stdout.strip() == 'ok', res.stderr[-2000:]


def test_split_and_join_parts(tmp_path):
    data = np.random.default_rng(0).bytes(2500)
    src = tmp_path / 'checkpoint.pt'
    src.write_bytes(data)
    manifest = handoff.split_file(src, tmp_path / 'out', part_bytes=1000, meta={'step': 3})
    info = json.loads(manifest.read_text())
    assert [p['bytes'] for p in info['parts']] == [1000, 1000, 500] and info['step'] == 3
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
        'checkpoint.pt.part00', 'checkpoint.pt.part01', 'checkpoint.pt.part02',
        'checkpoint.pt.parts.json']
    joined = handoff.join_parts(manifest, tmp_path / 'back' / 'checkpoint.pt')
    assert joined.read_bytes() == data
    part = tmp_path / 'out' / 'checkpoint.pt.part01'
    part.write_bytes(b'x' + part.read_bytes()[1:])
    with pytest.raises(ValueError, match='sha256'):
        handoff.join_parts(manifest, tmp_path / 'bad.pt')
    assert not (tmp_path / 'bad.pt').exists()


def _fake_run(folder: Path, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({'model': {'w': torch.full((3,), float(step))}, 'optimiser': {}, 'step': step,
                'config': {}}, folder / 'checkpoint.pt')
    rows = ''.join(f'{s}\t0.5\t0.2\t0.3\t0.001\t0.01\t0.02\n' for s in range(1, step + 3))
    head = 'step\tloss\tdice_loss\tce\tlr\tsynth_s\tstep_s\n'
    (folder / 'train_log.tsv').write_text(head + rows)
    (folder / 'val_log.tsv').write_text(f'step\tval_dice\tworst\tval_s\n{step}\t0.7\tx=0.6\t1\n')
    (folder / 'train_config.json').write_text('{}')
    (folder / f'val_step{step}.json').write_text('{"mean_dice": 0.7}')


def test_package_and_collect(tmp_path):
    installed, device_run = tmp_path / 'installed', tmp_path / 'device'
    _fake_run(installed, 4)
    _fake_run(device_run, 9)
    out = tmp_path / 'OUT'
    files = handoff.package(device_run, out, meta={'trainer_rc': 0})
    assert len(files) <= handoff.MAX_OUT_FILES
    res = handoff.collect(out, installed, backup_root=tmp_path / 'backup')
    assert res['installed_step'] == 9 and res['previous_step'] == 4
    assert handoff.checkpoint_step(installed / 'checkpoint.pt') == 9
    rows = (installed / 'train_log.tsv').read_text().splitlines()
    assert int(rows[-1].split('\t')[0]) == 9  # rows past the checkpoint are dropped
    assert (installed / 'val_step9.json').is_file()
    assert handoff.checkpoint_step(Path(res['backup']) / 'checkpoint.pt') == 4
    with pytest.raises(ValueError, match='not past the installed'):
        handoff.collect(out, installed, backup_root=None)


def test_collect_refuses_while_the_run_trains(tmp_path):
    run = tmp_path / 'run'
    _fake_run(run, 2)
    assert handoff._cmd_output(['python', 'keyprep', 'train', 'synthseg', '--output', 'a']) == 'a'
    assert handoff._cmd_output(['keyprep-train', 'synthseg', '--output=b']) == 'b'
    assert handoff._cmd_output(['keyprep', 'train', 'keymorph', '--output', 'a']) is None
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'train',
                             'synthseg', '--output', 'run'], cwd=tmp_path)
    try:
        for _ in range(50):  # until /proc shows its command line
            if handoff.trainer_processes(run):
                break
            import time

            time.sleep(0.1)
        assert handoff.trainer_processes(run) == [proc.pid]
        with pytest.raises(RuntimeError, match='is running'):
            handoff.collect(tmp_path / 'nothing', run)
    finally:
        proc.kill()
        proc.wait()
