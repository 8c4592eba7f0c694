import os, runpy, sys
from dataclasses import replace
from pathlib import Path
import keyprep.pipeline.dio.register as R
R.DEFAULT_SOLVER = replace(R.DEFAULT_SOLVER, sigma_velocity=float(os.environ['SV']),
                           sigma_grad=float(os.environ.get('SG', R.DEFAULT_SOLVER.sigma_grad)))
script = Path(__file__).resolve().parents[2] / os.environ.get('SCRIPT', 'run_registration_benchmark.py')
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name='__main__')
