"""Small models of the kinds issue 11 names, built here (nothing downloaded).

Keras: a squeeze-and-excite CNN, a transformer encoder on int64 tokens, a grayscale
Sequential CNN (tf2onnx turns its one-channel layout Transpose into a Reshape). ONNX
(onnx.helper): a batch-1 export, a ``-1``-dim export, a time-major LSTM with its state
batched on axis 1, a model with a per-request scalar input, attention blocks reshaping to
a batch size computed once at the input (as tf2onnx writes ``tf.shape(x)[0]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def se_cnn() -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    x = inp = keras.Input(shape=(32, 32, 3), name="image")
    for i, ch in enumerate((16, 24, 32, 48)):
        x = layers.Conv2D(ch, 3, strides=2 if i else 1, padding="same", activation="relu",
                          name=f"conv{i}")(x)
        s = layers.GlobalAveragePooling2D(name=f"se{i}_pool")(x)
        s = layers.Dense(ch // 4, activation="relu", name=f"se{i}_reduce")(s)
        s = layers.Dense(ch, activation="sigmoid", name=f"se{i}_expand")(s)
        s = layers.Reshape((1, 1, ch), name=f"se{i}_reshape")(s)
        x = layers.Multiply(name=f"se{i}_scale")([x, s])
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    out = layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="se_cnn")


def transformer() -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(4)
    seq, dim = 16, 32
    tokens = keras.Input(shape=(seq,), dtype="int64", name="tokens")
    x = layers.Embedding(100, dim, name="embed")(tokens)
    for i in range(3):
        att = layers.MultiHeadAttention(4, dim // 4, name=f"block{i}_attention")(x, x)
        x = layers.LayerNormalization(name=f"block{i}_norm1")(x + att)
        ff = layers.Dense(64, activation="relu", name=f"block{i}_ff1")(x)
        ff = layers.Dense(dim, name=f"block{i}_ff2")(ff)
        x = layers.LayerNormalization(name=f"block{i}_norm2")(x + ff)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    out = layers.Dense(3, activation="softmax", name="label")(x)
    return keras.Model(tokens, out, name="transformer")


def gray_cnn() -> Any:
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1), name="digit"),
        layers.Conv2D(16, 3, activation="relu", name="conv1"),
        layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(32, 3, activation="relu", name="conv2"),
        layers.MaxPooling2D(name="pool2"),
        layers.Flatten(name="flat"),
        layers.Dense(64, activation="relu", name="fc"),
        layers.Dense(10, activation="softmax", name="probs"),
    ], name="gray_cnn")


def _weights(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto],
           name: str) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _mlp_nodes(x: str, width: int, layers: int, out: str, prefix: str = "fc"
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    n = helper.make_node
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = x
    for i in range(layers):
        w, b, m, a, h = (f"{prefix}{i}_{s}" for s in "wbmah")
        inits += [_weights(w, (width, width), i), _weights(b, (width,), 50 + i)]
        nodes += [n("MatMul", [cur, w], [m]), n("Add", [m, b], [a]),
                  n("Tanh", [a], [h if i < layers - 1 else out])]
        cur = h
    return nodes, inits


def batch_one(*, hard_coded: bool = False) -> onnx.ModelProto:
    """A zoo-style export: batch fixed at 1; ``hard_coded``: a Reshape to [1, 32] inside."""
    nodes, inits = _mlp_nodes("flat", 32, 6, "y")
    target = [1, 32] if hard_coded else [-1, 32]
    inits.append(numpy_helper.from_array(np.array(target, np.int64), "target"))
    nodes.insert(0, helper.make_node("Reshape", ["x", "target"], ["flat"], name="flatten"))
    return _model(nodes, [helper.make_tensor_value_info("x", F, [1, 4, 8])],
                  [helper.make_tensor_value_info("y", F, [1, 32])], inits, "batch_one")


def minus_one_dims() -> onnx.ModelProto:
    """Dynamic dimensions written as -1 (some exporters do)."""
    nodes, inits = _mlp_nodes("x", 16, 5, "y")
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [-1, 16])],
                   [helper.make_tensor_value_info("y", F, [-1, 16])], inits, "minus_one")
    return model


def time_major_lstm(hidden: int = 8, features: int = 6) -> onnx.ModelProto:
    """x [time, batch, features] and state [1, batch, hidden]: two stacked LSTMs (their
    tensors time-major), then a dense head on the last hidden state."""
    n = helper.make_node
    h = hidden
    inits = [_weights("W1", (1, 4 * h, features), 1), _weights("R1", (1, 4 * h, h), 2),
             _weights("W2", (1, 4 * h, h), 3), _weights("R2", (1, 4 * h, h), 4),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [
        n("LSTM", ["x", "W1", "R1", "", "", "state"], ["y1", "yh1"], hidden_size=h, name="lstm1"),
        n("Squeeze", ["y1", "axis1"], ["seq1"], name="squeeze1"),
        n("LSTM", ["seq1", "W2", "R2", "", "", "state"], ["", "yh2"], hidden_size=h, name="lstm2"),
        n("Squeeze", ["yh2", "axis0"], ["last"], name="squeeze2"),
    ]
    head, head_inits = _mlp_nodes("last", h, 4, "y")
    return _model(nodes + head,
                  [helper.make_tensor_value_info("x", F, ["time", "batch", features]),
                   helper.make_tensor_value_info("state", F, [1, "batch", h])],
                  [helper.make_tensor_value_info("y", F, ["batch", h]),
                   helper.make_tensor_value_info("yh1", F, [1, "batch", h])],
                  inits + head_inits, "lstm")


def per_request_scalar() -> onnx.ModelProto:
    """y = tanh(x W) * gain + bias: ``gain`` a scalar input, one per request."""
    nodes, inits = _mlp_nodes("x", 16, 4, "h")
    nodes += [helper.make_node("Mul", ["h", "gain"], ["scaled"]),
              helper.make_node("Add", ["scaled", "fc0_b"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 16]),
                          helper.make_tensor_value_info("gain", F, [])],
                  [helper.make_tensor_value_info("y", F, ["N", 16])], inits, "scalar")


def _conv(name: str, x: str, ch_in: int, ch_out: int, seed: int
          ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    w = _weights(f"{name}_w", (ch_out, ch_in, 3, 3), seed)
    return ([helper.make_node("Conv", [x, w.name], [f"{name}_c"], pads=[1, 1, 1, 1],
                              name=name),
             helper.make_node("Relu", [f"{name}_c"], [f"{name}_out"], name=f"{name}_relu")],
            [w])


def yolo_head(blocks: int = 6) -> onnx.ModelProto:
    """A detection head at a fixed 16x16: the grid size (Shape -> Gather -> Mul) is made at
    the start and read by the final Reshape, living across every conv in between."""
    n = helper.make_node
    i64 = lambda v, name: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [n("Shape", ["image"], ["in_shape"], name="in_shape"),
             n("Concat", ["minus_one", "eight", "hw"], ["shape"], axis=0, name="grid_shape"),
             n("Gather", ["in_shape", "two"], ["h"], axis=0, name="grid_h"),
             n("Gather", ["in_shape", "three"], ["w"], axis=0, name="grid_w"),
             n("Mul", ["h", "w"], ["cells"], name="grid_cells"),
             n("Concat", ["minus_one", "eight", "cells"], ["target"], axis=0, name="target")]
    inits = [i64([2], "two"), i64([3], "three"), i64([-1], "minus_one"), i64([8], "eight"),
             i64([16, 16], "hw")]
    x, ch = "image", 3
    for b in range(blocks):
        more, w = _conv(f"block{b}", x, ch, 8, 10 + b)
        nodes += more
        inits += w
        x, ch = f"block{b}_out", 8
        if b == 0:  # an early reader of the grid size too: it is made here, read at the end
            nodes += [n("Reshape", [x, "target"], ["flat0"], name="flat0"),
                      n("Softmax", ["flat0"], ["soft0"], axis=2, name="soft0"),
                      n("Reshape", ["soft0", "shape"], ["block0_sm"], name="unflat0")]
            x = "block0_sm"
    nodes.append(n("Reshape", [x, "target"], ["boxes"], name="to_boxes"))
    return _model(nodes, [helper.make_tensor_value_info("image", F, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("boxes", F, ["N", 8, 256])], inits, "yolo")


def top_level_if(*, by_data: bool = False) -> onnx.ModelProto:
    """The whole model inside one top-level If (5 top-level nodes). Its condition is a
    plan-time constant (the feature width > 8), or, ``by_data``, the sign of the input."""
    n = helper.make_node
    then_nodes, then_inits = _mlp_nodes("x", 16, 6, "then_y", prefix="then")
    else_nodes, else_inits = _mlp_nodes("x", 16, 2, "else_y", prefix="else")
    then_g = helper.make_graph(then_nodes, "then", [],
                               [helper.make_tensor_value_info("then_y", F, None)], then_inits)
    else_g = helper.make_graph(else_nodes, "else", [],
                               [helper.make_tensor_value_info("else_y", F, None)], else_inits)
    if by_data:
        head = [n("ReduceSum", ["x"], ["total"], keepdims=0, name="total"),
                n("Greater", ["total", "zero_f"], ["cond"], name="decide")]
        inits = [numpy_helper.from_array(np.array(0, np.float32), "zero_f")]
    else:
        head = [n("Shape", ["x"], ["shape"], name="shape"),
                n("Gather", ["shape", "one"], ["width"], axis=0, name="width"),
                n("Greater", ["width", "eight"], ["cond"], name="decide")]
        inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
                 numpy_helper.from_array(np.array(8, np.int64), "eight")]
    nodes = [*head, n("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g,
                      name="main_if")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 16])],
                  [helper.make_tensor_value_info("y", F, ["N", 16])], inits, "wrapped")


def two_towers() -> Any:
    """Two conv towers on one image (tf2onnx's shared layout Transpose is named after one)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    img = keras.Input(shape=(16, 16, 3), name="image")
    towers = []
    for t in ("towerA", "towerB"):
        x = img
        for i in range(3):
            x = layers.Conv2D(8, 3, padding="same", activation="relu", name=f"{t}_conv{i}")(x)
        towers.append(layers.GlobalAveragePooling2D(name=f"{t}_pool")(x))
    joined = layers.Concatenate(name="join")(towers)
    out = layers.Dense(4, name="head")(joined)
    return keras.Model(img, out, name="two_towers")


def dynamic_image() -> onnx.ModelProto:
    """A conv net on ``[N, 3, height, width]`` images: its cost depends on the size."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x, ch = "image", 3
    for b in range(4):
        more, w = _conv(f"c{b}", x, ch, 8, 20 + b)
        nodes += more
        inits += w
        x, ch = f"c{b}_out", 8
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    return _model(nodes, [helper.make_tensor_value_info("image", F, ["N", 3, "height", "width"])],
                  [helper.make_tensor_value_info("pooled", F, ["N", 8, 1, 1])], inits, "dyn")


def computed_batch_attention(blocks: int = 4, seq: int = 8, heads: int = 2,
                             dh: int = 8, *, dynamic_seq: bool = False) -> onnx.ModelProto:
    """Self-attention blocks as tf2onnx writes a hand-written Keras attention with a dynamic
    batch: ``b = tf.shape(x)[0]`` taken once at the model input (Shape -> Cast -> Slice ->
    Cast), every block's head split and merge a Reshape to ``Concat(b, ...)`` and the
    model's mask an Expand to ``[b, 1, seq, seq]``. The batch size lives from the first
    node to the last; it changes with the batch, so it is no plan-time constant.
    ``dynamic_seq``: the sequence length is symbolic too (taken with the batch, slice
    ``[0:2]``; no mask)."""
    n = helper.make_node
    dim = heads * dh
    i64 = lambda v, name: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [n("Shape", ["x"], ["x_shape"], name="Shape__5"),
             n("Cast", ["x_shape"], ["x_shape_i32"], to=TensorProto.INT32, name="Cast__6"),
             n("Slice", ["x_shape_i32", "zero", "one"], ["b_i32"], name="strided_slice__9"),
             n("Cast", ["b_i32"], ["b"], to=TensorProto.INT64, name="Cast__10"),
             n("Concat", ["b", "split_dims"], ["split_shape"], axis=0, name="stack__12"),
             n("Concat", ["b", "merge_dims"], ["merge_shape"], axis=0, name="stack_1__14"),
             n("Concat", ["b", "mask_dims"], ["mask_shape"], axis=0, name="stack_2__16")]
    if dynamic_seq:  # b is [batch, seq] here
        nodes[2] = n("Slice", ["x_shape_i32", "zero", "two"], ["b_i32"], name="strided_slice__9")
        nodes.pop()
    inits = [i64([0], "zero"), i64([1], "one"), i64([2], "two"),
             i64([heads, dh] if dynamic_seq else [seq, heads, dh], "split_dims"),
             i64([dim] if dynamic_seq else [seq, dim], "merge_dims"),
             i64([1, seq, seq], "mask_dims"),
             numpy_helper.from_array(np.triu(np.full((seq, seq), -1e4, np.float32), 1), "causal"),
             numpy_helper.from_array(np.array(dh ** -0.5, np.float32), "scale")]
    x = "x"
    for i in range(blocks):
        p = f"block{i}"
        for w in "qkvo":
            inits.append(_weights(f"{p}_W{w}", (dim, dim), 10 * i + "qkvo".index(w)))
        nodes += [n("MatMul", [x, f"{p}_W{w}"], [f"{p}_{w}"], name=f"{p}/MatMul_{w}")
                  for w in "qkv"]
        for w in "qkv":
            nodes += [n("Reshape", [f"{p}_{w}", "split_shape"], [f"{p}_{w}4"],
                        name=f"{p}/Reshape_{w}"),
                      n("Transpose", [f"{p}_{w}4"], [f"{p}_{w}h"],
                        perm=[0, 2, 3, 1] if w == "k" else [0, 2, 1, 3],
                        name=f"{p}/transpose_{w}")]
        nodes += [n("MatMul", [f"{p}_qh", f"{p}_kh"], [f"{p}_s"], name=f"{p}/MatMul_s"),
                  n("Mul", [f"{p}_s", "scale"], [f"{p}_ss" if dynamic_seq else f"{p}_sm"],
                    name=f"{p}/mul")]
        if not dynamic_seq:
            nodes += [n("Expand", ["causal", "mask_shape"], [f"{p}_mask"],
                        name=f"{p}/BroadcastTo"),
                      n("Add", [f"{p}_sm", f"{p}_mask"], [f"{p}_ss"], name=f"{p}/add_mask")]
        nodes += [n("Softmax", [f"{p}_ss"], [f"{p}_a"], axis=-1, name=f"{p}/Softmax"),
                  n("MatMul", [f"{p}_a", f"{p}_vh"], [f"{p}_c"], name=f"{p}/MatMul_c"),
                  n("Transpose", [f"{p}_c"], [f"{p}_ct"], perm=[0, 2, 1, 3],
                    name=f"{p}/transpose_c"),
                  n("Reshape", [f"{p}_ct", "merge_shape"], [f"{p}_m"], name=f"{p}/Reshape_m"),
                  n("MatMul", [f"{p}_m", f"{p}_Wo"], [f"{p}_o"], name=f"{p}/MatMul_o"),
                  n("Add", [x, f"{p}_o"], [f"{p}_r"], name=f"{p}/add"),
                  n("Tanh", [f"{p}_r"], [f"{p}_out"], name=f"{p}/tanh")]
        x = f"{p}_out"
    nodes.append(n("ReduceMean", [x], ["y"], axes=[1], keepdims=0, name="pool"))
    shape = ["unk__20", "seq" if dynamic_seq else seq, dim]
    return _model(nodes, [helper.make_tensor_value_info("x", F, shape)],
                  [helper.make_tensor_value_info("y", F, ["unk__20", dim])], inits,
                  "computed_batch")
