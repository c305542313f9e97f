"""Fast mode's int8 copy follows the weights it was made from: any one replaced or changed weight remakes it."""
import pytest
import torch

from magnet import linears
from magnet.random_models import init_random
from magnet.transformer import LM, LMConfig


def _lm(seed=0):
    cfg = LMConfig(kind="magnet", dim=32, num_heads=4, num_layers=2, ffn_dim=64, n_q=4, card=16, text_dim=8,
                   subcodes_context=2, segment_duration=0.5, span_len=3)
    return init_random(LM(cfg), seed).eval().requires_grad_(False)


def _weights(lm):
    """(module, attribute) of every linear the int8 copy is made from, in the last layer (not layer 0)."""
    layer = lm.transformer.layers[-1]
    return [(layer.self_attn.in_proj, "weight"), (layer.self_attn.out_proj, "weight"),
            (layer.cross_attention.in_proj, "weight"), (layer.cross_attention.out_proj, "weight"),
            (layer.linear1, "weight"), (layer.linear2, "weight")]


@pytest.mark.skipif(not linears.int8_available(), reason="this torch has no CPU int8 kernels")
@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("how", ["replaced", "replaced_in_inference_mode", "changed_in_place"])
def test_int8_copy_is_remade_when_any_weight_changes(index, how):
    lm = _lm()
    first = linears.fast_copy(lm, "int8")
    assert linears.fast_copy(lm, "int8") is first           # unchanged weights: the same copy
    module, name = _weights(lm)[index]
    w = getattr(module, name)
    if how == "changed_in_place":
        with torch.no_grad():
            w.add_(1.0)
    else:   # ComfyUI's LoRA patch: a new Parameter set on the module (set_attr_param), under inference_mode
        ctx = torch.inference_mode() if how == "replaced_in_inference_mode" else torch.no_grad()
        with ctx:
            setattr(module, name, torch.nn.Parameter(w + 1.0, requires_grad=False))
    second = linears.fast_copy(lm, "int8")
    assert second is not first
