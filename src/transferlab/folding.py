"""BatchNorm folded into the convolution before it: the same model, computed faster.

A BatchNormalization layer in inference mode is a per-channel affine map,
y = x * s + t with s = gamma / sqrt(variance + eps) and t = beta - mean * s.
After a convolution with kernel W (and bias b) it equals one convolution with
the kernel W * s plus the bias t + b * s. The map over the activations (a
multiply and an add forward, a multiply backward, each as large as the
activations) becomes a multiply of the kernel, and oneDNN fuses the bias and
the ReLU that follows into the convolution. On the fine-tune's training step
(EfficientNet-Lite0, 160 px, block3..top unfrozen) that was 1.20x faster, and
inference 1.52x (`bench/folding.py`; RESULTS.md).

`fold_batchnorm` returns a model that shares every variable with the model it
is given: training it trains that model, and the kernel W stays the variable
that trains, so the gradients and the optimizer's steps are the original's
(up to float rounding). Nothing folded is ever saved: the pipeline saves and
registers the model built from the original layers, Keras' own, which any Keras
or MLflow client loads without this package.

A BatchNorm layer is folded where it runs in inference mode: in a model that
will be trained, only the frozen ones (Keras 3 runs a BatchNorm layer whose
`trainable` is False in inference mode, whatever the training flag); in a model
used for inference only, all of them.
"""

from __future__ import annotations

import keras
from keras import layers, ops

CONVOLUTIONS = (layers.Conv2D, layers.DepthwiseConv2D)


class FoldedConvBN(layers.Layer):
    """`conv` then `bn` (in inference mode) as one convolution; their variables, not copies."""

    def __init__(self, conv: layers.Layer, bn: layers.BatchNormalization, **kwargs):
        super().__init__(name=conv.name, dtype=conv.dtype_policy, **kwargs)
        self.conv, self.bn = conv, bn

    def _scale_shift(self):
        bn = self.bn
        scale = ops.rsqrt(ops.cast(bn.moving_variance, "float32") + bn.epsilon)
        if bn.scale:
            scale = scale * ops.cast(bn.gamma, "float32")
        shift = -ops.cast(bn.moving_mean, "float32") * scale
        if bn.center:
            shift = shift + ops.cast(bn.beta, "float32")
        if self.conv.use_bias:
            shift = shift + ops.cast(self.conv.bias, "float32") * scale
        return scale, shift

    def call(self, inputs):
        conv = self.conv
        scale, shift = self._scale_shift()
        kernel = conv.kernel
        if isinstance(conv, layers.DepthwiseConv2D):  # kernel (k, k, channels, multiplier)
            scale = ops.reshape(scale, (1, 1, *kernel.shape[2:]))
            outputs = ops.depthwise_conv(inputs, kernel * ops.cast(scale, kernel.dtype), strides=conv.strides,
                                         padding=conv.padding, data_format=conv.data_format,
                                         dilation_rate=conv.dilation_rate)
        else:
            outputs = conv.convolution_op(inputs, kernel * ops.cast(scale, kernel.dtype))
        return outputs + ops.cast(shift, outputs.dtype)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


class Folded(layers.Layer):
    """Where a folded BatchNorm layer was: its input, which the convolution before already normalised."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def _graph(model: keras.Model) -> tuple[dict, dict, dict]:
    """{tensor id: the layer that computes it}, {tensor id: how many calls and
    outputs read it}, {layer name: its calls} over `model`'s own graph (its nodes,
    Keras' private record of the graph: a layer's public `input` is its first call
    in any model, and a nested model's is its own input)."""
    producers, uses, calls = {}, {}, {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.operation is None or node.is_input:
                continue
            calls[node.operation.name] = calls.get(node.operation.name, 0) + 1
            for tensor in node.input_tensors:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
            if len(node.outputs) == 1:
                producers[id(node.outputs[0])] = (node.operation, node.input_tensors)
    for tensor in model.outputs:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    return producers, uses, calls


def foldable_pairs(model: keras.Model, trained: bool) -> dict[str, layers.BatchNormalization]:
    """{convolution name: the BatchNorm layer after it} of `model`'s own layers that
    fold: the BatchNorm normalises the channels of the convolution's output, which
    nothing else reads, each is called once, and the BatchNorm runs in inference
    mode (`trained`: only frozen ones)."""
    producers, uses, calls = _graph(model)
    pairs = {}
    for bn, inputs in producers.values():
        if not isinstance(bn, layers.BatchNormalization) or (trained and bn.trainable) or len(inputs) != 1:
            continue
        conv, _ = producers.get(id(inputs[0]), (None, None))
        if (isinstance(conv, CONVOLUTIONS) and uses.get(id(inputs[0])) == 1
                and calls[conv.name] == 1 and calls[bn.name] == 1
                and conv.data_format == "channels_last" and bn.axis in (-1, len(inputs[0].shape) - 1)
                and conv.activation in (None, keras.activations.linear)):
            pairs[conv.name] = bn
    return pairs


def fold_batchnorm(model: keras.Model, *, trained: bool) -> keras.Model:
    """`model` with every foldable convolution + BatchNorm pair as one
    `FoldedConvBN`, nested functional models (a classifier's body) included. It
    shares all variables with `model`, keeps its layer names, and has the same
    trainable variables in the same order. `trained`: the result will be
    trained, so only frozen BatchNorm layers fold. Returns `model` itself where
    nothing folds."""
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        return model  # a subclassed or Sequential model: left as it is
    pairs = foldable_pairs(model, trained)
    nested = {layer.name: fold_batchnorm(layer, trained=trained) for layer in model.layers
              if isinstance(layer, keras.Model)}
    nested = {name: folded for name, folded in nested.items() if folded is not model.get_layer(name)}
    if not pairs and not nested:
        return model
    folded_bns = {bn.name for bn in pairs.values()}

    def clone(layer):
        if layer.name in pairs:
            return FoldedConvBN(layer, pairs[layer.name])
        if layer.name in folded_bns:
            return Folded(name=layer.name)
        return nested.get(layer.name, layer)  # the layer itself: shared, not copied

    return keras.models.clone_model(model, clone_function=clone)
