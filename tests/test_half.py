"""Half precision: the residual stream stays float32, so long inputs whose activations grow past fp16's
largest value (65504) still give finite logits that match float32."""
import pytest
import torch

from magnet.random_models import init_random
from magnet.stage_forward import DecodingSettings, StageForward
from magnet.transformer import LM, LMConfig

FRAMES = 1500      # 30 s: the longest official window


def _outlier_lm(dtype) -> LM:
    """A small LM whose feed-forwards all add to a few channels (the outlier features of trained
    transformers): every sublayer output fits in fp16, their sum over the layers does not."""
    cfg = LMConfig(kind="magnet", dim=64, num_heads=4, num_layers=8, ffn_dim=128, n_q=4, card=32, text_dim=32,
                   subcodes_context=5)
    lm = init_random(LM(cfg), 1).eval()
    with torch.no_grad():
        for layer in lm.transformer.layers:
            layer.linear2.weight[:4].add_(4e4 / cfg.ffn_dim)
    return lm.to(dtype)


def _inputs(lm):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.cfg.card, (1, lm.cfg.n_q, FRAMES), generator=g)
    hidden = torch.randn(2, 7, lm.cfg.text_dim, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1] = 0
    return codes, lm.memory(hidden, mask, null_rows=1)


@torch.inference_mode()
def test_activations_beyond_fp16_range_give_finite_logits_equal_to_float32():
    lm32 = _outlier_lm(torch.float32)
    codes, mem32 = _inputs(lm32)
    grown = []
    hooks = [layer.register_forward_hook(lambda m, i, o: grown.append(float(o.abs().amax())))
             for layer in lm32.transformer.layers]
    refs = {stage: lm32(codes, mem32, stage=stage, heads=[stage]).float() for stage in (0, 1)}
    for h in hooks:
        h.remove()
    assert max(grown) > 65504                    # the residual stream passes fp16's range
    lm16 = _outlier_lm(torch.float16)
    _, mem16 = _inputs(lm16)
    for stage, ref in refs.items():
        spec = lm16(codes, mem16, stage=stage, heads=[stage]).float()
        fast, _ = StageForward(lm16, mem16, guided=True, batch=1, stage=stage, n_steps=1,
                               settings=DecodingSettings()).logits(codes, torch.ones(1, FRAMES, dtype=torch.bool), 3.0)
        scale = float(ref.abs().amax())
        for out in (spec, fast.unsqueeze(1) if fast.dim() == 3 else fast):
            assert bool(torch.isfinite(out).all())
            assert float((out.view_as(ref) - ref).abs().amax()) < 2e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_half_weights_keep_a_float32_residual_stream(dtype):
    lm = _outlier_lm(dtype)
    codes, _ = _inputs(lm)
    assert lm.embed(codes[..., :10]).dtype == torch.float32
    assert lm.transformer.layers[0].norm1(torch.ones(2, lm.cfg.dim)).dtype == dtype
