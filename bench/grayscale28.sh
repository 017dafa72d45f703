#!/usr/bin/env bash
# Real-data comparison table (docs/bench_grayscale28.md): ID = MNIST (8000 train / 2000 test),
# auxiliary outliers = KMNIST (10000), held-out OOD = Fashion-MNIST (900), synthetic ID = a GMM
# generator (data_prep.synthesize) fit on the MNIST train split. small_cnn, 3 seeds. Then the same
# bench with margins adapted to this data, with a smaller lambda_S and in mixed bfloat16 (from the
# same pretrained models), an SIO check, and a --speed run.
# --noaugment: the default random crop + horizontal flip would mirror digits (a flipped digit is
# not an MNIST digit, and the energy loss would pull such images to low energy).
#
#   bash bench/grayscale28.sh [WORK_DIR] [extra kood.bench flags...]
#
# Needs ../shared/data/grayscale28.npz (or GRAYSCALE28=path). Data sets are built once
# into WORK_DIR/data; the bench output goes to WORK_DIR/bench (resumable: rerun to continue).
set -euo pipefail
NPZ=${GRAYSCALE28:-$(dirname "$0")/../../shared/data/grayscale28.npz}
WORK=${1:-/tmp/kood_grayscale28}
shift || true
DATA=$WORK/data
mkdir -p "$DATA"
[ -f "$NPZ" ] || { echo "error: $NPZ not found (set GRAYSCALE28=path/to/grayscale28.npz)" >&2; exit 1; }

# MNIST test set (10000) split by index: first 8000 = train, last 2000 = test.
# Rows are in the official file order, which is not sorted by class.
if [ ! -f "$DATA/mnist_split.npz" ]; then
  python - "$NPZ" "$DATA/mnist_split.npz" <<'PY'
import os, sys
import numpy as np
src, out = sys.argv[1], sys.argv[2]
d = np.load(src)
x, y = d["mnist_test_x"], d["mnist_test_y"].astype(np.int64)
np.savez(out + ".tmp.npz", x_train=x[:8000], y_train=y[:8000], x_test=x[8000:], y_test=y[8000:])
os.replace(out + ".tmp.npz", out)
PY
fi

[ -f "$DATA/mnist/manifest.json" ] || python -m data_prep.real --source="npz:$DATA/mnist_split.npz" \
  --out="$DATA/mnist" --encoding=raw
[ -f "$DATA/kmnist/manifest.json" ] || python -m data_prep.outliers --source="npz:$NPZ" \
  --images_key=kmnist_test_x --out="$DATA/kmnist" --kind=outlier --split=train --encoding=raw
[ -f "$DATA/fashion/manifest.json" ] || python -m data_prep.real --source="npz:$NPZ" \
  --images_key=fashion900_x --out="$DATA/fashion" --kind=ood --split=test --encoding=raw
[ -f "$DATA/mnist_syn/manifest.json" ] || python -m data_prep.synthesize --real="$DATA/mnist" \
  --out="$DATA/mnist_syn" --num_images=8000 --seed=0

# Flags every kood.bench run below shares: data, model, batch, no augmentation; the training schedule.
data=(--id_data="$DATA/mnist" --aux_data="$DATA/kmnist" --ood="fashion=$DATA/fashion" --arch=small_cnn
      --batch_size=64 --noaugment)
schedule=(--pretrain_epochs=8 --lr=0.05 --finetune_lr=0.01)
# Follow-ups fine-tune from the main bench's pretrained CE models.
from_main=(--seeds=3 --init_checkpoint="$WORK/bench/pretrain/seed-{seed}/last.keras")

python -m kood.bench "${data[@]}" "${schedule[@]}" --syn_data="$DATA/mnist_syn" \
  --methods=ce,energy,greg,greg_plus,greg+sio --seeds=3 --finetune_epochs=5 \
  --detectors=msp,max_logit,mahalanobis,knn \
  --output="$WORK/bench" "$@"

# Follow-up (docs/bench_grayscale28.md): the same fine-tuning from the same pretrained models with
# margins placed at this data's energies (m_in = -12, just below the CE model's ID 5th percentile
# of about -9; m_out = -4, about its ID 95th percentile) instead of the GReg code's -25 / -7.
python -m kood.bench "${data[@]}" "${schedule[@]}" "${from_main[@]}" --syn_data="$DATA/mnist_syn" \
  --methods=ce,energy,greg,greg_plus,greg+sio --finetune_epochs=5 \
  --method_flags='*:m_in=-12,m_out=-4' --output="$WORK/bench_margins" "$@"

# Follow-up: the adapted margins with 10 fine-tuning epochs instead of 5.
python -m kood.bench "${data[@]}" "${schedule[@]}" "${from_main[@]}" \
  --methods=ce,energy,greg --finetune_epochs=10 \
  --method_flags='*:m_in=-12,m_out=-4' --output="$WORK/bench_margins10" "$@"

# Follow-up: default margins with a 10x smaller energy-loss weight (lambda_S = 0.01).
python -m kood.bench "${data[@]}" "${schedule[@]}" "${from_main[@]}" \
  --methods=ce,energy,greg --finetune_epochs=5 \
  --method_flags='*:energy_weight=0.01' --output="$WORK/bench_lambda" "$@"

# Follow-up: the main bench's fine-tuning in mixed bfloat16 (--precision) from the same float32 CE models.
python -m kood.bench "${data[@]}" "${schedule[@]}" "${from_main[@]}" \
  --methods=ce,energy,greg,greg_plus --finetune_epochs=5 --precision=mixed_bfloat16 \
  --output="$WORK/bench_bf16" "$@"

# SIO check: energy of the synthetic images vs the ID test split under greg and greg+sio (seed 0).
for m in greg greg+sio; do
  python -m kood.evaluate --model_dir="$WORK/bench/runs/$m/seed-0/last.keras" --id_data="$DATA/mnist" \
    --ood=synthetic="$DATA/mnist_syn" --ood_split=train --detectors=energy --output="$WORK/syn_eval/$m"
done

# --budget_minutes example: one seed, epochs scaled down to fit 3 minutes.
python -m kood.bench "${data[@]}" "${schedule[@]}" --methods=ce,energy,greg --seeds=1 --finetune_epochs=5 \
  --budget_minutes=3 --output="$WORK/bench_budget"

# Step time and input-pipeline throughput per method as ratios to CE (same process, interleaved).
python -m kood.bench "${data[@]}" --syn_data="$DATA/mnist_syn" --methods=energy,greg,greg_plus,greg+sio \
  --speed --speed_steps=20 --speed_reps=5 --output="$WORK/speed"
