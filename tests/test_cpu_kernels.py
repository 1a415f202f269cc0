"""oneDNN-packed inference kernels compute what the plain model computes."""

import pytest
import torch

import skymoe
from skymoe.config import SkyworkMoeConfig
from skymoe.infer import generate
from skymoe.infer.cpu_kernels import PackedExperts, PackedLinear, can_pack
from skymoe.infer.prepare import prepare
from skymoe.kernels import PYTORCH_KERNELS

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, num_experts=6, moe_expert_interval=1,
              initializer_range=0.1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("two_layer", [False, True])
def test_packed_model_matches_plain(dtype, tol, two_layer):
    config = SkyworkMoeConfig(**CONFIG, moe_2layer_gate=two_layer)
    plain = skymoe.build_model(config, dtype=dtype, seed=3).eval()
    if not can_pack(plain):
        pytest.skip("oneDNN packing unavailable for this dtype on this CPU")
    packed = prepare(skymoe.build_model(config, dtype=dtype, seed=3), kernels=PYTORCH_KERNELS)
    assert any(isinstance(m, PackedExperts) for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear)
    # The router keeps its fp32 linear weights.
    assert all(isinstance(b.gate, (torch.nn.Linear, torch.nn.Sequential)) for b in packed.moe_blocks())
    ids = torch.randint(3, 97, (3, 11))
    with torch.inference_mode():
        ref, got = plain(ids).logits.float(), packed(ids).logits.float()
    if tol:
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    else:
        # bf16: same kernels' rounding differs only where accumulation order differs.
        assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(generate(plain, ids, 6), generate(packed, ids, 6))


def test_packing_is_a_no_op_where_it_does_not_apply():
    model = skymoe.build_model(SkyworkMoeConfig(**CONFIG), dtype=torch.float16, seed=0)
    assert prepare(model, kernels=PYTORCH_KERNELS) is model
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
