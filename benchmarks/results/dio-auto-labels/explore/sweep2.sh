#!/bin/bash
while pgrep -f sweep1.sh > /dev/null; do sleep 10; done
L0='"representations": ["diffeo"], "label_weight": 0'
NAME=f_lw0_pat0 PAT=0 DIOP="{\"dio\": {$L0}}" bash run.sh
NAME=f_lw0_tol1e5 TOL=1e-5 DIOP="{\"dio\": {$L0}}" bash run.sh
NAME=f_lw0_tol1e5_sv05 TOL=1e-5 SV=0.5 DIOP="{\"dio\": {$L0}}" bash run.sh
echo SWEEP2DONE
