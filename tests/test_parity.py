"""Parity with the reference implementation: goldens computed by audiocraft on the same weights."""
import pytest
import torch

from conftest import REFERENCE_SAMPLING as REFERENCE, golden_prompts
from magnet.sampling import SamplingParams

FIXTURES = ["music", "audio"]


@pytest.mark.parametrize("name", FIXTURES)
def test_t5_ids_and_text_memory_match_reference(models, golden, name):
    model = models[name]
    cond = model.encode_text(golden_prompts(model, golden, name))
    assert torch.equal(cond.input_ids, golden[f"{name}.t5_input_ids"])
    assert torch.equal(cond.mask, golden[f"{name}.cond_mask"])
    with torch.inference_mode():
        mem = model.lm.project_text(cond.hidden, cond.mask)
    torch.testing.assert_close(mem, golden[f"{name}.cond_embeds"], atol=1e-5, rtol=0)
    assert not mem[cond.batch:].any(), "null rows must be exactly zero"


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("skip_null_cross", [False, True])
def test_logits_of_every_stage_match_reference(models, golden, name, skip_null_cross):
    model = models[name]
    cond = model.encode_text(golden_prompts(model, golden, name))
    B = cond.batch
    with torch.inference_mode():
        mem = model.lm.memory(cond.hidden, cond.mask, null_rows=B if skip_null_cross else 0)
        assert mem.rows == (B if skip_null_cross else 2 * B)
        for stage in range(model.cfg.n_q):
            codes = golden[f"{name}.stage{stage}.codes"]
            logits = model.lm(codes, mem, stage=stage)
            ref = golden[f"{name}.stage{stage}.logits"]
            assert logits.shape == ref.shape
            err = (logits - ref).abs().max().item()
            assert err <= 1e-4, f"stage {stage}: max abs error {err}"
            # the stage head alone gives the same numbers
            one = model.lm(codes, mem, stage=stage, heads=[stage])[:, 0]
            torch.testing.assert_close(one, logits[:, stage], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("key,arrangement,scoring,prompted", [
    ("greedy.nonoverlap.max", "nonoverlap", "max", False),
    ("greedy.nonoverlap.prod", "nonoverlap", "prod", False),
    ("greedy.stride1.max", "stride1", "max", False),
    ("greedy.prompted", "nonoverlap", "max", True),
])
def test_greedy_decoding_is_token_identical_to_reference(models, golden, golden_cfg, name, key, arrangement,
                                                         scoring, prompted):
    model = models[name]
    prompt = golden[f"{name}.prompt_tokens"] if prompted else None
    cond = model.encode_text(golden_prompts(model, golden, name))
    params = SamplingParams(use_sampling=False, decoding_steps=golden_cfg["decoding_steps"],
                            span_arrangement=arrangement, span_scoring=scoring, **REFERENCE)
    codes = model.generate_from_condition(cond, frames=golden_cfg[name]["T"], params=params, prompt=prompt).codes
    ref = golden[f"{name}.{key}"]
    assert codes.shape == ref.shape
    assert torch.equal(codes, ref), f"{(codes != ref).sum().item()} tokens differ"
    if prompted:
        assert torch.equal(codes[..., :prompt.shape[-1]], prompt)


@pytest.mark.parametrize("name", FIXTURES)
def test_generate_api_reproduces_greedy_golden(models, golden, golden_cfg, name):
    model = models[name]
    T = golden_cfg[name]["T"]
    codes = model.generate(golden_prompts(model, golden, name), duration=T / model.frame_rate,
                           use_sampling=False, decoding_steps=golden_cfg["decoding_steps"], **REFERENCE)
    assert torch.equal(codes, golden[f"{name}.greedy.nonoverlap.max"])


@pytest.mark.parametrize("name", FIXTURES)
def test_decode_matches_reference_waveform(models, golden, name):
    wav = models[name].decode(golden[f"{name}.greedy.nonoverlap.max"])
    ref = golden[f"{name}.decoded_wav"]
    assert wav.shape == ref.shape and wav.dtype == torch.float32
    assert (wav - ref).abs().max().item() <= 1e-5


def test_encode_matches_reference_codes(models, golden):
    music, audio = models["music"], models["audio"]
    assert torch.equal(music.encode(golden["music.sine_wav"], music.sample_rate), golden["music.sine_codes"])
    assert torch.equal(audio.encode(golden["audio.chirp_wav"], audio.sample_rate), golden["audio.chirp_codes"])


def test_pointer_release_matches_reference(ref, golden, tmp_path):
    """A release whose compression file is a pointer, with the transformers codec folder beside it."""
    from magnet import MagnetModel
    import shutil
    rel = tmp_path / "magnet-pointer"
    rel.mkdir()
    shutil.copy(ref / "magnet-music" / "state_dict.bin", rel)
    shutil.copy(ref / "pointer" / "compression_state_dict.bin", rel)
    shutil.copytree(ref / "encodec_32khz", tmp_path / "encodec_32khz")
    model = MagnetModel.from_pretrained(rel, text_encoder=ref / "t5-base", device="cpu")
    wav = model.decode(golden["music.greedy.nonoverlap.max"])
    assert (wav - golden["pointer.decoded_wav"]).abs().max().item() <= 1e-5
    assert torch.equal(model.encode(golden["music.sine_wav"], 32000), golden["pointer.sine_codes"])
    # the codec folder can also be given explicitly, from anywhere
    shutil.rmtree(tmp_path / "encodec_32khz")
    model = MagnetModel.from_pretrained(rel, text_encoder=ref / "t5-base", device="cpu",
                                        codec=ref / "encodec_32khz")
    assert torch.equal(model.encode(golden["music.sine_wav"], 32000), golden["pointer.sine_codes"])
