#!/usr/bin/env python3
"""Test-only reference for cifar-df's ONNX extractor (`--extractor onnx:FILE`).

    onnx_reference.py build DIR
        Writes small seeded CNNs built with `onnx.helper` + numpy:
          DIR/cnn.onnx       input "image" float [N, 3, 40, 40] (symbolic batch), a ResNet-like
                             stem: Conv+BatchNorm+Relu, a residual block, MaxPool, Conv (stride 2),
                             GlobalAveragePool, Flatten, Gemm -> "logits" [N, 10]
          DIR/nhwc.onnx      input "pixels" float [1, 24, 24, 3] (fixed batch, channels last),
                             Transpose, Conv, Relu -> "act" [1, 6, 24, 24] (spatial output)
          DIR/vector.onnx    input "x" float [N, 10]: not an image
        and prints the node names of cnn.onnx, one per line.

    onnx_reference.py features MODEL.onnx IMAGES.u8 OUT.f32 [--node NAME] [--mean a,b,c]
                      [--std a,b,c] [--size S]
        The features cifar-df must give, computed by onnxruntime alone: IMAGES.u8 holds n
        images of 3072 bytes (CIFAR layout: red, green, blue planes of 32x32). A preprocessing
        graph run by onnxruntime casts them to float, resizes them to the model's input with
        ONNX `Resize` (linear, half_pixel), divides by 255 and normalises by mean/std
        (ImageNet's by default), then transposes to channels-last when the model wants that.
        The model runs in onnxruntime with NAME's output (default: the model's output) added
        as a graph output; an output of rank > 2 is averaged over its axes from 2 on. Writes
        n x D float32 little-endian to OUT.f32 and prints "features: n x D".
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def conv_weights(rng, out_c, in_c, k):
    return rng.normal(0.0, (2.0 / (in_c * k * k)) ** 0.5, size=(out_c, in_c, k, k))


def build_cnn(path):
    rng = np.random.default_rng(7)
    inits = [
        init("c1_w", conv_weights(rng, 8, 3, 3)),
        init("c1_b", rng.normal(0, 0.1, 8)),
        init("bn_scale", rng.uniform(0.5, 1.5, 8)),
        init("bn_bias", rng.normal(0, 0.1, 8)),
        init("bn_mean", rng.normal(0, 0.1, 8)),
        init("bn_var", rng.uniform(0.5, 1.5, 8)),
        init("r1_w", conv_weights(rng, 8, 8, 3)),
        init("r2_w", conv_weights(rng, 8, 8, 3)),
        init("c2_w", conv_weights(rng, 16, 8, 3)),
        init("c2_b", rng.normal(0, 0.1, 16)),
        init("fc_w", rng.normal(0, 0.25, (10, 16))),
        init("fc_b", rng.normal(0, 0.1, 10)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1_w", "c1_b"], ["c1"], name="stem_conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                         ["bn"], name="stem_bn", epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["stem"], name="stem_relu"),
        helper.make_node("Conv", ["stem", "r1_w"], ["r1"], name="block_conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["r1"], ["r1a"], name="block_relu1"),
        helper.make_node("Conv", ["r1a", "r2_w"], ["r2"], name="block_conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r2", "stem"], ["res"], name="block_add"),
        helper.make_node("Relu", ["res"], ["block"], name="block_relu"),
        helper.make_node("MaxPool", ["block"], ["pool"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["pool", "c2_w", "c2_b"], ["c2"], name="conv2",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["features"], name="conv2_relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 40, 40])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    save(graph, path)
    return [n.name for n in nodes]


def build_nhwc(path):
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Transpose", ["pixels"], ["chw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["chw", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["act"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "nhwc",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 24, 24, 3])],
        [helper.make_tensor_value_info("act", TensorProto.FLOAT, [1, 6, 24, 24])],
        [init("w", conv_weights(rng, 6, 3, 3)), init("b", rng.normal(0, 0.1, 6))],
    )
    save(graph, path)


def build_vector(path):
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "vector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [init("w", rng.normal(0, 1, (4, 10)))],
    )
    save(graph, path)


def save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cifar-df tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def preprocess(images, size_hw, mean, std, channels_last):
    """u8 [n, 3, 32, 32] -> the model's float input, by an onnxruntime graph."""
    n = images.shape[0]
    h, w = size_hw
    shape = [n, 3, h, w]
    nodes = [
        helper.make_node("Cast", ["raw"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Resize", ["f", "", "", "sizes"], ["r"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Div", ["r", "k255"], ["u"]),
        helper.make_node("Sub", ["u", "mean"], ["c"]),
        helper.make_node("Div", ["c", "std"], ["out" if not channels_last else "nchw"]),
    ]
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["nchw"], ["out"], perm=[0, 2, 3, 1]))
    inits = [
        numpy_helper.from_array(np.array(shape, dtype=np.int64), "sizes"),
        init("k255", 255.0),
        init("mean", np.array(mean).reshape(1, 3, 1, 1)),
        init("std", np.array(std).reshape(1, 3, 1, 1)),
    ]
    graph = helper.make_graph(
        nodes, "pre",
        [helper.make_tensor_value_info("raw", TensorProto.UINT8, [n, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["out"], {"raw": images})[0]


def features(model_path, images_path, out_path, node=None, mean=None, std=None, size=None):
    model = onnx.load(model_path)
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inp.type.tensor_type.shape.dim]
    channels_last = dims[1] != 3 and dims[3] == 3
    hw = (dims[1], dims[2]) if channels_last else (dims[2], dims[3])
    if hw[0] is None:
        hw = (size, size)
    raw = np.fromfile(images_path, dtype=np.uint8).reshape(-1, 3, 32, 32)
    x = preprocess(raw, hw, mean or IMAGENET_MEAN, std or IMAGENET_STD, channels_last)

    # The wanted tensor: a node's first output, or a tensor's own name; made a graph output.
    name = model.graph.output[0].name
    if node is not None:
        by_node = [n.output[0] for n in model.graph.node if n.name == node]
        name = by_node[0] if by_node else node
    if name not in [o.name for o in model.graph.output]:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = dims[0]
    outs = []
    step = batch if batch else len(x)
    for i in range(0, len(x), step):
        outs.append(sess.run([name], {inp.name: x[i:i + step]})[0])
    y = np.concatenate(outs).astype(np.float64)
    if y.ndim > 2:
        y = y.mean(axis=tuple(range(2, y.ndim)))
    y = y.astype(np.float32)
    y.tofile(out_path)
    print(f"features: {y.shape[0]} x {y.shape[1]}")


def floats(text):
    return [float(v) for v in text.split(",")]


def main(argv):
    if argv[1] == "build":
        d = argv[2]
        for name in build_cnn(f"{d}/cnn.onnx"):
            print(name)
        build_nhwc(f"{d}/nhwc.onnx")
        build_vector(f"{d}/vector.onnx")
    elif argv[1] == "features":
        opts = {}
        rest = argv[5:]
        for flag, value in zip(rest[::2], rest[1::2]):
            key = flag.lstrip("-")
            opts[key] = {"node": str, "mean": floats, "std": floats, "size": int}[key](value)
        features(argv[2], argv[3], argv[4], **opts)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
