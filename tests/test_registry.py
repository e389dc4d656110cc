import pytest

from kiln.ir import REGISTRY, Attr, AttrError, DeclarationError, OpDef, Registry, TensorType, UnknownOpError


def _infer(x):
    return x


def _ref(x):
    return x


def test_core_op_set_is_complete():
    expected = {
        "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
        "logical_and", "logical_or", "logical_not", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
        "reciprocal", "sin", "cos", "tanh", "erf", "sigmoid", "relu", "silu", "gelu", "clamp", "where",
        "cast", "reshape", "transpose", "permute", "expand", "slice", "concat", "split", "squeeze",
        "unsqueeze", "matmul", "linear", "embedding", "gather", "index_select", "sum", "mean", "max",
        "min", "argmax", "softmax", "log_softmax", "rms_norm", "layer_norm", "rotary", "attention", "paged_attention",
        "add_rms_norm", "add_layer_norm", "gated_activation", "qkv_rotary",
        "full", "arange", "all_reduce", "all_gather", "expm1", "softplus", "topk", "moe_experts", "moe",
        "linear_int8", "linear_int4", "linear_fp8", "linear_w8a8", "rms_norm_quant", "add_rms_norm_quant",
        "scaled_linear", "conv",
        "mla_attention", "paged_mla_attention", "moe_route", "log1p", "floor",
        "moe_all_to_all", "moe_experts_all_to_all",
    }
    assert set(REGISTRY.names()) == expected
    assert all(op.doc for op in REGISTRY), [op.name for op in REGISTRY if not op.doc]


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="Bad-Name", operands=("x",)), "invalid op name"),
    (dict(name="op", operands=("x", "x")), "unique"),
    (dict(name="op", operands=("xs*", "y")), "only the last operand may be variadic"),
    (dict(name="op", operands=("a?", "b")), "follows an optional one"),
    (dict(name="op", operands=("x",), attrs={"x": Attr("int")}), "unique"),
    (dict(name="op", operands=("x",), attrs={"k": "int"}), "must be a named Attr"),
    (dict(name="op", operands=("x", "y", "z"), commutative=True), "commutative"),
    (dict(name="op", operands=("x", "y")), "cannot be called as"),
])
def test_malformed_declarations_fail_when_declared(kwargs, message):
    kwargs = {"infer": _infer, "reference": _ref, **kwargs}
    with pytest.raises(DeclarationError, match=message):
        OpDef(**kwargs)


def test_bad_attribute_declarations():
    with pytest.raises(DeclarationError, match="attribute kind"):
        Attr("complex")
    with pytest.raises(DeclarationError, match="choices"):
        Attr("int", choices=("a",))
    with pytest.raises(AttrError, match="expects int"):
        Attr("int", default="three")


def test_registry_rejects_duplicates_and_names_unknown_ops():
    op = OpDef("my_op", ("x",), _infer, _ref)
    registry = REGISTRY.extended([op])
    assert "my_op" in registry and "my_op" not in REGISTRY
    with pytest.raises(DeclarationError, match="already registered"):
        registry.register(op)
    with pytest.raises(UnknownOpError, match="unknown op 'nope'"):
        Registry()["nope"]


def test_attribute_coercion_and_defaults():
    gelu = REGISTRY["gelu"]
    assert gelu.complete_attrs({}) == {"approximate": "none"}
    with pytest.raises(AttrError, match="must be one of"):
        gelu.complete_attrs({"approximate": "fast"})
    with pytest.raises(AttrError, match="has no attribute 'bogus'"):
        gelu.complete_attrs({"bogus": 1})
    reshape = REGISTRY["reshape"]
    with pytest.raises(AttrError, match="needs attribute 'shape'"):
        reshape.complete_attrs({})
    assert reshape.complete_attrs({"shape": [2, 3]}) == {"shape": (2, 3)}
    assert REGISTRY["split"].result_count({"sizes": (1, 2, 3)}) == 3


def test_custom_op_in_a_custom_registry():
    from kiln.ir import Graph, interpret, ops, verify
    import torch

    def infer(x, times):
        return x

    square_plus = OpDef("times_square", ("x",), infer, lambda x, times: x * x * times,
                        attrs={"times": Attr("float", 1.0)}, doc="x * x * times")
    g = Graph("custom", REGISTRY.extended([square_plus]))
    x = g.add_input("x", TensorType("f32", (3,)))
    g.set_outputs([ops.times_square(x, times=2.0)])
    verify(g)
    t = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(interpret(g, [t])[0], t * t * 2)
