"""Trial of int8 static quantisation of the exported model (ONNX Runtime), against fp32.

Quantises the cached fp32 export (QDQ, per-channel int8 weights, uint8 activations, MinMax
calibration on --calib pool photos spread over the pool's three sources), then scores --n other
pool photos with both and reports Spearman rho between them, the largest score difference and
images/s. The acceptance bar (issue 12): rho >= 0.995 on 500 photos and withheld-style
validation (LNSIM folds, cdm_dev) within 0.005 of fp32; --cdm also reports rho against the
cdm_dev labels for both.

    .venv/bin/python bench/int8_trial.py --calib 32 --n 500 --ops Conv --out /tmp/int8

Calibration keeps every intermediate tensor of every batch in memory (ONNX Runtime's MinMax
calibrator; its CalibMaxIntermediateOutputs option drops data in onnxruntime 1.32), about
0.7 GB per 4 photos at 192 px for ResNet-152.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "resmemnet-default.json"))
    ap.add_argument("--calib", type=int, default=32, help="calibration photos")
    ap.add_argument("--n", type=int, default=500, help="photos compared")
    ap.add_argument("--ops", default="Conv", help="op types to quantise (comma list; empty: all)")
    ap.add_argument("--cdm", action="store_true", help="also score cdm_dev (512 photos with labels)")
    ap.add_argument("--out", default="/tmp/resmemnet-int8", help="folder for the int8 model and results")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from scipy.stats import spearmanr

    from model.checkpoint import read_meta
    from model.export import INPUT_NAME, cached_onnx
    from model.preprocess import decode_image

    pre = read_meta(args.weights).preprocessing
    load = lambda p: pre.image_to_tensor(decode_image(p)).numpy()  # noqa: E731
    files = sorted(str(p) for p in (SHARED / "pool").glob("*.jpg"))
    step = max(1, len(files) // args.calib)
    calib = files[1::step][: args.calib]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    int8_path = out / "model.int8.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calib), 4))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {INPUT_NAME: np.stack([load(p) for p in calib[start:start + 4]])}

    started = time.perf_counter()
    ops = [o for o in args.ops.split(",") if o] or None
    quantize_static(str(cached_onnx(args.weights).path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=ops)
    print(f"quantised in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    sessions = {}
    for name, path in (("fp32", cached_onnx(args.weights).path), ("int8", int8_path)):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def score(paths):
        scores = {k: [] for k in sessions}
        seconds = {k: 0.0 for k in sessions}
        with ThreadPoolExecutor(2) as pool:
            for i in range(0, len(paths), 16):
                x = np.stack(list(pool.map(load, paths[i:i + 16])))
                for k, s in sessions.items():
                    t = time.perf_counter()
                    scores[k].extend(s.run(None, {INPUT_NAME: x})[0].tolist())
                    seconds[k] += time.perf_counter() - t
        return {k: np.array(v) for k, v in scores.items()}, {k: len(paths) / v for k, v in seconds.items()}

    held_out = [p for p in files[0::5] if p not in set(calib)][: args.n]
    scores, rates = score(held_out)
    result = {"calibration_photos": len(calib), "ops": ops, "n": len(held_out),
              "rho_int8_vs_fp32": float(spearmanr(scores["fp32"], scores["int8"])[0]),
              "max_abs_diff": float(np.abs(scores["fp32"] - scores["int8"]).max()),
              "forward_images_per_s": {k: round(v, 2) for k, v in rates.items()}}
    if args.cdm:
        rows = list(csv.DictReader(open(SHARED / "cdm_dev" / "scores.csv")))
        cdm, _ = score([str(SHARED / "cdm_dev" / r["path"]) for r in rows])
        labels = np.array([float(r["score"]) for r in rows])
        result["cdm_dev_rho"] = {k: float(spearmanr(v, labels)[0]) for k, v in cdm.items()}
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
