#!/bin/bash
# usage: NAME=x [env...] run.sh [extra json for dio params]
cd /work/main/benchmarks; rm -rf /tmp/exp/$NAME; rm -rf /tmp/exp/regwork/res-1_seed-0/runs/*/dio
P=${DIOP:-'{"dio": {"representations": ["diffeo"]}}'}
../.venv/bin/python /tmp/exp/hook.py --resolution 1 --pairs ${PAIRS:-field} --methods dio --engine-params "$P" --threads 1 --out /tmp/exp/$NAME --work-dir /tmp/exp/regwork > /tmp/exp/$NAME.log 2>&1
grep -h "^| field\|^| int060" /tmp/exp/$NAME/registration_benchmark.md | head -3 | sed "s/^/$NAME /"
grep -h "HOOK timings" /tmp/exp/$NAME.log | tail -1
