"""A benchmark script (``SCRIPT``, default ``run_registration_benchmark.py``) with DIO's
working grid set to ``RES`` mm (environment variable) instead of the network's 2 mm: an
experiment on whether the finer grid closes the gap to antsSyN (not an engine parameter).

    RES=1 python bench_res.py --resolution 1 --pairs field --methods dio ...
"""
import os
import runpy
import sys
from pathlib import Path

import keyprep.pipeline.dio.register as R

_register = R.register_arrays


def register_at(*args, **kwargs):
    return _register(*args, **{**kwargs, 'res_mm': float(os.environ['RES'])})


R.register_arrays = register_at
script = (Path(__file__).resolve().parents[2]
          / os.environ.get('SCRIPT', 'run_registration_benchmark.py'))
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name='__main__')
