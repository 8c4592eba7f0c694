"""keyprep.pipeline.resources: the glibc allocator setting, measured in fresh processes."""
import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import json, resource
    import torch
    from keyprep.pipeline.resources import tune_allocator
    tuned = tune_allocator()
    assert tune_allocator() is tuned  # idempotent
    faults = []
    for _ in range(32):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 2**20)  # 64 MiB: above glibc's default mmap threshold
        t.fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sum(faults[16:])  # the steady state: the last 16 allocations
    print(json.dumps({'tuned': tuned, 'faults': faults}))
''')


def _run(setting: str) -> dict:
    env = {'KEYPREP_MALLOC_TUNING': setting, 'PATH': '/usr/bin:/bin'}
    out = subprocess.run([sys.executable, '-c', CHILD], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc setting (Linux)')
def test_tune_allocator_reuses_freed_blocks():
    """32 allocations of 64 MiB in a row. With the setting, glibc's heap grows for the first
    few (1 to 8 in repeated runs, until freed blocks merge) and then reuses the freed block:
    the last 16 fault in (almost) no page. Without it, every allocation is a fresh mmap
    faulted in again."""
    on, off = _run('1'), _run('0')
    assert on['tuned'] is True
    assert off['tuned'] is False
    pages = 64 * 2**20 // 4096
    assert off['faults'] >= 15 * pages, off
    assert on['faults'] <= pages // 4, on
