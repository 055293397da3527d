#!/usr/bin/env bash
# One calibration run of the embedded benchmark's difficulty, on Random alone (results/README.md):
# write a dataset with the given difficulty knobs (cohort.py), then finetune Random on it under the
# benchmark's protocol (reproduce.py, SYNTHETIC_FINETUNE: 50 epochs, best epoch on 2 validation
# patients) for M = 2, 6, 10 on folds 0, 1, 2; the rows go to results/calibration/NAME.csv.
#   bash results/calibration/calibrate.sh chd chd-v1.0 --variability 1.0
#   bash results/calibration/calibrate.sh mri mri-v1.0 --variability 1.0
set -euo pipefail
cd "$(dirname "$0")/../.."
style=$1 name=$2
shift 2
if [ "$style" = chd ]; then seed=1 preset=synthetic-chd; else seed=0 preset=synthetic-transfer; fi
python data.py make-synthetic "data/calibration/$name" --style "$style" --patients 40 --seed "$seed" "$@"
python reproduce.py --preset "$preset" --methods random --fold-list 0,1,2 --finetune-data "data/calibration/$name" \
    --name "$name" --results results/calibration --runs runs/calibration
