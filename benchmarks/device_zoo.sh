#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no network, torch/onnx/onnxruntime preinstalled):
# builds the CIFAR-10 ResNet-18 (width 16) QCB zoo into $OUT/zoo and times a CUDA conversion.
# Needs the archive copied to .cache/cifar10-jpeg.tar.gz (carried with the working tree).
set -u
ln -sfn ../passes qcb_onnx/passes   # the package-dir mapping of pyproject, without installing
export PYTHONPATH=$PWD
python3 -c "import onnxruntime as o, torch; print('ort', o.__version__, o.get_available_providers(), 'torch', torch.__version__, torch.cuda.is_available())"
OUT=${OUT:-/tmp/out}
timeout 330 python3 benchmarks/make_zoo.py --width 16 --limit 25000 --test-limit 2000 --clean-epochs 15 --epochs 3 \
    --bits 4,8 --attacks quanti,pqbackdoor,compartifact --lr quanti=3e-4,compartifact=3e-4 \
    --cache "$OUT/zoo" --archive .cache/cifar10-jpeg.tar.gz --threads 16 2>&1 | grep -v -e 'it/s' -e Warn
python3 - <<'PY'
import os, numpy as np
from qcb_onnx.redteam.cifar import load_cifar10
x, _ = load_cifar10("train", 1024, 0, archive=".cache/cifar10-jpeg.tar.gz")
np.save(os.environ.get("OUT", "/tmp/out") + "/calib.npy", x)
PY
m="$OUT/zoo/resnet18-w16-s0-quanti-w4pc.onnx"
[ -f "$m" ] && /usr/bin/time -v python3 -m qcb_onnx convert "$m" --calib "$OUT/calib.npy" --out "$OUT/efrap-cuda.onnx" \
    --w-bits 4 --device cuda --providers cpu --quiet 2>&1 | grep -E "wrote|Elapsed|Maximum resident|error"
rm -f "$OUT/calib.npy"
ls -la "$OUT/zoo"
