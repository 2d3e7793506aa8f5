#!/usr/bin/env bash
# The W4 paper table from a clean checkout with ../shared beside it, in one command (CPU, 2 threads):
#
#     bash benchmarks/paper_table.sh [ARCH ...]        # default: resnet18 vgg16
#
# Builds each architecture's CIFAR-10 QCB zoo at width 16 (15 clean epochs on 25,000 images, 3 attack
# epochs, the three attacks against ORT quantize_static W4A8 per channel; cached models are reused),
# then measures FP32, ORT, nearest, AdaRound and EFRAP in ONNX Runtime. Every cell lands in
# benchmarks/results/paper_table/<model>-a8.json. Time on the 2-core CPU: about 45 min per
# architecture (training 30, table 15). The ResNet-18 rows in BENCHMARKS.md were trained on an H200
# with the same recipe (benchmarks/device_zoo.sh); their table was measured on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ZOO=${ZOO:-$HOME/.cache/qcb_onnx/zoo_cpu}
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(resnet18 vgg16)
for arch in "${archs[@]}"; do
    python benchmarks/make_zoo.py --archs "$arch" --width 16 --limit 25000 --test-limit 2000 --clean-epochs 15 \
        --epochs 3 --bits 4 --attacks quanti,pqbackdoor,compartifact --lr quanti=3e-4,compartifact=3e-4 --cache "$ZOO"
done
python benchmarks/paper_table.py --zoo "$ZOO"
