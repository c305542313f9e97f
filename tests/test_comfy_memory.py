"""ComfyUI's memory manager and our models, checked without ComfyUI.

Unless ComfyUI loads a model fully, its ModelPatcher moves (and partially unloads) only the modules its
`_load_list()` yields: modules with parameters of their own and none in their children. A weight anywhere
else stays where it was, and the model runs split between devices. So:

- every parameter of every model we hand to ComfyUI (MAGNeT LM, MusicGen LM, T5, EnCodec, CLAP) must sit in
  such a module (`load_list` below is our own reading of ComfyUI's rule);
- `nodes.comfy.load` readies all of a node's models in ONE load_models_gpu call, with force_full_load where
  ComfyUI has it, then moves any weight ComfyUI still left behind;
- the `auto` weight type follows ComfyUI's answer for the device.

Every model is tiny and built in memory."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from magnet.transformer import LM, LMConfig
from pack import load_pack


@pytest.fixture(scope="module")
def nodes():
    return load_pack().nodes


# -- what ComfyUI moves ----------------------------------------------------------------------------------

def load_list(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules a ComfyUI partial load or unload moves (ModelPatcher._load_list): those whose parameters,
    counted with their children's, are exactly their own, and who have at least one."""
    out = []
    for name, module in model.named_modules():
        own = {n for n, _ in module.named_parameters(recurse=False)}
        every = {n for n, _ in module.named_parameters(recurse=True)}
        if own and every <= own:
            out.append((name, module))
    return out


def left_behind(model: torch.nn.Module) -> list[str]:
    """Names of the parameters no module of `load_list` holds: a partial load never moves them."""
    moved = {id(p) for _, m in load_list(model) for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if id(p) not in moved]


def test_load_list_reading_of_comfyui():
    class Mixed(torch.nn.Module):            # a direct parameter beside a child with parameters
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.proj = torch.nn.Linear(2, 2)

    m = torch.nn.Sequential(Mixed(), torch.nn.LayerNorm(2), torch.nn.ReLU())
    assert [n for n, _ in load_list(m)] == ["0.proj", "1"]
    assert left_behind(m) == ["0.scale"]


def tiny_lm(kind: str, **kw) -> LM:
    cfg = dict(kind=kind, dim=16, num_heads=2, num_layers=2, ffn_dim=32, n_q=4, card=8, text_dim=8)
    if kind == "musicgen":
        cfg.update(causal=True, delays=[0, 1, 2, 3])
    return LM(LMConfig(**cfg, **kw))


@pytest.mark.parametrize("kind, bias", [("magnet", False), ("magnet", True), ("musicgen", False)])
def test_every_lm_weight_is_moved_by_a_partial_load(kind, bias):
    lm = tiny_lm(kind, bias_ff=bias, bias_attn=bias, bias_proj=bias)
    assert left_behind(lm) == []


def test_every_t5_weight_is_moved_by_a_partial_load():
    import transformers
    from magnet.text import _build_t5
    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    state = transformers.T5EncoderModel(cfg).state_dict()
    assert left_behind(_build_t5(cfg.to_dict(), state, "tiny T5")) == []


def tiny_encodec_parts():
    import transformers
    from magnet.codec import _fit_quantizer_count
    cfg = transformers.EncodecConfig(sampling_rate=16000, num_filters=4, hidden_size=8, codebook_dim=8,
                                     upsampling_ratios=[2, 2], codebook_size=16, num_lstm_layers=1)
    _fit_quantizer_count(cfg, 2)            # the bandwidth that makes 2 quantizers in this transformers
    torch.manual_seed(0)
    model = transformers.EncodecModel(cfg).eval()
    assert len(model.quantizer.layers) == 2
    return cfg, model


def test_every_encodec_weight_is_moved_by_a_partial_load():
    from magnet.codec import Codec
    cfg, reference = tiny_encodec_parts()
    # (with torch's parametrized weight norm, transformers >= 4.41, each convolution holds its bias beside a
    # child holding weight_g/weight_v: left behind until folded)
    codec = Codec.from_config_and_state(cfg.to_dict(), reference.state_dict())
    assert left_behind(codec) == []
    # folding weight norm changed nothing the codec computes
    codes = torch.randint(0, 16, (1, codec.n_q, 6))
    with torch.inference_mode():
        expected = reference.decoder(reference.quantizer.decode(codes.transpose(0, 1)))
    assert torch.equal(codec.decode(codes), expected)
    # and its export (plain weights) rebuilds it exactly
    config, state = codec.export()
    rebuilt = Codec.from_config_and_state(config, state)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in codec.state_dict().items())
    assert left_behind(rebuilt) == []


def test_every_clap_weight_is_moved_by_a_partial_load():
    import transformers
    from magnet.clap import ClapScorer
    audio = dict(spec_size=64, num_mel_bins=64, window_size=4, patch_size=4, patch_stride=(4, 4), depths=[1, 1],
                 num_attention_heads=[1, 2], hidden_size=32, patch_embeds_hidden_size=16, projection_dim=16,
                 num_hidden_layers=2)
    cfg = transformers.ClapConfig(text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=40, projection_dim=16),
                                  audio_config=audio, projection_dim=16)
    model = transformers.ClapModel(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert left_behind(model), "ClapModel's logit scales and Swin's position tables sit beside children"
    processor = SimpleNamespace(feature_extractor=SimpleNamespace(sampling_rate=48000, nb_max_samples=24000),
                                tokenizer=None)
    scorer = ClapScorer(model, processor, device="cpu")
    assert left_behind(scorer.model) == []
    after = scorer.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# -- one load call, fully, then checked -------------------------------------------------------------------

class FakeMM:
    """comfy.model_management as far as nodes.comfy uses it; load_models_gpu records its calls and, like a
    partial load, moves only `moves` of the modules of load_list to each patcher's load device."""

    class InterruptProcessingException(Exception):
        pass

    def __init__(self, moves=None, args=None, fp16=None, bf16=None):
        self.calls, self.moves = [], moves
        self.args = args or SimpleNamespace()
        if fp16 is not None:
            self.should_use_fp16 = lambda device=None, model_params=0, prioritize_performance=True, \
                manual_cast=False: fp16 and not manual_cast
        if bf16 is not None:
            self.should_use_bf16 = lambda device=None, model_params=0, prioritize_performance=True, \
                manual_cast=False: bf16 and not manual_cast

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        self.calls.append((list(models), force_full_load))
        for p in models:
            listed = load_list(p.model)
            for _, m in listed[: len(listed) if self.moves is None else self.moves]:
                m.to(p.load_device)

    def get_torch_device(self):
        return torch.device("cuda")

    def throw_exception_if_processing_interrupted(self):
        pass


class OldFakeMM(FakeMM):
    def load_models_gpu(self, models, memory_required=0):      # ComfyUI before force_full_load
        self.calls.append((list(models), None))


def patcher(module, device="meta"):
    return SimpleNamespace(model=module, load_device=torch.device(device))


def test_load_readies_every_model_in_one_full_load(nodes, monkeypatch):
    fake = FakeMM()
    monkeypatch.setattr(nodes.comfy, "mm", fake)
    a, b = patcher(torch.nn.Linear(2, 2)), patcher(torch.nn.Linear(2, 2))
    nodes.comfy.load(a, None, b, a)
    assert fake.calls == [([a, b], True)]
    nodes.comfy.load()
    assert len(fake.calls) == 1


def test_load_without_force_full_load_in_older_comfyui(nodes, monkeypatch):
    fake = OldFakeMM()
    monkeypatch.setattr(nodes.comfy, "mm", fake)
    a = patcher(torch.nn.Linear(2, 2))
    nodes.comfy.load(a)
    assert fake.calls == [([a], None)]
    assert next(a.model.parameters()).device.type == "meta"      # settled: moved although ComfyUI did not


def test_weights_comfyui_left_behind_are_moved_with_a_warning(nodes, monkeypatch, caplog):
    fake = FakeMM(moves=1)                                          # a partial load: one module only
    monkeypatch.setattr(nodes.comfy, "mm", fake)
    lm = tiny_lm("magnet")
    lm.register_buffer("table", torch.zeros(3))                    # buffers too
    p = patcher(lm)
    with caplog.at_level(logging.WARNING):
        nodes.comfy.load(p)
    assert all(t.device.type == "meta" for t in [*lm.parameters(), *lm.buffers()])
    assert any("off meta" in r.getMessage() for r in caplog.records)
    assert nodes.comfy.settle(p) is False                           # nothing left to move


# -- every node readies all of its models at once -----------------------------------------------------------

class Used(Exception):
    """Raised by a stand-in model when the node first uses it: everything it needed is readied by then."""


class Stub:
    def __getattr__(self, name):
        raise Used(name)


def handle(nodes, name):
    return nodes.common.Handle(Stub(), name, [SimpleNamespace(name=name)])


SAMPLING = dict(decoding_steps="auto", temperature=3.0, top_k=0, top_p=0.9, max_cfg_coef=10.0, min_cfg_coef=1.0,
                span_arrangement="nonoverlap", span_scoring="max")
TOKENS = {"codes": torch.zeros(1, 4, 10, dtype=torch.long), "n_q": 4, "card": 8, "sample_rate": 32000}
AUDIO = {"waveform": torch.zeros(1, 1, 100), "sample_rate": 32000}
CASES = {   # node: (method, arguments with handles named by string, the handles it must ready)
    "MagnetSampler": ("sample", dict(model="model", conditioning=None, seed=0, duration=0.0, overlap=0.0,
                                     rescorer="rescorer", **SAMPLING), ["model", "rescorer"]),
    "MagnetRegenerateRegion": ("regenerate", dict(model="model", conditioning=None, tokens=TOKENS, seed=0, start=0.0,
                                                  end=0.1, rescorer="rescorer", **SAMPLING), ["model", "rescorer"]),
    "MagnetAudioToAudio": ("vary", dict(model="model", conditioning=None, tokens=TOKENS, seed=0, strength=0.5,
                                        keep_codebooks=0, rescorer="rescorer", **SAMPLING), ["model", "rescorer"]),
    "MagnetSeamlessLoop": ("loop", dict(model="model", conditioning=None, seed=0, duration=2.0, bars=1, bpm=120.0,
                                        beats_per_bar=4, rescorer="rescorer", **SAMPLING), ["model", "rescorer"]),
    "MagnetAR": ("generate", dict(ar_model="ar_model", model="model", conditioning=None, seed=0, seconds=1.0,
                                  temperature=1.0, top_k=250, top_p=0.0, cfg_coef=3.0), ["ar_model"]),
    "MagnetTextEncode": ("encode", dict(text_encoder="text_encoder", text="a", variations=1), ["text_encoder"]),
    "MagnetPromptTimeline": ("encode", dict(text_encoder="text_encoder", timeline="0:00 a"), ["text_encoder"]),
    "MagnetDecodeAudio": ("decode", dict(codec="codec", tokens=TOKENS), ["codec"]),
    "MagnetEncodeAudio": ("encode", dict(codec="codec", audio=AUDIO), ["codec"]),
    "MagnetDecodeLoop": ("decode", dict(codec="codec", tokens=TOKENS), ["codec"]),
    "MagnetClapRank": ("rank", dict(clap="clap", audio=AUDIO, text="a"), ["clap"]),
}


@pytest.mark.parametrize("node", sorted(CASES))
def test_each_node_readies_all_its_models_in_one_call(nodes, monkeypatch, node):
    method, kwargs, expected = CASES[node]
    cls = nodes.NODE_CLASS_MAPPINGS["MagnetARPrompt" if node == "MagnetAR" else node]
    calls = []
    monkeypatch.setattr(nodes.comfy, "load", lambda *patchers: calls.append([p.name for p in patchers]))
    args = {k: handle(nodes, v) if isinstance(v, str) and v in ("model", "rescorer", "ar_model", "text_encoder",
                                                                   "codec", "clap") else v
            for k, v in kwargs.items()}
    with pytest.raises(Used):
        getattr(cls(), method)(**args)
    assert calls == [expected]


def test_seamless_loop_of_given_tokens_readies_both_models(nodes, monkeypatch):
    calls = []
    monkeypatch.setattr(nodes.comfy, "load", lambda *patchers: calls.append([p.name for p in patchers]))
    with pytest.raises(Used):
        nodes.NODE_CLASS_MAPPINGS["MagnetSeamlessLoop"]().loop(
            handle(nodes, "model"), None, 0, 0.0, 4, 120.0, 4, fast=False, rescorer=handle(nodes, "rescorer"),
            tokens=TOKENS, **SAMPLING)
    assert calls == [["model", "rescorer"]]


# -- the auto weight type follows ComfyUI ---------------------------------------------------------------------

@pytest.mark.parametrize("fp16, bf16, flags, expected", [
    (True, True, {}, torch.float16),
    (False, True, {}, torch.bfloat16),
    (False, False, {}, torch.float32),                     # e.g. --force-fp32, a GTX 16xx, Pascal on Linux
    (True, True, {"fp32_unet": True}, torch.float32),
    (False, False, {"fp16_unet": True}, torch.float16),
    (False, True, {"bf16_unet": True}, torch.bfloat16),
])
def test_auto_weight_type_is_comfyuis(nodes, monkeypatch, fp16, bf16, flags, expected):
    monkeypatch.setattr(nodes.comfy, "mm", FakeMM(fp16=fp16, bf16=bf16, args=SimpleNamespace(**flags)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert nodes.comfy.weight_dtype(torch.device("cuda")) == expected
    assert nodes.comfy.weight_dtype(torch.device("cpu")) == torch.float32


def test_older_comfyui_without_manual_cast_keyword(nodes, monkeypatch):
    fake = FakeMM()
    fake.should_use_fp16 = lambda device=None, model_params=0, prioritize_performance=True: False
    fake.should_use_bf16 = lambda device=None, model_params=0, prioritize_performance=True: True
    monkeypatch.setattr(nodes.comfy, "mm", fake)
    assert nodes.comfy.weight_dtype("cuda") == torch.bfloat16


@pytest.mark.parametrize("fp16, bf16, expected", [(True, False, torch.float16), (False, True, torch.bfloat16),
                                                  (False, False, torch.float32)])
def test_loaders_auto_dtype_follows_comfyui(nodes, monkeypatch, tmp_path, fp16, bf16, expected):
    monkeypatch.setattr(nodes.comfy, "mm", FakeMM(fp16=fp16, bf16=bf16))
    monkeypatch.setattr(nodes.comfy, "offload_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(nodes.comfy, "manage", lambda module, dev=None, label="": None)
    (tmp_path / f"rel-{fp16}-{bf16}").mkdir()
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(tmp_path))
    monkeypatch.setattr(nodes.comfy, "model_dirs", lambda kind: [tmp_path])
    asked = []

    def from_pretrained(path, **kw):
        asked.append(kw["dtype"])
        return SimpleNamespace(lm=None, codec=None)
    for loader, cls in (("MagnetModelLoader", "MagnetModel"), ("MagnetMusicGenLoader", "MusicGenModel")):
        mod = nodes.loaders if loader == "MagnetModelLoader" else nodes.ar
        monkeypatch.setattr(getattr(mod, cls), "from_pretrained", from_pretrained)
        nodes.NODE_CLASS_MAPPINGS[loader]().load(f"rel-{fp16}-{bf16}", "auto", "auto")
    assert asked == [expected, expected]


def test_an_explicit_dtype_is_checked_not_overridden(nodes, monkeypatch):
    monkeypatch.setattr(nodes.comfy, "mm", FakeMM(fp16=True, bf16=True))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    with pytest.raises(load_pack().magnet.errors.MagnetError, match="P100.*fp16 or fp32"):
        nodes.loaders.load_cached(object(), "magnet", "magnet", "x", "release", "auto", None, "bf16")
