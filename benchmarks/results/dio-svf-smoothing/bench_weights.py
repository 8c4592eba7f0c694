"""``benchmarks/run_registration_benchmark.py`` with the DIO engine given the weights file
named by the environment variable ``WEIGHTS`` (that benchmark has no engine parameters): how
a training checkpoint, exported with ``keyprep.pipeline.dio.train.export_weights``, does on
the real known-truth pairs.

    WEIGHTS=/tmp/dio-ck.pt python bench_weights.py --resolution 1 --pairs field --methods dio
"""
import os
import runpy
import sys
from pathlib import Path

import keyprep.pipeline.benchmark as B

_register = B.register


def register_with_weights(method, *args, params=None, **kwargs):
    if method == 'dio':
        params = {**(params or {}), 'weights': os.environ['WEIGHTS']}
    return _register(method, *args, params=params, **kwargs)


B.register = register_with_weights
script = Path(__file__).resolve().parents[2] / 'run_registration_benchmark.py'
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name='__main__')
