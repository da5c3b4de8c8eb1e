"""The fused ops as torch.library custom ops, so that torch.compile traces a model through them.

Each fused op (its whole chunk loop, with the host synchronizations it needs: the mask's live rows,
the target-range check) is one opaque operator of the ``lvrpo_fast`` namespace with a fake
implementation giving its output shapes. Dynamo records one node per call instead of breaking the
graph at every chunk, and ``torch.compile(fullgraph=True)`` works around them.

Non-tensor inputs travel as one frozen dataclass per op (the Params classes of the op modules). An
operator's schema cannot take a dataclass, so the schema's scalar arguments are generated here from
the dataclass's fields and the dataclass is rebuilt from them inside the operator: the field list is
written once, in the dataclass.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch

from .. import backends, vocab_parallel
from ..options import OPTION_FIELDS, GRPOOptions

NAMESPACE = "lvrpo_fast"
_LIB = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 (a namespace of our own, defined once)

# Annotation (as written in the dataclasses, under `from __future__ import annotations`) -> schema type.
_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool", "int": "int", "Optional[float]": "float?",
                 "Optional[int]": "int?"}
# GRPOOptions.num_items_in_batch is a number or a tensor: it travels as both a `float?` and a `Tensor?`.
_NUM_ITEMS = "num_items_in_batch"
NUM_ITEMS_TENSOR = "num_items_tensor"


def _field_schema(cls) -> List[Tuple[str, str]]:
    """[(name, schema type)] of a dataclass of scalars, a nested GRPOOptions flattened into its fields."""
    out = []
    for f in dataclasses.fields(cls):
        if f.type in ("GRPOOptions", GRPOOptions):
            out += _options_schema()
        elif f.type in _SCHEMA_TYPES:
            out.append((f.name, _SCHEMA_TYPES[f.type]))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no operator schema type for annotation {f.type!r}")
    return out


def _options_schema() -> List[Tuple[str, str]]:
    types = {f.name: f.type for f in dataclasses.fields(GRPOOptions)}
    out = []
    for name in OPTION_FIELDS:
        out.append((name, "float?" if name == _NUM_ITEMS else _SCHEMA_TYPES[types[name]]))
    return out


class ParamsCodec:
    """Flattens a Params dataclass into operator arguments and rebuilds it inside the operator."""

    def __init__(self, cls):
        self.cls = cls
        self.fields = tuple(f.name for f in dataclasses.fields(cls))
        self.nested = tuple(f.name for f in dataclasses.fields(cls) if f.type in ("GRPOOptions", GRPOOptions))
        self.schema = _field_schema(cls)
        self.names = tuple(name for name, _ in self.schema)

    def schema_args(self) -> str:
        return ", ".join(f"{kind} {name}" for name, kind in self.schema)

    def encode(self, params) -> Tuple[Dict[str, object], object]:
        """(scalar keyword arguments, the num_items tensor or None)."""
        kwargs, tensor = {}, None
        for name in self.fields:
            value = getattr(params, name)
            if name in self.nested:
                for option in OPTION_FIELDS:
                    v = getattr(value, option)
                    if option == _NUM_ITEMS and isinstance(v, torch.Tensor):
                        tensor, v = v, None
                    kwargs[option] = v
            else:
                kwargs[name] = value
        return kwargs, tensor

    def decode(self, kwargs: Dict[str, object], num_items_tensor=None):
        values = {}
        for name in self.fields:
            if name in self.nested:
                options = {o: kwargs[o] for o in OPTION_FIELDS}
                if num_items_tensor is not None:
                    options[_NUM_ITEMS] = num_items_tensor
                values[name] = GRPOOptions(**options)
            else:
                values[name] = kwargs[name]
        return self.cls(**values)


def define(name: str, leading: str, codec: "ParamsCodec", returns: str, impl, fake) -> None:
    """Defines lvrpo_fast::<name>(<leading>, <the codec's scalars>) -> <returns>, with one implementation
    for every device and its fake. The operator receives every argument positionally; impl and fake
    are called as f(*leading arguments, **scalars by name)."""
    _LIB.define(f"{name}({leading}, {codec.schema_args()}) -> {returns}")
    n = leading.count(",") + 1
    names = codec.names

    def split(fn):
        return lambda *args: fn(*args[:n], **dict(zip(names, args[n:])))

    _LIB.impl(name, split(impl), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", split(fake), lib=_LIB)


def op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


def register_autograd(name: str, backward, setup_context) -> None:
    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=_LIB)


def refuse_double_backward(op_name: str, backend: str) -> None:
    """Raises when a backward pass builds a graph (create_graph=True): the fused ops' gradients come from
    hand-written kernels that autograd cannot differentiate again, and silently returning a gradient
    without a graph would drop every second-order term."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op_name}: double backward (torch.autograd.grad(..., create_graph=True), gradient penalties) is "
            f"not supported by the {backend} backend, whose gradients come from hand-written kernels; use "
            f"backend='reference' for second-order gradients")


def primitives(backend: str, vocab_parallel_key: int):
    """(the backend's row primitives, the vocab-parallel Partition or None) for an op's scalars: with a
    partition (registered by the public op, lvrpo_fast.vocab_parallel: a schema cannot carry a process
    group, so the op receives its integer key), the primitives of this rank's vocabulary shard."""
    prims = backends.primitives(backend)
    partition = vocab_parallel.lookup(vocab_parallel_key)
    if partition is None:
        return prims, None
    return vocab_parallel.ShardPrimitives(prims, partition), partition


def empty() -> torch.Tensor:
    """The placeholder output of a tensor an op was not asked for (schemas have no optional outputs)."""
    return torch.empty(0)
