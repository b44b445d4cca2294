"""oneDNN kernels (serve_app/generation/kernels.py) on a real tiny GPT-2: the same numbers as stock
transformers, within the rounding of a different summation order."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from serve_app.config import ModelSpec
from serve_app.generation import kernels
from serve_app.models.loading import load_model
from serve_app.models.resolve import resolve_model

needs_onednn = pytest.mark.skipif(
    not kernels.packing_available(torch.float32), reason="oneDNN packed linear unavailable"
)


def load(root, **kw):
    spec = ModelSpec(id="k", architecture="tiny", seed=3, **kw)
    return load_model(spec, resolve_model(spec, root, 1.0, offline=True), root)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 0, 5, 9, 300], [11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def prefill_then_step(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a left-padded prefill, then of one cached decode step (one query token)."""
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=-1)
        step = model(
            input_ids=torch.tensor([[7], [8]]),
            attention_mask=step_mask,
            position_ids=positions[:, -1:] + 1,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return out.logits[:, -1], step.logits[:, -1]


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_onednn_model_gives_the_stock_models_logits(tmp_path, dtype):
    if dtype == "bfloat16" and not kernels.packing_available(torch.bfloat16):
        pytest.skip("no bfloat16 oneDNN on this CPU")
    fast, stock = load(tmp_path, dtype=dtype), load(tmp_path, dtype=dtype, kernels="stock")
    assert (fast.kernels, stock.kernels) == ("onednn", "stock")
    ids, mask = padded_batch()
    got = prefill_then_step(fast.model, ids, mask)
    want = prefill_then_step(stock.model, ids, mask)
    # float32: summation order only. bfloat16: the stock decode step rounds its attention
    # scores and softmax to bfloat16; the decode attention keeps them in float32.
    tol = {"rtol": 1.3e-6, "atol": 1e-4} if dtype == "float32" else {"rtol": 0, "atol": 0.1}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), **tol)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@needs_onednn
def test_every_matmul_of_the_model_is_packed(tmp_path):
    loaded = load(tmp_path)
    modules = list(loaded.model.modules())
    assert not [m for m in modules if isinstance(m, (Conv1D, nn.Linear))]
    packed = [m for m in modules if isinstance(m, kernels.PackedLinear)]
    assert len(packed) == 4 * loaded.model.config.n_layer + 1  # c_attn, c_proj x2, c_fc; head
    assert loaded.model.config._attn_implementation == kernels.ATTENTION


def test_stock_and_int8_models_keep_their_own_kernels(tmp_path):
    for loaded, name in (
        (load(tmp_path, kernels="stock"), "stock"),
        (load(tmp_path, dtype="int8"), "int8"),
    ):
        assert loaded.kernels == name
        assert not [m for m in loaded.model.modules() if isinstance(m, kernels.PackedLinear)]


def test_a_torch_without_the_ops_gets_the_stock_model(tmp_path, monkeypatch):
    monkeypatch.setitem(kernels._checked, torch.float32, False)
    loaded = load(tmp_path)
    assert loaded.kernels == "stock"
    assert any(isinstance(m, Conv1D) for m in loaded.model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_for_one_query_token(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=gen) for n in (1, 9, 9))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    got, _ = kernels._decode_attention(
        nn.Module(), q.to(dtype), k.to(dtype), v.to(dtype), mask, scaling=None
    )
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    # Masked positions take no weight: changing them changes nothing.
    k2 = k.clone()
    k2[0, :, :4] = 100.0
    again, _ = kernels._decode_attention(nn.Module(), q, k2, v, mask)
    torch.testing.assert_close(again, want.to(again.dtype), rtol=1e-5, atol=1e-5)
