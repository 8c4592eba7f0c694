"""Command line: BIDS-Apps conventions and documented exit codes."""

from __future__ import annotations

import json

import pytest

from keyprep import __version__
from keyprep.bids_app.parser import parse_args, parse_mem
from keyprep.bids_app.run import run
from keyprep.pipeline.errors import EXIT_UNKNOWN_LEVEL, EXIT_USAGE, KeyprepError


@pytest.fixture
def bids(tmp_path):
    d = tmp_path / 'ds'
    d.mkdir()
    return d


def test_version(capsys):
    assert run(['--version']) == 0
    assert __version__ in capsys.readouterr().out


def test_labels_strip_prefix_and_defaults(bids, tmp_path):
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--participant-label', 'sub-01', '02', '--session_label', 'ses-a',
                       '--nprocs', '2', '--mem', '4G'])
    assert opts.participant_label == ['01', '02']
    assert opts.session_label == ['a']
    assert opts.omp_nthreads == 2 and opts.mem == 4.0
    assert opts.methods == ['antsRigid', 'antsAffine', 'antsSyN']
    assert opts.target == 'MNI152NLin2009aSym'


@pytest.mark.parametrize('args, code', [
    (['participant', '--bogus'], EXIT_USAGE),
    (['participant', '--nprocs', '0'], EXIT_USAGE),
    (['participant', '--methods', 'nope'], EXIT_USAGE),
    (['participant', '--participant-label', 'a_b'], EXIT_USAGE),
    (['participant', '--skull-strip', 'maybe'], EXIT_USAGE),
    (['particpant'], EXIT_UNKNOWN_LEVEL),
])
def test_usage_exit_codes(bids, tmp_path, args, code):
    assert run([str(bids), str(tmp_path / 'out'), *args]) == code


def test_output_equal_to_input_is_a_usage_error(bids):
    assert run([str(bids), str(bids), 'participant']) == EXIT_USAGE


def test_work_dir_inside_input_is_refused(bids, tmp_path):
    assert run([str(bids), str(tmp_path / 'o'), 'participant', '-w', str(bids / 'w')]) == \
        EXIT_USAGE
    assert not (bids / 'w').exists()


def test_missing_bids_dir(tmp_path):
    assert run([str(tmp_path / 'nope'), str(tmp_path / 'o'), 'participant']) == EXIT_USAGE


def test_filter_file(bids, tmp_path):
    f = tmp_path / 'f.json'
    f.write_text(json.dumps({'t1w': {'acquisition': 'mprage'}}))
    opts = parse_args([str(bids), str(tmp_path / 'o'), 'participant', '--bids-filter-file',
                       str(f)])
    assert opts.bids_filters == {'t1w': {'acquisition': 'mprage'}}
    f.write_text('{not json')
    with pytest.raises(KeyprepError) as err:
        parse_args([str(bids), str(tmp_path / 'o'), 'participant', '--bids-filter-file', str(f)])
    assert err.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize('value, gb', [('1024', 1.0), ('2G', 2.0), ('2GB', 2.0), ('0.5T', 512.0)])
def test_parse_mem(value, gb):
    assert parse_mem(value) == pytest.approx(gb)


@pytest.mark.parametrize('args, mode, method', [
    ([], 'auto', 'deepbet'),
    (['--skull-strip', 'synth'], 'auto', 'synth'),
    (['--skull-strip', 'synth', '--skull-strip-method', 'synth'], 'auto', 'synth'),
    (['--skull-strip', 'force', '--skull-strip-method', 'synth'], 'force', 'synth'),
    (['--skull-strip-method', 'synth'], 'auto', 'synth'),
    (['--skull-strip', 'skip'], 'skip', 'deepbet'),
])
def test_skull_strip_choices(bids, tmp_path, args, mode, method):
    opts = parse_args([str(bids), str(tmp_path / 'o'), 'participant', *args])
    assert (opts.skull_strip, opts.skull_strip_method) == (mode, method)


@pytest.mark.parametrize('args', [
    ['--skull-strip', 'synth', '--skull-strip-method', 'deepbet'],
    ['--skull-strip', 'skip', '--skull-strip-method', 'synth'],
])
def test_contradictory_skull_strip_options(bids, tmp_path, args):
    assert run([str(bids), str(tmp_path / 'out'), 'participant', *args]) == EXIT_USAGE


def test_help_documents_skull_strip_synth(capsys):
    assert run(['--help']) == 0
    text = ' '.join(capsys.readouterr().out.split())
    assert '{auto,force,skip,synth}' in text and "label network's brain mask" in text


def test_ants_options_reach_every_ants_engine(bids, tmp_path):
    base = [str(bids), str(tmp_path / 'out'), 'participant']
    assert not any(n.startswith('ants') for n in parse_args(base).engine_params)
    opts = parse_args(base + ['--ants-preset', 'syn', '--ants-metric-masks'])
    for name in ('antsRigid', 'antsAffine', 'antsSyN'):
        assert opts.engine_params[name] == {'preset': 'syn', 'masks': True}
    assert not any(n.startswith('keymorph') and 'preset' in p
                   for n, p in opts.engine_params.items())
