"""int8 GPT-2 (serve_app/models/int8.py): a linear split across two quantized engines computes
what one engine does, for few rows and for many, and costs its second packing in memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from serve_app.models.device import Int8Engines
from serve_app.models.int8 import SplitInt8Linear, quantize_int8, resident_bytes

SUPPORTED = set(torch.backends.quantized.supported_engines)
needs_both = pytest.mark.skipif(
    not {"fbgemm", "onednn"} <= SUPPORTED, reason="torch built without fbgemm or oneDNN"
)
SPLIT = Int8Engines("fbgemm", "onednn", 8)
ONE = Int8Engines("fbgemm", "fbgemm")


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def int8_linears(model: nn.Module) -> list[nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return [m for m in model.modules() if isinstance(m, (DynamicQuantizedLinear, SplitInt8Linear))]


@needs_both
def test_split_model_gives_the_one_engine_models_logits_for_few_and_many_rows():
    base = tiny_gpt2()
    one = quantize_int8(copy.deepcopy(base), ONE)
    split = quantize_int8(copy.deepcopy(base), SPLIT)
    linears = int8_linears(split)
    assert len(linears) == 4 * 2 + 1 and all(isinstance(m, SplitInt8Linear) for m in linears)
    assert not any(isinstance(m, SplitInt8Linear) for m in one.modules())
    with torch.inference_mode():
        for ids in (torch.tensor([[5]]), torch.arange(3, 3 + 2 * 12).reshape(2, 12)):  # 1, 24 rows
            want, got = one(ids).logits, split(ids).logits
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@needs_both
def test_a_split_linear_holds_two_packings_of_one_int8_weight():
    base = tiny_gpt2()
    one = quantize_int8(copy.deepcopy(base), ONE)
    split = quantize_int8(copy.deepcopy(base), SPLIT)
    # The second packing: one byte per weight, and a float32 scale and int32 zero point per
    # output channel (the bias is the same one).
    extra = sum(m.weight().numel() + 8 * m.out_features for m in int8_linears(one))
    assert resident_bytes(split) - resident_bytes(one) == extra
    for a, b in zip(int8_linears(one), int8_linears(split), strict=True):
        assert torch.equal(a._weight_bias()[0].int_repr(), b._weight_bias()[0].int_repr())


def test_a_split_other_than_fbgemm_and_onednn_leaves_one_engine():
    model = quantize_int8(tiny_gpt2(), Int8Engines("fbgemm", "no-such-engine", 8))
    assert not any(isinstance(m, SplitInt8Linear) for m in model.modules())
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_torch_without_onednn_int8_ops_gets_the_fbgemm_model(monkeypatch):
    from serve_app.models import int8

    monkeypatch.setattr(int8, "_onednn_qlinear", False)  # what a failed probe leaves
    model = quantize_int8(tiny_gpt2(), SPLIT)
    assert len(int8_linears(model)) == 4 * 2 + 1
    assert not any(isinstance(m, SplitInt8Linear) for m in model.modules())


def test_int8_mlp_activation_stays_within_int8_noise_of_gelu_new():
    """The int8 model swaps GPT-2's tanh GELU for the faster exact one: they differ far less
    than the 7-bit activation quantization that follows (one step is range / 127)."""
    from transformers.activations import NewGELUActivation

    model = quantize_int8(tiny_gpt2(), ONE)
    acts = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(acts) == 2 and not any(isinstance(m, NewGELUActivation) for m in model.modules())
    x = torch.linspace(-12, 12, 100_001)
    for act in acts:
        assert (act(x) - NewGELUActivation()(x)).abs().max() < 5e-4
