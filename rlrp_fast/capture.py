"""Capture: trace an ``nn.Module`` with ``torch.fx`` and canonicalise it into a :class:`Plan`.

Runs once per explainer. BatchNorm is folded into the preceding Linear/Conv step here, as
a per-channel scale (weights are referenced, never copied: the explainer detects changes);
everything the plan cannot explain is refused here, naming the node and listing what is
supported. The user's model is only read, never modified.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .plan import (Activation, Add, Affine, Attention, Broadcast, Cat, Constant, Gate, MaxPool,
                   Meta, Normalization, Opaque, Pad, Plan, Pool, Product, Reshape, Scale, Select,
                   SlotRef, Step, WindowAttention)

SUPPORTED_OPS = (
    "Linear (also F.linear on a module's parameters); Conv1d/2d/3d (any stride, padding, "
    "dilation, groups; zero padding); BatchNorm1d/2d/3d (also F.batch_norm) in eval mode with "
    "running statistics (folded into a preceding Linear/Conv, else a per-channel scale); "
    "activations ReLU, LeakyReLU, ReLU6, GELU, SiLU, ELU, Tanh, Sigmoid, Hardswish, Hardsigmoid "
    "(modules, torch.* and F.* functions, tensor methods); the product of a tensor and a gate "
    "(a Sigmoid/Hardsigmoid output: squeeze-excitation; a Softmax output over a non-batch dim, "
    "used only as a gate), x * sigmoid(x), scaling by a parameter "
    "or number (layer scale), division by a number; the product of two tensors (x * y, x @ y, "
    "torch.bmm); LayerNorm, GroupNorm, RMSNorm (modules and F.layer_norm, F.group_norm, "
    "F.rms_norm) and a LayerNorm written out ((x - mean) / sqrt(biased var + eps) * w + b); "
    "StochasticDepth (eval); MaxPool1d/2d/3d, AdaptiveMaxPool1d/2d/3d, AvgPool1d/2d/3d, "
    "AdaptiveAvgPool1d/2d/3d (modules and F.* functions); mean over non-batch dims; Flatten, "
    "Unflatten, view, reshape, flatten, unflatten, squeeze, unsqueeze, view_as, reshape_as, "
    "permute, transpose, swapaxes/swapdims, contiguous; expand, expand_as, broadcast_to, "
    "repeat; torch.roll, F.pad (constant mode), ZeroPad1d/2d/3d, ConstantPad1d/2d/3d; "
    "Identity, Dropout (eval); tensor + tensor and tensor + parameter/buffer/number (a position "
    "embedding; operator +, +=, torch.add, Tensor.add); tensor - parameter/buffer/number (input "
    "normalisation), tensor - tensor and parameter/buffer/number - tensor (a sum with weight -1; "
    "operator -, -=, torch.sub, Tensor.sub); torch.cat (also of a parameter: a class "
    "token); chunk, split, unbind, tensor_split and indexing by ints and slices (x[:, 0]); "
    "nn.MultiheadAttention (batch first or not, packed or separate in-projections, attn_mask, "
    "key_padding_mask, is_causal; no bias_k/bias_v, no add_zero_attn) and "
    "F.scaled_dot_product_attention (attn_mask or is_causal; no dropout, no enable_gqa); "
    "torchvision's Swin shifted-window attention (V1 and V2), patch merging and MaxViT's "
    "relative-position attention; attention written out (softmax(q @ k.T) @ v: a matmul with "
    "a softmax gate); shape arithmetic and comparisons (x.size(), x.shape, x.ndim, "
    "x.dim(), torch._assert); tensors computed from parameters and buffers alone (folded into "
    "constants); any other function or tensor method where no relevance passes through it "
    "(the query/key side of attention, inside a gate)"
)


class UnsupportedModelError(ValueError):
    """The model contains something the plan cannot explain."""


class _TensorAsShape(Exception):
    """Internal: a tensor node met where a shape argument was expected."""


def _unsupported(node: fx.Node, what: str, why: str = "it is not supported") -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot explain {what} (node {node.name!r}, {_enclosing_module(node)}): {why}. "
        f"Supported: {SUPPORTED_OPS}."
    )


def _module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module whose ``forward`` made ``node`` (the
    node's own name at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _enclosing_module(node: fx.Node) -> str:
    """The innermost module whose ``forward`` made ``node``, by qualified name and type (fx
    records the stack while tracing): where in a large model to look."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        name = getattr(kind, "__name__", str(kind))
        return f"in module {path!r} ({name})"
    root = node.graph.owning_module
    return f"in the model's own forward ({type(root).__name__})" if root is not None \
        else "in the model's own forward"


def _functional_activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An out-of-place functional equivalent of an activation module (in-place modules would
    overwrite tensors the relevance pass still reads)."""
    if type(module) is nn.ReLU:
        return F.relu
    if type(module) is nn.LeakyReLU:
        return functools.partial(F.leaky_relu, negative_slope=module.negative_slope)
    if type(module) is nn.ReLU6:
        return F.relu6
    if type(module) is nn.GELU:
        return functools.partial(F.gelu, approximate=module.approximate)
    if type(module) is nn.SiLU:
        return F.silu
    if type(module) is nn.ELU:
        return functools.partial(F.elu, alpha=module.alpha)
    if type(module) is nn.Tanh:
        return torch.tanh
    if type(module) is nn.Sigmoid:
        return torch.sigmoid
    if type(module) is nn.Hardswish:
        return F.hardswish
    if type(module) is nn.Hardsigmoid:
        return F.hardsigmoid
    return None


_ACTIVATION_FUNCTIONS: dict[Any, Callable] = {
    F.relu: F.relu, torch.relu: F.relu, torch.relu_: F.relu, F.relu_: F.relu,
    F.relu6: F.relu6, F.leaky_relu: F.leaky_relu, F.gelu: F.gelu, F.silu: F.silu,
    F.elu: F.elu, F.hardswish: F.hardswish,
    torch.tanh: torch.tanh, F.tanh: torch.tanh, torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid, F.hardsigmoid: F.hardsigmoid,
}
# Activations whose output is a gate in a product, and the activation that product is when the
# gate is computed from the signal itself (x * sigmoid(x) is SiLU written out; x * softmax(x)
# is no activation, so a gate).
_GATES = {torch.sigmoid: F.silu, F.hardsigmoid: F.hardswish, torch.softmax: None}
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax}
_MUL_FUNCTIONS = {operator.mul, torch.mul}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
# Functions returning a tuple of views of their input, taken apart by getitem.
_PART_FUNCTIONS = {torch.chunk: torch.chunk, torch.split: torch.split,
                   torch.unbind: torch.unbind, torch.tensor_split: torch.tensor_split}
_PART_METHODS = {"chunk", "split", "unbind", "tensor_split"}
_ACTIVATION_METHODS = {"relu": F.relu, "relu_": F.relu, "sigmoid": torch.sigmoid,
                       "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "tanh_": torch.tanh}

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
             nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_AVGPOOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVGPOOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_NORMALIZATIONS = {nn.LayerNorm: "layer", nn.RMSNorm: "rms", nn.GroupNorm: "group"}
_NORMALIZATION_FUNCTIONS = {F.layer_norm: "layer", F.rms_norm: "rms", F.group_norm: "group"}
_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d,
                  nn.ZeroPad2d, nn.ZeroPad3d)
_PASSTHROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.AlphaDropout)

# Functional pooling → (module class, positional parameter names after the input).
_MAXPOOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVGPOOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")
_ADAPTIVE_ARGS = ("output_size", "return_indices")
_POOL_FUNCTIONS = {
    F.max_pool1d: (nn.MaxPool1d, _MAXPOOL_ARGS), F.max_pool2d: (nn.MaxPool2d, _MAXPOOL_ARGS),
    F.max_pool3d: (nn.MaxPool3d, _MAXPOOL_ARGS),
    F.avg_pool1d: (nn.AvgPool1d, _AVGPOOL_ARGS[:-1]), F.avg_pool2d: (nn.AvgPool2d, _AVGPOOL_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, _AVGPOOL_ARGS),
    F.adaptive_max_pool1d: (nn.AdaptiveMaxPool1d, _ADAPTIVE_ARGS),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, _ADAPTIVE_ARGS),
    F.adaptive_max_pool3d: (nn.AdaptiveMaxPool3d, _ADAPTIVE_ARGS),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, _ADAPTIVE_ARGS[:1]),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, _ADAPTIVE_ARGS[:1]),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, _ADAPTIVE_ARGS[:1]),
}

_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.flatten: "flatten", torch.reshape: "reshape",
                      torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
                      torch.unflatten: "unflatten"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub, torch.subtract}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_META_FUNCTIONS = {getattr, operator.getitem, operator.mul, operator.floordiv, operator.add,
                   operator.sub, operator.truediv, operator.mod, len,
                   # comparisons for shape checks (torch._assert): meta values only
                   operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                   operator.ge, operator.and_, operator.or_, operator.not_, operator.truth}

# In-place ops: the plan runs every op out of place, then lets later readers of the mutated
# tensor read the op's result, which is what they read in the model.
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
# functions with an ``inplace`` flag → its positional index
_INPLACE_FLAG = {F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.elu: 2, F.hardswish: 1, F.silu: 1,
                 F.hardtanh: 3, F.selu: 1, F.celu: 2, F.mish: 1, F.hardsigmoid: 1,
                 F.threshold: 3, F.rrelu: 4}


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv_padding(node: fx.Node, conv: nn.Module, dims: int) -> tuple[int, ...]:
    if conv.padding_mode != "zeros":
        raise _unsupported(node, type(conv).__name__,
                           f"padding_mode={conv.padding_mode!r}; only zero padding is supported")
    if conv.padding == "valid":
        return (0,) * dims
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(_tuple(conv.dilation, dims), _tuple(conv.kernel_size, dims))]
        if any(t % 2 for t in total):
            raise _unsupported(node, type(conv).__name__, "padding='same' that pads asymmetrically")
        return tuple(t // 2 for t in total)
    return _tuple(conv.padding, dims)


@dataclass(frozen=True)
class _FunctionalBatchNorm:
    """The arguments of an ``F.batch_norm`` call, read as a BatchNorm module's attributes."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _batchnorm_affine(node: fx.Node, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise _unsupported(node, type(bn).__name__,
                           "BatchNorm without running statistics normalises across the batch")
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    return scale, beta - bn.running_mean.double() * scale


def _fold(step: Affine, scale: torch.Tensor, shift: torch.Tensor, name: str) -> Affine:
    """``BN(W a + b)`` as one affine map ``s ⊙ (W a) + b'``, ``b' = s·(b − μ) + β``.

    ``W`` stays the layer's own tensor: a scaled copy ``s·W`` would keep a second set of
    weights resident (93 MB on ResNet50, more than one batch-1 explanation uses)."""
    b = shift if step.bias is None else step.bias.double() * scale + shift
    return Affine(name=step.name, target=f"{step.target}+{name}", inputs=step.inputs,
                  output=step.output, weight=step.weight, bias=b.to(step.weight.dtype),
                  conv_dims=step.conv_dims, stride=step.stride, padding=step.padding,
                  dilation=step.dilation, groups=step.groups, channel_scale=scale,
                  module=step.module)


def _is_number(arg: Any) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def _mutated_operand(node: fx.Node, gm: fx.GraphModule) -> Any:
    """The argument an in-place op overwrites (None for out-of-place ops). Dropout in eval
    and Identity change nothing, in place or not."""
    if node.op == "call_method":
        name = node.target
        return node.args[0] if name.endswith("_") and not name.startswith("_") else None
    if node.op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", "")
        if fn in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_")):
            return node.args[0]
        position = _INPLACE_FLAG.get(fn)
        flag = node.kwargs.get("inplace", False)
        if position is not None and len(node.args) > position:
            flag = node.args[position]
        return node.args[0] if flag is True else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is True and \
                not isinstance(module, _PASSTHROUGH_MODULES):
            return node.args[0]
    return None


class _Builder:
    """Walks the fx graph once, assigning slots and emitting steps."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.steps: list[Step] = []
        self.slot_of: dict[fx.Node, int] = {}
        self.is_meta: set[fx.Node] = set()
        self.num_slots = 0
        self.input_slot: int | None = None
        self.output_slot: int | None = None
        self.view_of: dict[int, int] = {}  # slot of a reshape's output → slot of its input
        self.gate_of: dict[int, tuple[Callable, int]] = {}  # gate slot → (activation, its input)
        # slots no relevance may reach → their node and why: softmax outputs, Opaque ops
        self.no_relevance: dict[int, tuple[fx.Node, str]] = {}
        self.constants: dict[fx.Node, torch.Tensor] = {}  # get_attr nodes
        # chunk/split/unbind nodes (tuples of parts): node → (source slot, fn, args, kwargs)
        self.parts_of: dict[fx.Node, tuple] = {}
        self.position: dict[fx.Node, int] = {}
        # slots holding constants (a parameter used as a tensor operand, its expansions and
        # reshapes): read in the forward, never given relevance
        self.const_slots: set[int] = set()
        self.constant_slot_of: dict[fx.Node, int] = {}
        self.attention_nodes: set[fx.Node] = set()  # MultiheadAttention calls (tuples)

    # -- helpers -----------------------------------------------------------------------------
    def new_slot(self, node: fx.Node) -> int:
        self.slot_of[node] = self.num_slots
        self.num_slots += 1
        return self.slot_of[node]

    def tensor_slot(self, node: fx.Node, arg: Any) -> int:
        if arg in self.constants:
            raise _unsupported(node, self.describe(node), f"it reads the parameter or buffer "
                               f"{arg.target!r} directly (supported: as a scale, x * p, or "
                               "as a layer norm's weight or bias)")
        if not isinstance(arg, fx.Node) or arg in self.is_meta:
            raise _unsupported(node, self.describe(node), f"argument {arg!r} is not a tensor")
        if self.slot_of[arg] in self.const_slots:
            raise _unsupported(node, self.describe(node), f"it reads {arg.name!r}, computed from "
                               "a parameter or buffer alone, as a signal (constants are "
                               "supported as added terms, concatenated parts or scales)")
        return self.slot_of[arg]

    def operand(self, node: fx.Node, arg: Any) -> tuple[int, bool]:
        """``(slot, is constant)`` of a tensor operand that may be a parameter or buffer
        (given a :class:`Constant` step the first time it is read) or derived from one."""
        if arg in self.constants:
            if arg not in self.constant_slot_of:
                slot = self.num_slots
                self.steps.append(Constant(name=arg.name, target=str(arg.target), inputs=(),
                                           output=slot, value=self.constants[arg]))
                self.num_slots += 1
                self.constant_slot_of[arg] = slot
                self.const_slots.add(slot)
            return self.constant_slot_of[arg], True
        if not isinstance(arg, fx.Node) or arg in self.is_meta:
            raise _unsupported(node, self.describe(node), f"argument {arg!r} is not a tensor")
        slot = self.slot_of[arg]
        return slot, slot in self.const_slots

    def refs(self, obj: Any) -> Any:
        """Constant arguments stay; meta nodes become slot references; tensors are refused."""
        def convert(arg):
            if arg in self.is_meta:
                return SlotRef(self.slot_of[arg])
            raise _TensorAsShape(arg)
        try:
            return fx.node.map_arg(obj, convert)
        except _TensorAsShape as exc:
            tensor = exc.args[0]
            raise UnsupportedModelError(
                f"a tensor ({tensor.name}, {_enclosing_module(tensor)}) is used as a shape "
                "argument") from None

    def emit(self, node: fx.Node, cls, inputs: tuple[int, ...], **fields) -> None:
        module = str(node.target) if node.op == "call_module" else None
        self.steps.append(cls(name=node.name, target=self.describe(node), inputs=inputs,
                              output=self.new_slot(node), module=module, **fields))
        out = self.slot_of[node]
        if cls in (Reshape, Select):  # may share memory with its input (in-place ops)
            self.view_of[out] = inputs[0]
            if inputs[0] in self.gate_of:  # a gate reshaped (or broadcast) is still a gate
                self.gate_of[out] = self.gate_of[inputs[0]]
        if cls is Activation and getattr(fields["fn"], "func", fields["fn"]) in _GATES:
            self.gate_of[out] = (getattr(fields["fn"], "func", fields["fn"]), inputs[0])

    def alias(self, node: fx.Node, source: fx.Node) -> None:
        self.slot_of[node] = self.slot_of[source]

    @staticmethod
    def describe(node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        return getattr(node.target, "__name__", str(node.target))

    # -- the walk ----------------------------------------------------------------------------
    def build(self) -> Plan:
        nodes = list(self.gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(nodes)}
        written = [m for m in map(_match_written_layer_norm, nodes) if m is not None]
        absorbed = {n for m in written for n in m.nodes - {m.end}}
        written_at = {m.end: m for m in written}
        for node in nodes:
            if node in absorbed:
                continue
            if node in written_at:
                self.on_written_layer_norm(node, written_at[node])
                continue
            if self.fold(node):
                continue
            handler = getattr(self, f"on_{node.op}")
            handler(node)
            mutated = _mutated_operand(node, self.gm)
            if isinstance(mutated, fx.Node) and mutated in self.slot_of \
                    and mutated not in self.is_meta:
                self.on_mutation(node, mutated)
        if self.input_slot is None or self.output_slot is None:
            raise UnsupportedModelError("the traced model has no input or no output")
        self.check_no_relevance_reaches()
        slot_nodes: list[str | None] = [None] * self.num_slots
        for node in nodes:  # graph order: a slot holds the value of the last node mapped to it
            if node in self.slot_of:
                slot_nodes[self.slot_of[node]] = node.name
        return Plan(steps=tuple(self.steps), input_slot=self.input_slot,
                    output_slot=self.output_slot, num_slots=self.num_slots,
                    slot_nodes=tuple(slot_nodes))

    def fold(self, node: fx.Node) -> bool:
        """A call whose inputs are all parameters or buffers (or folded from them) and whose
        result is a tensor is a constant: computed here, once, and from then on read like a
        parameter (``table[index.view(-1)].view(...)``, ``cat((q_bias, zeros, v_bias))``,
        ``softmax(alphas)``). Like every constant it takes no relevance. In-place calls and
        calls that read the input's shape are left to their handlers."""
        if node.op not in ("call_function", "call_method") or \
                _mutated_operand(node, self.gm) is not None:
            return False
        inputs = node.all_input_nodes
        if not inputs or not all(n in self.constants for n in inputs):
            return False
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.constants.__getitem__)
        with torch.no_grad():
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
        parts = value if isinstance(value, (tuple, list)) else (value,)
        if not parts or not all(isinstance(t, torch.Tensor) for t in parts):
            return False  # a shape or a number: a meta value, handled as such
        self.constants[node] = value
        return True

    def on_mutation(self, node: fx.Node, target: fx.Node) -> None:
        """``node`` overwrote ``target`` in place: later readers of ``target`` (and of every
        alias of it) read ``node``'s result. A view of it read later would see the change
        through shared memory, which the plan cannot follow: refused, as is mutating the
        model's input."""
        old, new = self.slot_of[target], self.slot_of.get(node)
        if new is None or new == old:
            return
        what = f"in-place op {self.describe(node)!r}"
        if old == self.input_slot:
            raise _unsupported(node, what, "it overwrites the model's input; write it out of "
                               "place (e.g. x = x.relu())")
        root = self.view_root(old)
        later = self.position[node]
        for other, slot in self.slot_of.items():
            if slot != old and self.view_root(slot) == root and any(
                    self.position[user] > later and user not in self.is_meta
                    for user in other.users):
                raise _unsupported(node, what, f"it overwrites a tensor that node "
                                   f"{other.name!r} views and that view is read afterwards; "
                                   "write the op out of place")
        for other, slot in list(self.slot_of.items()):
            if slot == old:
                self.slot_of[other] = new

    def view_root(self, slot: int) -> int:
        while slot in self.view_of:
            slot = self.view_of[slot]
        return slot

    def on_placeholder(self, node: fx.Node) -> None:
        if self.input_slot is not None and node.args:
            # an optional argument (attn_mask=None, is_causal=False): the explainer calls
            # model(x), so it keeps its default, to which the trace was specialised (see
            # capture); fx's checks of that read it as a shape value does
            self.emit(node, Meta, (), fn=functools.partial(_default, node.args[0]))
            self.is_meta.add(node)
            return
        if self.input_slot is not None:
            raise UnsupportedModelError(
                f"the model's forward takes more than one input ({node.name!r}); rlrp_fast "
                "explains models with a single tensor input")
        self.input_slot = self.new_slot(node)

    def on_get_attr(self, node: fx.Node) -> None:
        """A parameter or buffer used directly in forward: a constant, usable as a layer
        norm's weight or a scale (a slot is given when a step reads it)."""
        value = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            raise _unsupported(node, f"attribute {node.target!r}", "it is not a tensor")
        self.constants[node] = value.detach()

    def on_output(self, node: fx.Node) -> None:
        out = node.args[0]
        if not isinstance(out, fx.Node) or out in self.is_meta:
            raise UnsupportedModelError(
                f"the model must return one tensor of logits, not {type(out).__name__}")
        self.output_slot = self.slot_of[out]

    def on_call_module(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(node.target)
        kind = type(module)
        name = type(module).__name__
        if kind is nn.MultiheadAttention:
            self.on_multihead_attention(node, module)
            return
        if kind in _window_attention_types():
            self.on_window_attention(node, module)
            return
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(node, name, "module called with more than one argument")
        src = self.tensor_slot(node, node.args[0])
        if kind is nn.Linear:
            self.emit(node, Affine, (src,), weight=module.weight.detach(),
                      bias=None if module.bias is None else module.bias.detach())
        elif kind in _CONVS:
            dims = _CONVS[kind]
            self.emit(node, Affine, (src,), weight=module.weight.detach(),
                      bias=None if module.bias is None else module.bias.detach(),
                      conv_dims=dims, stride=_tuple(module.stride, dims),
                      padding=_conv_padding(node, module, dims),
                      dilation=_tuple(module.dilation, dims), groups=module.groups)
        elif kind in _BATCHNORMS:
            self.on_batchnorm(node, module)
        elif kind in _NORMALIZATIONS:
            self.on_normalization(node, _NORMALIZATIONS[kind], module)
        elif kind is nn.Softmax:
            self.on_softmax(node, src, module.dim)
        elif _functional_activation(module) is not None:
            self.emit(node, Activation, (src,), fn=_functional_activation(module))
        elif kind in _MAXPOOLS or kind in _AVGPOOLS or kind in _ADAPTIVE_AVGPOOLS:
            step, fields = _pool_step(module)
            self.emit(node, step, (src,), **fields)
        elif kind is nn.Flatten:
            self.emit(node, Reshape, (src,), fn=torch.flatten,
                      args=(module.start_dim, module.end_dim))
        elif kind in _CONSTANT_PADS:  # ZeroPadNd is a ConstantPadNd with value 0
            self.emit(node, Pad, (src,), pad=tuple(module.padding), value=float(module.value))
        elif kind is nn.Unflatten:
            self.emit(node, Reshape, (src,), fn=torch.Tensor.unflatten,
                      args=(module.dim, module.unflattened_size))
        elif isinstance(module, _PASSTHROUGH_MODULES) or name == "StochasticDepth":
            self.alias(node, node.args[0])  # (torchvision's StochasticDepth: identity in eval)
        else:
            raise _unsupported(node, f"module {node.target!r} ({name})")

    def on_linear_function(self, node: fx.Node) -> None:
        """``F.linear(x, weight, bias)`` with a module's own parameters (a subclass of
        nn.Linear that fx traces into, as timm's ``Linear``): the same step as nn.Linear,
        owned by the module that holds the weight (composites match it by that module)."""
        names = ("input", "weight", "bias")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        if given.get("weight") not in self.constants:
            raise _unsupported(node, self.describe(node), "a weight computed in forward (only "
                               "a parameter or buffer)")
        weight, bias = (self.constant_or_none(node, given.get(k)) for k in ("weight", "bias"))
        owner = str(given["weight"].target).rpartition(".")[0]
        self.steps.append(Affine(name=node.name, target=self.describe(node),
                                 inputs=(self.tensor_slot(node, given["input"]),),
                                 output=self.new_slot(node), module=owner, weight=weight,
                                 bias=bias))

    def on_batchnorm_function(self, node: fx.Node) -> None:
        """``F.batch_norm`` in eval (running statistics, ``training=False``), as timm's
        ``BatchNormAct2d`` calls it: the same step as a BatchNorm module."""
        names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        if given.get("training", False) is not False:
            raise _unsupported(node, self.describe(node), "batch statistics (training=True, "
                               "or no running statistics): call model.eval()")
        stats = {k: self.constant_or_none(node, given.get(k))
                 for k in ("running_mean", "running_var", "weight", "bias")}
        eps = given.get("eps", 1e-5)
        if stats["running_mean"] is None or stats["running_var"] is None or \
                not isinstance(eps, (int, float)):
            raise _unsupported(node, self.describe(node), "no running statistics or an eps "
                               "computed at run time")
        self.on_batchnorm(node, _FunctionalBatchNorm(**stats, eps=float(eps)))

    def on_batchnorm(self, node: fx.Node, bn: nn.Module) -> None:
        scale, shift = _batchnorm_affine(node, bn)
        producer = node.args[0]
        last = self.steps[-1] if self.steps else None
        foldable = (isinstance(last, Affine) and self.slot_of.get(producer) == last.output
                    and len(producer.users) == 1 and last.weight.shape[0] == scale.numel())
        if foldable:
            self.steps[-1] = _fold(last, scale, shift, str(node.target) if node.op ==
                                   "call_module" else _module_path(node))
            self.alias(node, producer)
        else:
            dtype = bn.running_mean.dtype
            self.emit(node, Scale, (self.tensor_slot(node, producer),),
                      scale=scale.to(dtype), shift=shift.to(dtype))

    def on_call_function(self, node: fx.Node) -> None:
        fn = node.target
        if fn is _ASSERT_IS_NONE:  # fx's check that an optional argument is left as None
            return
        if fn is torch._assert:  # the model's own shape check, run by the plan too
            if all(a in self.is_meta for a in node.all_input_nodes):
                self.emit_meta(node, fn)
            return
        if self.all_meta(node):
            if fn in _META_FUNCTIONS:
                self.emit_meta(node, fn)
                return
            raise _unsupported(node, self.describe(node), "shape arithmetic with this function")
        if fn is getattr and node.args[1] in ("shape", "ndim"):
            self.emit_meta(node, fn)
        elif fn is F.batch_norm:
            self.on_batchnorm_function(node)
        elif fn is F.linear:
            self.on_linear_function(node)
        elif fn is operator.getitem:
            self.on_getitem(node)
        elif fn in _PART_FUNCTIONS:
            self.on_parts(node, _PART_FUNCTIONS[fn])
        elif fn in _ADD_FUNCTIONS:
            self.on_add(node)
        elif fn in _SOFTMAX_FUNCTIONS:
            self.on_softmax_call(node)
        elif fn in _SUB_FUNCTIONS:
            self.on_sub(node)
        elif fn in _ACTIVATION_FUNCTIONS:
            self.on_activation(node, _ACTIVATION_FUNCTIONS[fn])
        elif fn in _POOL_FUNCTIONS:
            self.on_pool_function(node)
        elif fn in _RESHAPE_FUNCTIONS:
            self.on_reshape(node, getattr(torch.Tensor, _RESHAPE_FUNCTIONS[fn]))
        elif fn in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims):
            self.on_permute(node, "permute" if fn is torch.permute else "transpose")
        elif fn is torch.broadcast_to:
            self.on_expand(node, torch.Tensor.broadcast_to)
        elif fn in _CAT_FUNCTIONS:
            self.on_cat(node)
        elif fn is torch.mean:
            self.on_mean(node)
        elif fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
            self.alias(node, node.args[0])
        elif fn in _MUL_FUNCTIONS:
            self.on_mul(node)
        elif fn in _MATMUL_FUNCTIONS:
            self.on_matmul(node)
        elif fn in (operator.truediv, torch.div, torch.true_divide):
            self.on_div(node)
        elif getattr(fn, "__name__", "") == "stochastic_depth" and _stochastic_depth_off(node):
            self.alias(node, node.args[0])  # torchvision.ops.stochastic_depth in eval
        elif fn in _NORMALIZATION_FUNCTIONS:
            self.on_normalization(node, _NORMALIZATION_FUNCTIONS[fn])
        elif fn is F.scaled_dot_product_attention:
            self.on_sdpa(node)
        elif fn is F.pad:
            self.on_pad(node)
        elif fn is torch.roll:
            self.on_roll(node)
        else:
            self.on_opaque(node)

    def on_call_method(self, node: fx.Node) -> None:
        method = node.target
        if method in ("size", "dim") or self.all_meta(node):
            self.emit_meta(node, getattr(torch.Tensor, method, None) or
                           operator.methodcaller(method))
        elif method in ("add", "add_"):
            self.on_add(node)
        elif method in ("sub", "sub_", "subtract", "subtract_"):
            self.on_sub(node)
        elif method == "softmax":
            self.on_softmax_call(node)
        elif method in _ACTIVATION_METHODS:
            self.on_activation(node, _ACTIVATION_METHODS[method])
        elif method in _RESHAPE_METHODS:
            self.on_reshape(node, getattr(torch.Tensor, method))
        elif method in ("permute", "transpose"):
            self.on_permute(node, method)
        elif method == "contiguous":  # a real op: a view(...) after a transpose needs it
            self.on_reshape(node, torch.Tensor.contiguous)
        elif method == "mean":
            self.on_mean(node)
        elif method == "mul":
            self.on_mul(node)
        elif method in ("matmul", "bmm"):
            self.on_matmul(node)
        elif method in ("div", "true_divide"):
            self.on_div(node)
        elif method in _PART_METHODS:
            self.on_parts(node, getattr(torch.Tensor, method))
        elif method in ("expand", "expand_as", "repeat", "broadcast_to"):
            self.on_expand(node, getattr(torch.Tensor, method))
        elif method in ("view_as", "reshape_as"):
            self.on_shaped_like(node, getattr(torch.Tensor, method))
        elif method == "roll":
            self.on_roll(node)
        elif method in ("swapaxes", "swapdims"):
            self.on_permute(node, "transpose")
        else:
            self.on_opaque(node)

    # -- per-op handlers ---------------------------------------------------------------------
    def all_meta(self, node: fx.Node) -> bool:
        nodes = node.all_input_nodes
        return bool(nodes) and all(n in self.is_meta for n in nodes)

    def emit_meta(self, node: fx.Node, fn: Callable) -> None:
        if node.op == "call_method" or fn is getattr:  # the head may be a tensor (x.size(0))
            head, *rest = node.args
            args = (SlotRef(self.slot_of[head]), *self.refs(tuple(rest)))
        else:
            args = self.refs(node.args)
        self.emit(node, Meta, (), fn=fn, args=args, kwargs=self.refs(node.kwargs))
        self.is_meta.add(node)

    def on_add(self, node: fx.Node) -> None:
        """A sum of tensors; parameters, buffers and numbers in it are constants (a bias)."""
        self.check_alpha(node, "add")
        slots = [self.term(node, a) for a in node.args]
        inputs = tuple(s for s, const in slots if not const)
        if not inputs:
            raise _unsupported(node, self.describe(node), "a sum of constants only")
        self.emit(node, Add, inputs, constants=tuple(s for s, const in slots if const))

    def on_sub(self, node: fx.Node) -> None:
        """``a − b``: a sum whose subtrahend has weight −1 (``x − y``; ``c − x`` with a
        constant ``c``, its bias). A parameter, buffer or number subtracted from a signal is a
        bias (``x − mean``; a number folds its sign)."""
        self.check_alpha(node, "sub")
        if len(node.args) != 2:
            raise _unsupported(node, self.describe(node), "subtraction needs two operands")
        minuend, subtrahend = node.args
        if _is_number(subtrahend):  # the sign folded into the number
            subtrahend = -subtrahend
        (left, left_const), (right, right_const) = (self.term(node, a)
                                                    for a in (minuend, subtrahend))
        if left_const and right_const:
            raise _unsupported(node, self.describe(node), "a difference of constants only")
        if left_const:  # c − x
            self.emit(node, Add, (right,), constants=(left,), negated=(0,))
        elif not right_const:  # x − y
            self.emit(node, Add, (left, right), negated=(1,))
        elif _is_number(subtrahend):
            self.emit(node, Add, (left,), constants=(right,))
        else:
            self.emit(node, Add, (left,), subtracted=(right,))

    def on_softmax_call(self, node: fx.Node) -> None:
        """``torch.softmax``/``F.softmax``/``x.softmax`` (``input, dim, dtype``)."""
        given = {**dict(zip(("input", "dim"), node.args)), **node.kwargs}
        given.pop("_stacklevel", None)
        if given.pop("dtype", None) is not None or set(given) != {"input", "dim"}:
            raise _unsupported(node, self.describe(node), "softmax with dtype= or without dim")
        self.on_softmax(node, self.tensor_slot(node, given["input"]), given["dim"])

    def on_softmax(self, node: fx.Node, src: int, dim: Any) -> None:
        """A softmax outside an attention module: a gate (docs/RLRP_SPEC.md, "Gates: the
        signal takes all"), which no relevance may pass through (checked when the plan is
        built)."""
        if not isinstance(dim, int) or dim == 0:
            raise _unsupported(node, self.describe(node), "softmax needs an explicit dim other "
                               "than the batch dim 0")
        self.emit(node, Activation, (src,), fn=functools.partial(torch.softmax, dim=dim))
        self.no_relevance[self.slot_of[node]] = (
            node, "its output is used as a signal (relevance would have to pass through the "
            "softmax); a softmax is supported as a gate (x * softmax(g)) and inside attention "
            "modules")

    def on_opaque(self, node: fx.Node) -> None:
        """A function or tensor method no handler covers: an :class:`Opaque` step, computed as
        the model computes it, the plan refused if relevance would pass through it."""
        if node.op == "call_method":
            fn = getattr(torch.Tensor, node.target, None)
        else:
            fn = node.target
        if not callable(fn) or _mutated_operand(node, self.gm) is not None:
            raise _unsupported(node, self.describe(node))  # (in place: tape entries would change)
        tensors: list[int] = []

        def convert(arg: fx.Node) -> SlotRef:
            if arg in self.constants:
                return SlotRef(self.operand(node, arg)[0])
            if arg not in self.slot_of:
                raise _unsupported(node, self.describe(node))
            if arg not in self.is_meta:
                tensors.append(self.slot_of[arg])
            return SlotRef(self.slot_of[arg])

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), convert)
        self.emit(node, Opaque, tuple(dict.fromkeys(tensors)), fn=fn, args=args, kwargs=kwargs)
        self.no_relevance[self.slot_of[node]] = (
            node, "it is not supported where relevance passes (an op without a rule is "
            "computed only on the query/key side of attention, inside a gate or for a "
            "constant)")

    def check_no_relevance_reaches(self) -> None:
        """Relevance must never reach a softmax output or an Opaque op: walk back from the
        output through every step's signal inputs (gates, constants, attention's query and
        key carry none)."""
        reached = {self.output_slot}
        for step in reversed(self.steps):
            if step.output in reached:
                reached.update(step.inputs)
        for slot, (node, why) in self.no_relevance.items():
            if slot in reached:
                raise _unsupported(node, self.describe(node), why)

    def check_alpha(self, node: fx.Node, name: str) -> None:
        kwargs = dict(node.kwargs)
        if kwargs.pop("alpha", 1) != 1 or kwargs:
            raise _unsupported(node, self.describe(node), f"torch.{name} with alpha or out=")

    def term(self, node: fx.Node, arg: Any) -> tuple[int, bool]:
        """``(slot, is constant)`` of an operand of a sum: a tensor, or a number made a
        :class:`Constant`; shape values are refused."""
        if _is_number(arg):
            return self.number(node, arg), True
        if not isinstance(arg, fx.Node) or arg in self.is_meta:
            raise _unsupported(node, self.describe(node), "a sum with a shape value or a "
                               f"non-number {arg!r} (only tensors, parameters, buffers and "
                               "numbers)")
        return self.operand(node, arg)

    def number(self, node: fx.Node, value: float) -> int:
        """The slot of a new :class:`Constant` holding ``value`` (float64: the forward casts
        it to its own dtype, as Python's arithmetic would)."""
        slot = self.num_slots
        self.steps.append(Constant(name=f"{node.name}_number", target=self.describe(node),
                                   inputs=(), output=slot,
                                   value=torch.tensor(value, dtype=torch.float64)))
        self.num_slots += 1
        self.const_slots.add(slot)
        return slot

    def on_parts(self, node: fx.Node, fn: Callable) -> None:
        """``chunk``/``split``/``unbind``: a tuple of views, taken apart by ``getitem``."""
        src = self.tensor_slot(node, node.args[0])
        self.parts_of[node] = (src, fn, self.refs(node.args[1:]), self.refs(node.kwargs))

    def on_getitem(self, node: fx.Node) -> None:
        base, index = node.args
        if base in self.attention_nodes:  # (output, weights) of nn.MultiheadAttention
            if index == 0:
                self.alias(node, base)
            elif node.users:
                raise _unsupported(node, self.describe(base),
                                   "the attention weights it returns are used (need_weights)")
            return
        if base in self.parts_of:
            src, fn, args, kwargs = self.parts_of[base]
            if not isinstance(index, int):
                raise _unsupported(node, self.describe(node), "a part index computed at run time")
            self.emit(node, Select, (src,), fn=fn, args=args, kwargs=kwargs, pick=index)
            return
        src = self.tensor_slot(node, base)
        parts = index if isinstance(index, tuple) else (index,)
        if not all(p is None or p is Ellipsis or isinstance(p, (int, slice, fx.Node))
                   for p in parts) or any(isinstance(p, fx.Node) and p not in self.is_meta
                                          for p in parts):
            raise _unsupported(node, self.describe(node),
                               "indexing by a tensor or list (only ints, slices, None, ...)")
        self.emit(node, Select, (src,), fn=operator.getitem, args=self.refs((index,)))

    def on_normalization(self, node: fx.Node, kind: str, module: nn.Module | None = None
                         ) -> None:
        """LayerNorm, RMSNorm, GroupNorm (``kind`` "layer", "rms", "group"), module or
        ``F.*`` function, as one :class:`Normalization` step."""
        if module is not None:
            weight, bias = module.weight, getattr(module, "bias", None)
            eps = module.eps
            size = module.num_groups if kind == "group" else module.normalized_shape
        else:
            names = {"layer": ("input", "normalized_shape", "weight", "bias", "eps"),
                     "rms": ("input", "normalized_shape", "weight", "eps"),
                     "group": ("input", "num_groups", "weight", "bias", "eps")}[kind]
            given = {**dict(zip(names, node.args)), **node.kwargs}
            size = given[names[1]]
            eps = given.get("eps", None if kind == "rms" else 1e-5)
            weight, bias = (self.constant_or_none(node, given.get(k)) for k in ("weight", "bias"))
        if any(isinstance(v, fx.Node) for v in (eps, *_tuple(size, 1))):
            raise _unsupported(node, self.describe(node), "a shape, group count or eps "
                               "computed at run time")
        shape = {} if kind == "group" else {"dims": tuple(range(-len(_tuple(size, 1)), 0))}
        self.emit(node, Normalization, (self.tensor_slot(node, node.args[0]),), kind=kind,
                  weight=None if weight is None else weight.detach(),
                  bias=None if bias is None else bias.detach(),
                  eps=None if eps is None else float(eps),
                  num_groups=int(size) if kind == "group" else None, **shape)

    def on_written_layer_norm(self, node: fx.Node, norm: _WrittenLayerNorm) -> None:
        """A layer norm written out in ``forward``: the same step as ``nn.LayerNorm`` over
        its dims (RLRP_SPEC.md: recognised where the pattern is exact)."""
        weight, bias = (None if t is None else _constant_value(t, self.gm)
                        for t in (norm.weight, norm.bias))
        self.emit(node, Normalization, (self.tensor_slot(node, norm.x),), kind="layer",
                  weight=weight, bias=bias, eps=norm.eps, dims=norm.dims)

    def constant_or_none(self, node: fx.Node, arg: Any) -> torch.Tensor | None:
        if arg is None:
            return None
        if arg not in self.constants:
            raise _unsupported(node, self.describe(node), "a weight or bias computed in forward")
        return self.constants[arg]

    def on_mul(self, node: fx.Node) -> None:
        """A product with a gate (the output of a Sigmoid or Hardsigmoid, through reshapes):
        relevance goes to the other operand, the signal. ``x * sigmoid(x)`` is SiLU."""
        operands = node.args
        tensors = [a for a in operands if isinstance(a, fx.Node) and a not in self.is_meta
                   and a not in self.constants]
        if node.kwargs or len(operands) != 2 or not tensors:
            raise _unsupported(node, self.describe(node), "only the product of a tensor and a "
                               "gate, a parameter or a number is supported")
        if len(tensors) == 1:  # scaling by a constant: the constant is the gate
            other = operands[1] if operands[0] is tensors[0] else operands[0]
            if isinstance(other, fx.Node) and other not in self.constants:
                raise _unsupported(node, self.describe(node), "a product with a shape value")
            # a number in float64: the forward casts it to its own dtype, as Python's would
            value = self.constants[other] if isinstance(other, fx.Node) else \
                torch.tensor(other, dtype=torch.float64)
            self.emit_scale(node, tensors[0], value)
            return
        slots = [self.slot_of[a] for a in operands]
        consts = [s for s in slots if s in self.const_slots]
        if len(consts) == 1:  # scaling by a reshaped constant (p.view(-1, 1, 1)): a scale
            signal = slots[1] if slots[0] == consts[0] else slots[0]
            self.emit(node, Gate, (signal,), gate=consts[0])
            return
        if consts:
            raise _unsupported(node, self.describe(node), "a product of constants only")
        gates = [s for s in slots if s in self.gate_of]
        if not gates:  # a product of two signals: both share the relevance
            self.emit(node, Product, tuple(slots), kind="mul")
            return
        if len(gates) != 1:
            raise _unsupported(node, self.describe(node), "both operands are gates")
        gate = gates[0]
        signal = slots[1] if slots[0] == gate else slots[0]
        activation, source = self.gate_of[gate]
        if source == signal and gate not in self.view_of and _GATES[activation] is not None:
            self.emit(node, Activation, (signal,), fn=_GATES[activation])  # x * sigmoid(x)
        else:
            self.emit(node, Gate, (signal,), gate=gate)

    def emit_scale(self, node: fx.Node, signal: fx.Node, value: torch.Tensor) -> None:
        """``signal`` scaled by a constant ``value``: a :class:`Gate` on a :class:`Constant`."""
        if not value.is_floating_point():
            value = value.to(torch.float64)
        self.steps.append(Constant(name=f"{node.name}_constant", target=self.describe(node),
                                   inputs=(), output=self.num_slots, value=value))
        self.num_slots += 1
        self.emit(node, Gate, (self.tensor_slot(node, signal),), gate=self.num_slots - 1)

    def on_div(self, node: fx.Node) -> None:
        """``x / c`` with a number ``c`` (``x / 255``): scaling by the constant ``1/c``."""
        numerator, denominator = (node.args + (None,))[:2]
        if node.kwargs or len(node.args) != 2 or not isinstance(numerator, fx.Node) or \
                isinstance(denominator, (fx.Node, bool)) or \
                not isinstance(denominator, (int, float)) or denominator == 0:
            raise _unsupported(node, self.describe(node), "only a tensor divided by a "
                               "non-zero number is supported (a division by a tensor, a "
                               "parameter or a shape value is not)")
        # a number in float64: the forward casts it to its own dtype, as Python's would
        self.emit_scale(node, numerator, torch.tensor(1 / denominator, dtype=torch.float64))

    def on_matmul(self, node: fx.Node) -> None:
        """``u @ v`` of two signals (at least 3-D each): a :class:`Product`; with one of them
        a gate (``softmax(q kᵀ) @ v``, attention written out), a matmul :class:`Gate`."""
        if node.kwargs or len(node.args) != 2:
            raise _unsupported(node, self.describe(node), "matmul with out= or options")
        slots = []
        for arg in node.args:
            slot, const = self.operand(node, arg)
            if const:
                raise _unsupported(node, self.describe(node), "a matmul with a parameter or "
                                   "buffer (write it as nn.Linear)")
            slots.append(slot)
        gates = [s in self.gate_of for s in slots]
        if all(gates):
            raise _unsupported(node, self.describe(node), "both operands are gates")
        if any(gates):
            left, right = slots
            self.emit(node, Gate, (right if gates[0] else left,), gate=left if gates[0] else right,
                      kind="matmul", gate_left=gates[0])
            return
        self.emit(node, Product, tuple(slots), kind="matmul")

    def on_activation(self, node: fx.Node, fn: Callable) -> None:
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        extra = node.args[1:]
        if fn is F.leaky_relu and extra:
            kwargs["negative_slope"] = extra[0]
            extra = ()
        if fn is F.elu and extra:
            kwargs["alpha"] = extra[0]
            extra = ()
        if extra and fn is F.relu:  # F.relu(x, inplace) positional
            extra = ()
        if extra:
            raise _unsupported(node, self.describe(node), "positional options of the activation")
        fn = functools.partial(fn, **kwargs) if kwargs else fn
        self.emit(node, Activation, (self.tensor_slot(node, node.args[0]),), fn=fn)

    def on_pool_function(self, node: fx.Node) -> None:
        cls, names = _POOL_FUNCTIONS[node.target]
        params = dict(zip(names, node.args[1:]))
        params.update(node.kwargs)
        params.pop("return_indices", None)
        if any(isinstance(v, fx.Node) for v in params.values()):
            raise _unsupported(node, self.describe(node), "pooling sizes computed at run time")
        module = cls(**params)
        step, fields = _pool_step(module)
        self.emit(node, step, (self.tensor_slot(node, node.args[0]),), **fields)

    def on_reshape(self, node: fx.Node, fn: Callable) -> None:
        src, const = self.operand(node, node.args[0])
        self.emit(node, Reshape, (src,), fn=fn, args=self.refs(node.args[1:]),
                  kwargs=self.refs(node.kwargs))
        if const:
            self.const_slots.add(self.slot_of[node])

    def on_permute(self, node: fx.Node, method: str) -> None:
        src = self.tensor_slot(node, node.args[0])
        rest = node.args[1:]
        if any(isinstance(a, fx.Node) for a in fx.node.map_aggregate(rest, lambda x: x) or ()):
            raise _unsupported(node, self.describe(node), "dims computed at run time")
        if method == "transpose":
            d0, d1 = (rest + (node.kwargs.get("dim0"), node.kwargs.get("dim1")))[:2]
            undo = functools.partial(torch.transpose, dim0=d0, dim1=d1)
            self.emit(node, Reshape, (src,), fn=torch.transpose, args=(d0, d1), undo=undo)
            return
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        dims = tuple(d % len(dims) for d in (dims or node.kwargs["dims"]))
        inverse = tuple(sorted(range(len(dims)), key=dims.__getitem__))
        self.emit(node, Reshape, (src,), fn=torch.permute, args=(dims,),
                  undo=functools.partial(torch.permute, dims=inverse))

    def on_cat(self, node: fx.Node) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            raise _unsupported(node, self.describe(node), "a dim computed at run time")
        slots = [self.operand(node, t) for t in tensors]
        if not any(const for _, const in slots):
            self.emit(node, Cat, tuple(s for s, _ in slots), dim=dim)
            return
        self.emit(node, Cat, tuple(s for s, const in slots if not const), dim=dim,
                  operands=tuple(s for s, _ in slots))
        if all(const for _, const in slots):
            self.const_slots.add(self.slot_of[node])

    def on_expand(self, node: fx.Node, fn: Callable) -> None:
        """``expand``/``expand_as``/``broadcast_to``/``repeat``: of a constant
        (``class_token.expand(n, -1, -1)``) it stays a constant (no relevance comes back);
        of a signal it is a :class:`Broadcast` (each element gets its copies' relevance)."""
        src, const = self.operand(node, node.args[0])
        if fn is torch.Tensor.expand_as:  # the shape comes from a tensor read, not explained
            args, kwargs = (SlotRef(self.operand(node, node.args[1])[0]),), {}
        else:
            args, kwargs = self.refs(node.args[1:]), self.refs(node.kwargs)
        if const:
            self.emit(node, Reshape, (src,), fn=fn, args=args, kwargs=kwargs)
        else:
            self.emit(node, Broadcast, (src,), fn=fn, args=args, kwargs=kwargs,
                      tiled=fn is torch.Tensor.repeat)
        if const:
            self.const_slots.add(self.slot_of[node])

    def on_shaped_like(self, node: fx.Node, fn: Callable) -> None:
        """``view_as``/``reshape_as``: a reshape whose shape is another tensor's (read for its
        shape only: it gets no relevance)."""
        if len(node.args) != 2 or node.kwargs:
            raise _unsupported(node, self.describe(node), "unexpected arguments")
        src = self.tensor_slot(node, node.args[0])
        self.emit(node, Reshape, (src,), fn=fn, args=(SlotRef(self.operand(node, node.args[1])[0]),))

    def on_multihead_attention(self, node: fx.Node, module: nn.MultiheadAttention) -> None:
        """``nn.MultiheadAttention`` as one :class:`Attention` step (masks are read, as the
        query and key are: they shape ``P``, which is held constant)."""
        what = f"module {node.target!r} (MultiheadAttention)"
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        flags = {k: given.get(k, k == "need_weights") for k in ("need_weights", "is_causal")}
        if any(isinstance(v, fx.Node) for v in flags.values()):
            raise _unsupported(node, what, "need_weights or is_causal computed at run time")
        if flags["is_causal"] and given.get("attn_mask") is None:
            raise _unsupported(node, what, "is_causal=True without attn_mask (torch needs the "
                               "mask too; pass it)")
        if module.bias_k is not None or module.bias_v is not None:
            raise _unsupported(node, what, "bias_k/bias_v (add_bias_kv=True)")
        if module.add_zero_attn:
            raise _unsupported(node, what, "add_zero_attn=True")
        if module.training and module.dropout > 0:
            raise _unsupported(node, what, "dropout in training mode (call model.eval())")
        # torch's own reading of is_causal: a hint that replaces attn_mask by the causal
        # mask only without a padding mask and without weights; otherwise attn_mask is used
        causal = bool(flags["is_causal"]) and given.get("key_padding_mask") is None and \
            not flags["need_weights"]
        mask = None if causal else self.mask_slot(node, given.get("attn_mask"))
        if module.in_proj_weight is not None:
            wq, wk, wv = module.in_proj_weight.detach().chunk(3)
        else:
            wq, wk, wv = (module.q_proj_weight.detach(), module.k_proj_weight.detach(),
                          module.v_proj_weight.detach())
        bq = bk = bv = None
        if module.in_proj_bias is not None:
            bq, bk, bv = module.in_proj_bias.detach().chunk(3)
        out = module.out_proj
        value = self.tensor_slot(node, given["value"])
        self.emit(node, Attention, (value,), query=self.tensor_slot(node, given["query"]),
                  key=self.tensor_slot(node, given["key"]), num_heads=module.num_heads,
                  q_weight=wq, k_weight=wk, v_weight=wv, q_bias=bq, k_bias=bk, v_bias=bv,
                  out_weight=out.weight.detach(),
                  out_bias=None if out.bias is None else out.bias.detach(), mask=mask,
                  padding_mask=self.mask_slot(node, given.get("key_padding_mask")),
                  causal=causal, batch_first=bool(module.batch_first))
        self.attention_nodes.add(node)

    def mask_slot(self, node: fx.Node, arg: Any) -> int | None:
        """The slot of an attention mask (a parameter or buffer, or a tensor computed in
        ``forward``), None for none."""
        if arg is None:
            return None
        if not isinstance(arg, fx.Node) or arg in self.is_meta:
            raise _unsupported(node, self.describe(node), f"an attention mask {arg!r} that "
                               "is not a tensor")
        return self.operand(node, arg)[0]

    def on_sdpa(self, node: fx.Node) -> None:
        """``F.scaled_dot_product_attention(q, k, v)`` as one :class:`Attention` step."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        what = "scaled_dot_product_attention"
        causal = given.get("is_causal", False)
        if not isinstance(causal, bool):
            raise _unsupported(node, what, "is_causal computed at run time")
        if causal and given.get("attn_mask") is not None:
            raise _unsupported(node, what, "both attn_mask and is_causal (torch refuses it too)")
        if given.get("dropout_p", 0.0) != 0.0:
            raise _unsupported(node, what, "dropout_p > 0")
        if given.get("enable_gqa", False) is not False:
            raise _unsupported(node, what, "enable_gqa=True")
        scale = given.get("scale")
        if scale is not None and not isinstance(scale, (int, float)):
            raise _unsupported(node, what, "a scale computed at run time")
        self.emit(node, Attention, (self.tensor_slot(node, given["value"]),),
                  query=self.tensor_slot(node, given["query"]),
                  key=self.tensor_slot(node, given["key"]),
                  scale=None if scale is None else float(scale),
                  mask=self.mask_slot(node, given.get("attn_mask")), causal=causal)

    def on_window_attention(self, node: fx.Node, module: nn.Module) -> None:
        """torchvision's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` (Swin) or
        ``RelativePositionalMultiHeadAttention`` (MaxViT), a leaf of the trace, as one
        :class:`WindowAttention` step."""
        what = f"module {node.target!r} ({type(module).__name__})"
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(node, what, "called with more than one argument")
        if hasattr(module, "to_qkv"):  # MaxViT: windows laid out by the caller
            qkv, proj, fields = module.to_qkv, module.merge, dict(
                window_size=None, shift_size=(0, 0), num_heads=module.n_heads,
                scale=float(module.scale_factor), out_proj="merge")
        else:
            if module.training and (module.attention_dropout > 0 or module.dropout > 0):
                raise _unsupported(node, what, "dropout in training mode (call model.eval())")
            qkv, proj, fields = module.qkv, module.proj, dict(
                window_size=tuple(module.window_size), shift_size=tuple(module.shift_size),
                num_heads=module.num_heads)
        fields.update(qkv_weight=qkv.weight.detach(),
                      qkv_bias=None if qkv.bias is None else qkv.bias.detach(),
                      proj_weight=proj.weight.detach(),
                      proj_bias=None if proj.bias is None else proj.bias.detach(),
                      bias_index=module.relative_position_index)
        if hasattr(module, "cpb_mlp"):  # Swin V2: cosine attention, continuous position bias
            mlp = module.cpb_mlp
            layers = [type(m) for m in mlp] if isinstance(mlp, nn.Sequential) else []
            if layers != [nn.Linear, nn.ReLU, nn.Linear]:
                raise _unsupported(node, what, "a position-bias MLP other than torchvision's "
                                   "Linear, ReLU, Linear")
            fields.update(logit_scale=module.logit_scale.detach(),
                          coords_table=module.relative_coords_table,
                          cpb_weights=tuple(None if t is None else t.detach() for t in (
                              mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)))
        else:
            fields.update(bias_table=module.relative_position_bias_table.detach())
        self.emit(node, WindowAttention, (self.tensor_slot(node, node.args[0]),), **fields)

    def on_pad(self, node: fx.Node) -> None:
        """``F.pad`` in constant mode: the padded elements are constants."""
        names = ("input", "pad", "mode", "value")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        mode = given.get("mode", "constant")
        if mode != "constant":
            raise _unsupported(node, self.describe(node), f"mode={mode!r} (only constant "
                               "padding; reflect, replicate and circular copy elements)")
        value = given.get("value")
        if isinstance(value, fx.Node):
            raise _unsupported(node, self.describe(node), "a pad value computed at run time")
        pad = given["pad"]
        self.emit(node, Pad, (self.tensor_slot(node, given["input"]),),
                  pad=self.refs(pad if isinstance(pad, fx.Node) else tuple(pad)),
                  value=0.0 if value is None else float(value))

    def on_roll(self, node: fx.Node) -> None:
        """``torch.roll`` along given dims (not the batch): relevance rolls back."""
        names = ("input", "shifts", "dims")
        given = {**dict(zip(names, node.args)), **node.kwargs}
        shifts, dims = given["shifts"], given.get("dims")
        if any(isinstance(a, fx.Node) for a in fx.node.map_aggregate((shifts, dims),
                                                                      lambda a: a)):
            raise _unsupported(node, self.describe(node), "shifts or dims computed at run time")
        if dims is None or (isinstance(dims, (tuple, list)) and not dims):
            raise _unsupported(node, self.describe(node), "roll without dims (it rolls the "
                               "flattened tensor, across samples)")
        shifts, dims = tuple(_tuple(shifts, 1)), tuple(_tuple(dims, 1))
        self.emit(node, Reshape, (self.tensor_slot(node, given["input"]),), fn=_roll,
                  args=(shifts, dims),
                  undo=functools.partial(_roll, shifts=tuple(-s for s in shifts), dims=dims))

    def on_mean(self, node: fx.Node) -> None:
        src = self.tensor_slot(node, node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or "dtype" in node.kwargs:
            raise _unsupported(node, self.describe(node),
                               "mean over all dims (including the batch) or with dtype=")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if any(not isinstance(d, int) for d in dims):
            raise _unsupported(node, self.describe(node), "dims computed at run time")
        self.emit(node, Pool, (src,), kind="mean", dims=0,
                  params=dict(dims=dims, keepdim=bool(keepdim)))


@dataclass(frozen=True)
class _WrittenLayerNorm:
    """A layer norm written out in ``forward`` (the original ConvNeXt's channels-first one):
    ``(x − mean) / sqrt(var + eps)``, optionally ``· weight + bias`` (constants); ``nodes``
    are the ones it replaces, ``end`` the node whose value it is."""

    x: fx.Node
    dims: tuple[int, ...]
    eps: float
    weight: fx.Node | None
    bias: fx.Node | None
    nodes: frozenset
    end: fx.Node


def _call(node: Any, *names) -> bool:
    """``node`` calls the function or method named ``names`` (``"sub"`` matches
    ``operator.sub``, ``torch.sub`` and ``Tensor.sub``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in names
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) in names and \
            getattr(node.target, "__module__", "") in ("_operator", "operator", "torch")
    return False


def _reduce_dims(node: fx.Node, fn: str, **required) -> tuple[int, ...] | None:
    """The dims of ``x.mean(dims, keepdim=True)`` (``fn`` "mean") or of a biased
    ``x.var(dims, keepdim=True, correction=0 | unbiased=False)`` (``fn`` "var"), else None."""
    if not _call(node, fn) or len(node.args) > 2:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
    if fn == "var":
        biased = kwargs.pop("correction", None) == 0 or kwargs.pop("unbiased", True) is False
        kwargs.pop("unbiased", None)
        if not biased:
            return None
    if kwargs != {"keepdim": True}:
        return None
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or \
            not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def _is_square_of(node: Any, base: Callable[[Any], bool]) -> fx.Node | None:
    """``node`` is ``t ** 2``, ``t.pow(2)`` or ``t * t`` with ``base(t)``: returns ``t``."""
    if _call(node, "pow") and len(node.args) == 2 and node.args[1] == 2 and \
            base(node.args[0]):
        return node.args[0]
    if _call(node, "mul") and len(node.args) == 2 and node.args[0] is node.args[1] and \
            base(node.args[0]):
        return node.args[0]
    return None


def _match_written_layer_norm(end: fx.Node) -> _WrittenLayerNorm | None:
    """``end`` = ``(x − μ) / sqrt(v + eps)`` or ``(x − μ) * rsqrt(v + eps)``, ``μ`` the mean
    of ``x`` over some dims (keepdim), ``v`` the biased variance over the same dims written
    as ``mean((x − μ)²)`` or ``var(x, correction=0)``; then an optional ``weight · _`` and
    ``_ + bias`` of constants. None unless the pattern is exact and its inner values are
    used nowhere else."""
    if _call(end, "truediv", "div") and len(end.args) == 2:
        centred, root = end.args
        if not _call(root, "sqrt"):
            return None
    elif _call(end, "mul") and len(end.args) == 2 and _call(end.args[1], "rsqrt"):
        centred, root = end.args
    else:
        return None
    if not (_call(centred, "sub") and len(centred.args) == 2 and not centred.kwargs):
        return None
    x, mean = centred.args
    dims = _reduce_dims(mean, "mean") if isinstance(mean, fx.Node) else None
    if dims is None or mean.args[0] is not x:
        return None
    shifted = root.args[0] if len(root.args) == 1 else None
    if not (_call(shifted, "add") and len(shifted.args) == 2 and not shifted.kwargs):
        return None
    spread, eps = shifted.args
    if isinstance(spread, (int, float)):
        spread, eps = eps, spread
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not isinstance(
            spread, fx.Node):
        return None
    nodes = {end, centred, mean, root, shifted, spread}
    if _reduce_dims(spread, "var") == dims and spread.args[0] is x:
        pass
    elif _reduce_dims(spread, "mean") == dims:
        def is_centred(t):
            return t is centred or (_call(t, "sub") and t.args == (x, mean) and not t.kwargs)
        square = spread.args[0]
        base = _is_square_of(square, is_centred)
        if base is None:
            return None
        nodes |= {square, base}
    else:
        return None
    for inner in nodes - {end}:  # each inner value feeds the pattern only
        if any(user not in nodes for user in inner.users):
            return None
    weight = bias = None
    users = list(end.users)
    if len(users) == 1 and _call(users[0], "mul") and len(users[0].args) == 2:
        other = [a for a in users[0].args if a is not end]
        if len(other) == 1 and _constant_expression(other[0]):
            weight, end = other[0], users[0]
            nodes |= {end, *_expression_nodes(weight)}
            users = list(end.users)
    if len(users) == 1 and _call(users[0], "add") and len(users[0].args) == 2 and \
            not users[0].kwargs:
        other = [a for a in users[0].args if a is not end]
        if len(other) == 1 and _constant_expression(other[0]):
            bias, end = other[0], users[0]
            nodes |= {end, *_expression_nodes(bias)}
    return _WrittenLayerNorm(x, dims, float(eps), weight, bias, frozenset(nodes), end)


_CONSTANT_VIEWS = ("view", "reshape", "unsqueeze", "getitem")


def _constant_expression(node: Any) -> bool:
    """A parameter or buffer, possibly indexed by ``None``/slices or reshaped with literal
    arguments (``self.weight[:, None, None]``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if not (_call(node, *_CONSTANT_VIEWS) and len(node.users) == 1):
        return False
    literal = not any(isinstance(a, fx.Node) for a in _flatten((node.args[1:], node.kwargs)))
    return literal and _constant_expression(node.args[0])


def _expression_nodes(node: fx.Node) -> list[fx.Node]:
    """The views of a :func:`_constant_expression` (its ``get_attr`` stays a node of its own)."""
    out = []
    while node.op != "get_attr":
        out.append(node)
        node = node.args[0]
    return out


def _flatten(obj) -> list:
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in _flatten(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flatten(o)]
    if isinstance(obj, slice):
        return [obj.start, obj.stop, obj.step]
    return [obj]


def _constant_value(node: fx.Node, gm: fx.GraphModule) -> torch.Tensor:
    """The value of a :func:`_constant_expression` (a view of the model's own tensor)."""
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value.detach()
    base = _constant_value(node.args[0], gm)
    if node.op == "call_function":  # operator.getitem
        return base[node.args[1]]
    return getattr(base, node.target)(*node.args[1:], **node.kwargs)


def _stochastic_depth_off(node: fx.Node) -> bool:
    """torchvision's ``stochastic_depth(input, p, mode, training)`` with training False."""
    training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    return training is False


def _pool_step(module: nn.Module) -> tuple[type, dict]:
    """``(step type, fields)`` of a pooling module, or of the module a pooling function stands
    for: max pools route relevance, average pools are linear maps."""
    kind = type(module)
    if kind in _MAXPOOLS:
        return MaxPool, dict(fn=_maxpool_fn(module, _MAXPOOLS[kind]))
    if kind in _AVGPOOLS:
        return Pool, dict(kind="avg", dims=_AVGPOOLS[kind], params=dict(
            kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
            ceil_mode=module.ceil_mode, count_include_pad=module.count_include_pad,
            divisor_override=getattr(module, "divisor_override", None)))
    return Pool, dict(kind="adaptive_avg", dims=_ADAPTIVE_AVGPOOLS[kind],
                      params=dict(output_size=module.output_size))


def _maxpool_fn(module: nn.Module, dims: int) -> Callable:
    if "Adaptive" in type(module).__name__:
        fn = getattr(F, f"adaptive_max_pool{dims}d")
        return functools.partial(fn, output_size=module.output_size, return_indices=True)
    fn = getattr(F, f"max_pool{dims}d")
    return functools.partial(fn, kernel_size=module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation,
                             ceil_mode=module.ceil_mode, return_indices=True)


_ASSERT_IS_NONE = getattr(fx._symbolic_trace, "_assert_is_none", None)


def _default(value: Any) -> Any:
    """An optional argument of ``forward``: its default (a Meta step's function)."""
    return value


def _optional_arguments(model: nn.Module) -> dict[str, Any]:
    """The arguments of ``forward`` after the input that have defaults (timm's
    ``attn_mask=None``), with those defaults: the explainer calls ``model(x)``, so the trace
    is specialised to them rather than taking them as inputs."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters[1:]
            if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _roll(x: torch.Tensor, shifts: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """``torch.roll``, refusing the batch dimension (rolling it would mix samples)."""
    if any(d % x.dim() == 0 for d in dims):
        raise ValueError(f"torch.roll along dims {dims} moves elements across the batch "
                         "dimension (samples would mix)")
    return torch.roll(x, shifts=shifts, dims=dims)


_WINDOW_ATTENTION = {"torchvision.models.swin_transformer": ("ShiftedWindowAttention",
                                                              "ShiftedWindowAttentionV2"),
                     "torchvision.models.maxvit": ("RelativePositionalMultiHeadAttention",)}


def _window_attention_types() -> tuple[type, ...]:
    """torchvision's window attention modules (Swin V1/V2, MaxViT), where torchvision has
    loaded them (a model built from them has; capture never imports torchvision itself)."""
    found = []
    for module_name, names in _WINDOW_ATTENTION.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, n) for n in names if hasattr(module, n)]
    return tuple(found)


def _traced_through_functions() -> set:
    """Functions torchvision hides from fx with ``torch.fx.wrap`` that are plain routing
    (Swin's patch merging: zero padding to even sizes, four strided slices, a cat): traced
    through, they become steps the plan supports."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    fn = getattr(swin, "_patch_merging_pad", None) if swin else None
    return {fn} if fn is not None else set()


@contextlib.contextmanager
def _unwrapped(functions: set) -> Iterator[None]:
    """While tracing, let fx trace through ``functions`` registered with ``torch.fx.wrap``
    (fx keeps them in a private registry); the registry is restored on any exit."""
    registry = getattr(fx._symbolic_trace, "_wrapped_fns_to_patch", None)
    removed = {}
    if isinstance(registry, dict):
        for key, frame in list(registry.items()):
            if frame.get(key[1]) in functions:
                removed[key] = registry.pop(key)
    try:
        yield
    finally:
        if removed:
            registry.update(removed)


class _Tracer(fx.Tracer):
    """fx's tracer, with torchvision's window attention modules kept whole (Swin's function
    branches on the feature map's size, which symbolic tracing cannot follow; MaxViT's is
    written with einsum)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in _window_attention_types() or \
            super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule``, traced the way capture reads it (optional
    arguments of ``forward`` fixed to their defaults)."""
    tracer = _Tracer()
    with _unwrapped(_traced_through_functions()):
        graph = tracer.trace(model, concrete_args=_optional_arguments(model) or None)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def capture(model: nn.Module) -> Plan:
    """Trace ``model`` and canonicalise it into a :class:`Plan` (see module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        gm = trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "rlrp_fast needs a model without data-dependent control flow, built from: "
            f"{SUPPORTED_OPS}.") from exc
    return _Builder(gm).build()
