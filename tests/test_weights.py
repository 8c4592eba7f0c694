"""Weights files: read with ``weights_only=True`` (a file crafted to run code is refused, and
its code does not run), checked for every learned model before any node runs (missing: 66,
unusable: 65, one line), their SHA-256 recorded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from keyprep.bids_app.run import run
from keyprep.pipeline import errors as E
from keyprep.pipeline.errors import MissingInputError, WeightsError
from keyprep.pipeline.keymorph.network import FORMAT, DetectorConfig, KeyMorphModel, \
    KeypointDetector, default_weights
from keyprep.pipeline.weights import check_keymorph_weights, check_label_network_weights

from .conftest import CH2BET, coarse, write_bids

CFG = DetectorConfig(n_keypoints=8, features=(4, 8), pool_after=(1,), res_mm=8.0,
                     shape=(32, 32, 32))


class _Exploit:
    """Unpickling this creates ``self.marker`` (what a malicious weights file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), 'w'))


def _random_bytes(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 64)
    return path


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({'format': FORMAT, 'detector': CFG.to_dict(), 'state_dict': _Exploit(marker)},
               path)
    return path


@pytest.fixture(scope='module')
def bids(tmp_path_factory):
    root = tmp_path_factory.mktemp('weights')
    return write_bids(root / 'ds', {'01': coarse(CH2BET, 6.0)})


def _run(tmp_path, bids, *extra):
    return run([str(bids), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--nprocs', '1', '--sloppy', '--target', 'MNI152NLin2009aSym:res-6',
                '--methods', 'antsRigid', 'keymorphAffine', *extra])


def _one_line(capsys, needle):
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    return lines[0]


def _nothing_ran(tmp_path):
    work = tmp_path / 'work'
    assert not work.exists() or not list(work.glob('keyprep_*_wf'))  # no node folder
    assert not (tmp_path / 'out' / 'sub-01').exists()


@pytest.mark.parametrize('kind', ['random-bytes', 'malicious-pickle'])
def test_unusable_keymorph_weights_stop_the_run_at_start_up(tmp_path, bids, capsys, kind):
    marker = tmp_path / 'pwned'
    bad = (_random_bytes(tmp_path / 'bad.pt') if kind == 'random-bytes'
           else _malicious(tmp_path / 'bad.pt', marker))
    t0 = time.monotonic()
    code = _run(tmp_path, bids, '--keymorph-weights', str(bad))
    elapsed = time.monotonic() - t0
    assert code == E.EXIT_DATA
    assert elapsed < 10, elapsed
    line = _one_line(capsys, 'bad.pt')
    assert 'cannot be loaded' in line
    if kind == 'malicious-pickle':
        assert 'not loaded for safety' in line
    assert not marker.exists()  # the file's code did not run
    _nothing_ran(tmp_path)
    if kind == 'malicious-pickle':  # the file is really malicious: an unsafe load runs it
        torch.load(bad, weights_only=False)
        assert marker.exists()


def test_missing_keymorph_weights_exit_66(tmp_path, bids, capsys):
    code = _run(tmp_path, bids, '--keymorph-weights', str(tmp_path / 'nope.pt'))
    assert code == E.EXIT_NO_INPUT
    _one_line(capsys, 'nope.pt')
    _nothing_ran(tmp_path)
    with pytest.raises(MissingInputError, match='nope.pt'):
        check_keymorph_weights(tmp_path / 'nope.pt')


def test_weights_of_another_model_exit_65(tmp_path, bids, capsys):
    """A loadable file with the wrong content: no keyprep format, missing or misshapen
    tensors, the label network's weights given as KeyMorph's."""
    state = KeypointDetector(CFG).state_dict()
    cases = {
        'noformat.pt': {'state_dict': state},
        'missing.pt': {'format': FORMAT, 'detector': CFG.to_dict(),
                       'state_dict': dict(list(state.items())[1:])},
        'shape.pt': {'format': FORMAT, 'detector': {**CFG.to_dict(), 'n_keypoints': 9},
                     'state_dict': state},
        'list.pt': [1, 2, 3],
    }
    for name, payload in cases.items():
        torch.save(payload, tmp_path / name)
        with pytest.raises(WeightsError, match=name):
            check_keymorph_weights(tmp_path / name)
        with pytest.raises(WeightsError):  # the node's loader refuses them likewise
            KeyMorphModel.load(tmp_path / name)
    from keyprep.pipeline.synth.labeller import default_weights as synth_weights

    with pytest.raises(WeightsError, match='lack format'):
        check_keymorph_weights(synth_weights())
    with pytest.raises(WeightsError):
        check_label_network_weights(default_weights())
    with pytest.raises(WeightsError, match='cannot be loaded'):
        check_label_network_weights(_random_bytes(tmp_path / 'labels.pt'))
    code = _run(tmp_path, bids, '--keymorph-weights', str(tmp_path / 'shape.pt'))
    assert code == E.EXIT_DATA
    assert 'do not fit' in _one_line(capsys, 'shape.pt')
    _nothing_ran(tmp_path)


def test_node_loader_refuses_code_in_weights(tmp_path):
    marker = tmp_path / 'pwned'
    with pytest.raises(WeightsError):
        KeyMorphModel.load(_malicious(tmp_path / 'bad.pt', marker))
    assert not marker.exists()


def test_shipped_and_valid_weights_pass_and_are_recorded(tmp_path, bids):
    from keyprep.pipeline.synth.labeller import read_model_card

    good = tmp_path / 'good.pt'
    torch.save({'format': FORMAT, 'detector': CFG.to_dict(),
                'state_dict': KeypointDetector(CFG).state_dict()}, good)
    assert check_keymorph_weights(good)['path'] == str(good)
    km = check_keymorph_weights()
    labels = check_label_network_weights()
    assert km['sha256'] == read_model_card(default_weights())['sha256']
    # --boilerplate-only checks too, and the run's keyprep.json records the checksums
    assert _run(tmp_path, bids, '--keymorph-weights', str(good), '--boilerplate-only') == 0
    config = json.loads(next((tmp_path / 'out').glob('sub-01/log/*/keyprep.json')).read_text())
    assert config['weights']['synthseg'] == labels
    assert config['weights']['keymorph']['path'] == str(good)
    assert len(config['weights']['keymorph']['sha256']) == 64
