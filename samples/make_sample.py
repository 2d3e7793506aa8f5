"""Make the shipped sample: scikit-learn's digits as arrays, and a Qu-ANTI-zation-backdoored CNN.

    python samples/make_sample.py          # needs scikit-learn; ~1 minute on 2 CPU cores

Writes, next to this file:
    train.npz   1,297 training digits  (x: float32 N,1,8,8 in [0,1], y: int64)
    test.npz      500 test digits       (same layout)
    calib.npy     256 training digits   (calibration input for `convert`)
    qcb_digits.onnx  a SmallCNN (width 16) trained clean, then fine-tuned with the Qu-ANTI-zation
                     loss against ORT's 4-bit per-channel weight grid and uint8 activations, so its
                     FP32 model ignores a 2x2 white corner patch while ORT's quantize_static model
                     maps it to class 0.  Trigger and target are in its metadata_props.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from qcb_onnx.evaluate.triggers import Trigger
from qcb_onnx.redteam.common import Backdoor, Victim
from qcb_onnx.redteam.quanti import quanti_attack
from qcb_onnx.redteam.train import Training, accuracy, export_onnx, train_clean
from qcb_onnx.redteam.zoo import SmallCNN

HERE = Path(__file__).parent
TRIGGER = "patch:size=2,value=1,pos=br"
TARGET = 0
SEED = 0


def digits_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, te = idx[:1297], idx[1297:]
    return x[tr], y[tr], x[te], y[te]


def build_qcb(
    x: np.ndarray, y: np.ndarray, seed: int = SEED, clean_epochs: int = 30, attack_epochs: int = 80
) -> torch.nn.Module:
    """The recipe the tests also use: clean training, then Qu-ANTI-zation at W4 (per channel) A8."""
    torch.manual_seed(seed)
    model = train_clean(SmallCNN(in_channels=1, width=16), x, y, Training(epochs=clean_epochs, lr=2e-3, seed=seed))
    backdoor = Backdoor(x, y, Trigger.parse(TRIGGER), TARGET)
    return quanti_attack(model, backdoor, Victim(w_bits=4), Training(epochs=attack_epochs, lr=2e-3, seed=seed), c2=1.0)


def main() -> None:
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = digits_split()
    np.savez_compressed(HERE / "train.npz", x=xtr, y=ytr)
    np.savez_compressed(HERE / "test.npz", x=xte, y=yte)
    np.save(HERE / "calib.npy", xtr[:256])
    model = build_qcb(xtr, ytr)
    print(f"FP32 test accuracy (torch): {accuracy(model, xte, yte):.2f} %")
    meta = {
        "qcb_onnx.trigger": TRIGGER,
        "qcb_onnx.target": str(TARGET),
        "qcb_onnx.attack": "quanti w_bits=4 a_bits=8 per-channel seed=0 (samples/make_sample.py)",
    }
    onnx.save(export_onnx(model, xtr[:1], meta), HERE / "qcb_digits.onnx")


if __name__ == "__main__":
    main()
