"""``benchmarks/run_intersubject_benchmark.py`` (or the benchmark named by the environment
variable ``SCRIPT``, e.g. ``run_registration_benchmark.py``) with DIO's
``DEFAULT_SOLVER.sigma_velocity`` set from the environment variable ``SV`` (the solver
settings are not engine parameters).

    SV=0.5 python bench_sigma.py --pairs ... --methods dio ...
"""
import os
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import keyprep.pipeline.dio.register as R

R.DEFAULT_SOLVER = replace(R.DEFAULT_SOLVER, sigma_velocity=float(os.environ['SV']))
script = (Path(__file__).resolve().parents[2]
          / os.environ.get('SCRIPT', 'run_intersubject_benchmark.py'))
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name='__main__')
