"""Runs a model `cifar-df export-model` wrote in onnxruntime, the independent reference.

usage: onnx_export_check.py MODEL.onnx IMAGES.u8 N OUT.json [SIDE]

IMAGES.u8 holds N images in CIFAR order (3 planes of SIDE x SIDE bytes each, R, G, B;
SIDE 32 by default), which is already [N, 3, SIDE, SIDE]; the model is fed them as float32 in [0, 1]. The model is first
checked by onnx's own checker. OUT.json gets every output (flattened) and the metadata.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

model_path, images_path, n, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
side = int(sys.argv[5]) if len(sys.argv) > 5 else 32
model = onnx.load(model_path)
onnx.checker.check_model(model, full_check=True)
x = np.fromfile(images_path, dtype=np.uint8).reshape(n, 3, side, side).astype(np.float32) / 255.0
sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
outs = sess.run(names, {sess.get_inputs()[0].name: x})
result = {name: np.asarray(v, dtype=np.float64).ravel().tolist() for name, v in zip(names, outs)}
result["shapes"] = {name: list(v.shape) for name, v in zip(names, outs)}
result["input"] = {"name": sess.get_inputs()[0].name, "shape": [str(d) for d in sess.get_inputs()[0].shape]}
result["metadata"] = {p.key: p.value for p in model.metadata_props}
result["opset"] = model.opset_import[0].version
# One image alone gives the same answer as in the batch (nothing mixes images).
one = sess.run(["probabilities"], {sess.get_inputs()[0].name: x[:1]})[0]
result["alone_diff"] = float(np.abs(one[0] - outs[names.index("probabilities")][0]).max())
with open(out_path, "w") as f:
    json.dump(result, f)
