#!/usr/bin/env python3
"""A ResNet-18-shaped ONNX model with random weights, for timing `--extractor onnx:` side by
side with onnxruntime (no pretrained weights are downloadable here; the cost per image is
what a real ResNet-18 costs, the accuracy is not).

    python3 benches/onnx_resnet.py build resnet18.onnx [SIZE]
        Writes the model: input "image" [N, 3, SIZE, SIZE] (224), a 7x7/2 stem, max pool,
        4 stages of 2 basic blocks (64, 128, 256, 512 channels, batch norm, residuals),
        global average pool "pool" -> [N, 512, 1, 1], a 1000-way "fc".

    python3 benches/onnx_resnet.py time resnet18.onnx DATA_DIR N
        onnxruntime on the first N test images of DATA_DIR (cifar-10-batches-bin): resize
        (ONNX Resize, linear, half_pixel), ImageNet normalisation, the model up to "pool";
        prints images/s with all cores and with one.
"""
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)
nodes, inits = [], []
counter = [0]


def name(prefix):
    counter[0] += 1
    return f"{prefix}{counter[0]}"


def conv_bn(x, cin, cout, k, stride, relu=True):
    w, s, b, m, v = (name(p) for p in ("w", "s", "b", "m", "v"))
    inits.extend([
        numpy_helper.from_array(rng.normal(0, (2.0 / (cin * k * k)) ** 0.5,
                                           (cout, cin, k, k)).astype(np.float32), w),
        numpy_helper.from_array(rng.uniform(0.5, 1.0, cout).astype(np.float32), s),
        numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), b),
        numpy_helper.from_array(np.zeros(cout, np.float32), m),
        numpy_helper.from_array(np.ones(cout, np.float32), v),
    ])
    c, y = name("conv"), name("bn")
    nodes.append(helper.make_node("Conv", [x, w], [c], name=c, strides=[stride, stride],
                                  pads=[k // 2] * 4))
    nodes.append(helper.make_node("BatchNormalization", [c, s, b, m, v], [y], name=y))
    if not relu:
        return y
    r = name("relu")
    nodes.append(helper.make_node("Relu", [y], [r], name=r))
    return r


def block(x, cin, cout, stride):
    y = conv_bn(x, cin, cout, 3, stride)
    y = conv_bn(y, cout, cout, 3, 1, relu=False)
    short = x if (cin == cout and stride == 1) else conv_bn(x, cin, cout, 1, stride, relu=False)
    a, r = name("add"), name("relu")
    nodes.append(helper.make_node("Add", [y, short], [a], name=a))
    nodes.append(helper.make_node("Relu", [a], [r], name=r))
    return r


def build(path, size):
    x = conv_bn("image", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["mp"], name="maxpool", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "mp", 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        x = block(x, cin, cout, stride)
        x = block(x, cout, cout, 1)
        cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.02, (1000, 512)).astype(np.float32),
                                         "fc_w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def timing(path, data, n):
    raw = np.fromfile(f"{data}/cifar-10-batches-bin/test_batch.bin", np.uint8)
    raw = raw.reshape(-1, 3073)[:n, 1:].reshape(n, 3, 32, 32)
    model = onnx.load(path)
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    model.graph.output.append(helper.make_empty_tensor_value_info("pool"))
    pre = helper.make_graph(
        [helper.make_node("Cast", ["raw"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Resize", ["f", "", "", "sizes"], ["r"], mode="linear",
                          coordinate_transformation_mode="half_pixel"),
         helper.make_node("Div", ["r", "k"], ["u"]),
         helper.make_node("Sub", ["u", "mean"], ["c"]),
         helper.make_node("Div", ["c", "std"], ["out"])], "pre",
        [helper.make_tensor_value_info("raw", TensorProto.UINT8, [None, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([16, 3, size, size], np.int64), "sizes"),
         numpy_helper.from_array(np.float32(255.0), "k"),
         numpy_helper.from_array(np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1),
                                 "mean"),
         numpy_helper.from_array(np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1),
                                 "std")])
    pm = helper.make_model(pre, opset_imports=[helper.make_opsetid("", 13)])
    pm.ir_version = 8
    for threads in (0, 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        ps = ort.InferenceSession(pm.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        t = time.perf_counter()
        for i in range(0, n, 16):
            x = ps.run(["out"], {"raw": raw[i:i + 16]})[0]
            sess.run(["pool"], {"image": x})
        dt = time.perf_counter() - t
        label = "all cores" if threads == 0 else "1 thread"
        print(f"onnxruntime ({label}): {n} images in {dt:.1f} s, {n / dt:.1f} images/s")


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 224)
    elif sys.argv[1] == "time":
        timing(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
