"""Retention-biased attention: equals ordinary attention at beta = 1, equals a dense loop reference otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import image_chat, random_image
from training_helpers import gated_model

from dbtrimkv.modeling.gates import text_attention_modules
from dbtrimkv.modeling.model_state import model_state
from dbtrimkv.inputs.prompts import build_inputs
from dbtrimkv.training.train_attention import teacher_attention
from dbtrimkv.training.biased_attention import biased_attention, biased_flex_attention

B, HQ, HKV, T, D = 2, 4, 2, 9, 8


def random_inputs(seed: int, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (HQ, HKV, HKV))
    log_beta = F.logsigmoid(torch.randn(B, T, HKV, generator=gen) * 2 + 1)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, :3] = False  # the second row is left-padded
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [log_beta.to(device), padding.to(device)]


def dense_mask(padding):
    causal = torch.ones(T, T, dtype=torch.bool, device=padding.device).tril()
    return (causal[None] & padding[:, None, :])[:, None]  # [B, 1, T, T]


def loop_reference(q, k, v, log_beta, padding, scale):
    """Query t of head h attends to keys i <= t of KV head h // G with logit q.k * scale + (t - i) log beta_i."""
    out = torch.zeros_like(q)
    groups = HQ // HKV
    for b in range(B):
        for h in range(HQ):
            for t in range(T):
                keys = [i for i in range(t + 1) if padding[b, i]]
                if not keys:
                    continue
                logits = torch.stack([q[b, h, t] @ k[b, h // groups, i] * scale + (t - i) * log_beta[b, i, h // groups]
                                      for i in keys])
                weights = torch.softmax(logits, dim=0)
                out[b, h, t] = (weights[:, None] * v[b, h // groups, keys]).sum(0)
    return out


def test_zero_log_beta_is_ordinary_attention():
    q, k, v, _, padding = random_inputs(0)
    mask = dense_mask(padding)
    got = biased_attention(q, k, v, torch.zeros(B, T, HKV), mask, D**-0.5)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    real = padding[:, None, :, None].expand_as(got)  # padding queries attend to nothing; their output is unused
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def _flex(q, k, v, log_beta, padding, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & padding[b, kv_idx]

    block = create_block_mask(mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T, device=q.device, _compile=False)
    out = biased_flex_attention(q, k, v, log_beta, block, scale, compiled=q.is_cuda)
    return out.masked_fill(~padding[:, None, :, None], 0.0)  # fully masked rows: flex gives 0, the loop leaves 0


def _plain(q, k, v, log_beta, padding, scale):
    return biased_attention(q, k, v, log_beta, dense_mask(padding), scale).masked_fill(~padding[:, None, :, None], 0.0)


# Eager FlexAttention on CPU runs the score_mod through its unfused reference path; it has no backward for
# q/k/v on CPU (training uses flex on CUDA only), but does differentiate the captured log beta.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attend, trainable", [(_plain, (0, 1, 2, 3)), (_flex, (3,))], ids=["plain", "flex-eager"])
def test_random_log_beta_matches_the_loop_reference(attend, trainable):
    q, k, v, log_beta, padding = random_inputs(1)
    leaves = [x.clone().requires_grad_(n in trainable) for n, x in enumerate((q, k, v, log_beta))]
    refs = [x.clone().requires_grad_(n in trainable) for n, x in enumerate((q, k, v, log_beta))]
    got = attend(*leaves, padding, D**-0.5)
    expected = loop_reference(*refs, padding, D**-0.5)
    assert torch.allclose(got, expected, atol=1e-5)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for n in trainable:
        assert torch.allclose(leaves[n].grad, refs[n].grad, atol=1e-4)
    assert refs[3].grad.abs().sum() > 0.1  # log beta does receive a gradient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs CUDA")
def test_compiled_flex_matches_plain_on_cuda():
    q, k, v, log_beta, padding = random_inputs(5, dtype=torch.bfloat16, device="cuda")
    a = [x.clone().requires_grad_() for x in (q, k, v, log_beta)]
    b = [x.clone().requires_grad_() for x in (q, k, v, log_beta)]
    flex, plain = _flex(*a, padding, D**-0.5), _plain(*b, padding, D**-0.5)
    assert torch.allclose(flex.float(), plain.float(), atol=3e-2)
    flex.float().sum().backward()
    plain.float().sum().backward()
    assert torch.allclose(a[3].grad, b[3].grad, atol=5e-2, rtol=5e-2)


def _image_batch(processor):
    chats = [image_chat(random_image(7), "What is in the image?"), [{"role": "user", "content": "Hi"}]]
    return build_inputs(processor, chats)  # left-padded batch, one image


def _sdpa_logits(model, inputs):
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_model_with_saturated_gates_equals_the_sdpa_model():
    model, processor = gated_model("tiny")
    with torch.no_grad():
        text_attention_modules(model)[0].retention_gate.bias.fill_(1e4)  # shared by all layers: log beta = 0
    inputs = _image_batch(processor)
    with torch.no_grad():
        student = model(**inputs, use_cache=False).logits
    assert all(float(log_beta.abs().max()) == 0.0 for log_beta in model_state(model).log_beta.values())
    assert len(model_state(model).log_beta) == len(text_attention_modules(model))
    reference = _sdpa_logits(model, inputs)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(student[real], reference[real], atol=1e-4)


def test_teacher_mode_is_the_plain_model_and_the_student_differs():
    model, processor = gated_model("tiny")
    with torch.no_grad():
        text_attention_modules(model)[0].retention_gate.bias.fill_(-1.0)  # beta ~ 0.27: strong forgetting
    inputs = _image_batch(processor)
    with torch.no_grad():
        with teacher_attention(model):
            teacher = model(**inputs, use_cache=False).logits
        student = model(**inputs, use_cache=False).logits
    reference = _sdpa_logits(model, inputs)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(teacher[real], reference[real], atol=1e-5)
    assert (student[real] - reference[real]).abs().max() > 1e-2
