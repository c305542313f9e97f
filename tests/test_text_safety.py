"""Damaged, incomplete or unsafe T5 / EnCodec / CLAP folders, and bad prompts: each is refused with a
MagnetError naming the problem and the fix (never a raw exception, never a silently wrong result)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from magnet import Codec, TextEncoder
from magnet.errors import MagnetError
from magnet.text import MAX_PROMPT_TOKENS

ROOT = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture
def t5(ref, tmp_path) -> Path:
    return _copy(ref / "t5-base", tmp_path / "t5-base")


@pytest.fixture(scope="module")
def encoder(ref):
    return TextEncoder(ref / "t5-base")


# --- no remote or custom code -----------------------------------------------------------------------

def test_no_source_file_allows_remote_code():
    offenders = []
    for folder in ("magnet", "nodes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"trust_remote_code[\"']?\s*[=:]\s*(?!False\b)\S", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "remote/custom code allowed:\n" + "\n".join(offenders)


EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nclass EvilModel: pass\n"


def _plant_code(folder: Path, marker: Path, config_name: str = "config.json", auto_map: bool = True):
    (folder / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg_path = folder / config_name
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if auto_map:
        cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    else:
        cfg["architectures"] = ["modeling_evil.EvilModel"]
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("config_name, auto_map", [("config.json", True), ("config.json", False),
                                                   ("tokenizer_config.json", True)])
def test_t5_folder_with_custom_code_is_refused_and_the_code_never_runs(t5, tmp_path, config_name, auto_map):
    marker = tmp_path / "marker"
    _plant_code(t5, marker, config_name, auto_map)
    with pytest.raises(MagnetError, match="run code from the folder.*original model files"):
        TextEncoder(t5)
    assert not marker.exists()


def test_encodec_folder_with_custom_code_is_refused(ref, tmp_path):
    folder = _copy(ref / "encodec_32khz", tmp_path / "encodec_32khz")
    marker = tmp_path / "marker"
    _plant_code(folder, marker)
    with pytest.raises(MagnetError, match="auto_map"):
        Codec.from_transformers_folder(folder)
    assert not marker.exists()


def test_clap_folder_with_custom_code_is_refused(tmp_path):
    from magnet.clap import ClapScorer
    from tiny_clap import tiny_clap
    folder = tiny_clap(tmp_path / "clap")
    marker = tmp_path / "marker"
    _plant_code(folder, marker)
    with pytest.raises(MagnetError, match="auto_map"):
        ClapScorer.from_pretrained(folder, device="cpu")
    assert not marker.exists()


# --- the tokenizer ----------------------------------------------------------------------------------

def test_t5_folder_without_tokenizer_files_is_refused(t5):
    (t5 / "tokenizer.json").unlink()
    (t5 / "spiece.model").unlink()
    with pytest.raises(MagnetError) as e:
        TextEncoder(t5)
    msg = str(e.value)
    assert "tokenizer.json" in msg and "spiece.model" in msg and "download" in msg


@pytest.mark.parametrize("keep", ["tokenizer.json", "spiece.model"])
def test_either_tokenizer_file_alone_gives_the_same_tokens(t5, encoder, keep):
    for name in ("tokenizer.json", "spiece.model"):
        if name != keep:
            (t5 / name).unlink()
    try:
        te = TextEncoder(t5)
    except MagnetError as e:
        if keep == "spiece.model":   # transformers 5 without protobuf cannot read spiece.model alone: says so
            assert "protobuf" in str(e) and "tokenizer.json" in str(e)
        else:                        # a tokenizers older than the one that wrote tokenizer.json: says upgrade
            assert "pip install -U \"transformers>=" in str(e)
        return
    prompts = ["lofi hip hop beat", "calm piano, 90 bpm"]
    assert torch.equal(te.encode(prompts).input_ids, encoder.encode(prompts).input_ids)


def test_tokenizer_that_makes_unknown_tokens_is_refused(t5):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("x", -1.0)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(t5 / "tokenizer.json"))
    (t5 / "spiece.model").unlink()
    with pytest.raises(MagnetError, match="tokenizer.*(unknown tokens|read back).*tokenizer.json, spiece.model"):
        TextEncoder(t5)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(t5):
    cfg = json.loads((t5 / "config.json").read_text())
    cfg["vocab_size"] = 40
    (t5 / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(t5 / "model.safetensors"))
    state["shared.weight"] = state["shared.weight"][:40].clone()
    save_file(state, str(t5 / "model.safetensors"))
    with pytest.raises(MagnetError, match="86 tokens but the model's embedding only 40"):
        TextEncoder(t5)


def test_tokenizer_file_that_is_not_json_is_refused(t5):
    (t5 / "tokenizer.json").write_text("{ broken")
    (t5 / "spiece.model").unlink()
    with pytest.raises(MagnetError, match="tokenizer"):
        TextEncoder(t5)


# --- damaged T5 files -------------------------------------------------------------------------------

def test_truncated_t5_weights_say_download_again(t5):
    path = t5 / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MagnetError, match=r"model.safetensors .*is truncated or damaged.*Download it again"):
        TextEncoder(t5)


@pytest.mark.parametrize("text, match", [("{not json", "not readable JSON"), ("[1, 2]", "not a JSON object"),
                                         ('{"d_model": 768}', "lacks 'model_type'"),
                                         ('{"model_type": "bert"}', "holds a bert model, not T5")])
def test_bad_t5_config_is_refused(t5, text, match):
    (t5 / "config.json").write_text(text)
    with pytest.raises(MagnetError, match=match):
        TextEncoder(t5)


def test_t5_with_only_pickle_weights_is_refused_unread(t5):
    (t5 / "model.safetensors").unlink()
    (t5 / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(MagnetError, match="only pickle weights.*get model.safetensors"):
        TextEncoder(t5)


def test_t5_weights_that_do_not_match_the_config_are_refused(t5):
    cfg = json.loads((t5 / "config.json").read_text())
    cfg["num_layers"] = 2
    (t5 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MagnetError, match="do not match its config.json.*missing"):
        TextEncoder(t5)


def test_full_t5_checkpoint_with_decoder_loads_the_encoder(t5, encoder):
    state = load_file(str(t5 / "model.safetensors"))
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(64, 768)
    state["lm_head.weight"] = torch.zeros(86, 768)
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, str(t5 / "model.safetensors"))
    te = TextEncoder(t5)
    assert torch.equal(te.encode(["lofi hip hop beat"]).hidden, encoder.encode(["lofi hip hop beat"]).hidden)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_t5_weights_with_nan_or_inf_are_refused(t5, bad):
    state = load_file(str(t5 / "model.safetensors"))
    state["encoder.final_layer_norm.weight"][3] = bad
    save_file(state, str(t5 / "model.safetensors"))
    with pytest.raises(MagnetError, match="model.safetensors contains NaN/inf values.*damaged; download it again"):
        TextEncoder(t5)


# --- damaged codec files ----------------------------------------------------------------------------

def test_codec_release_file_with_nan_is_refused(ref, tmp_path):
    pkg = torch.load(ref / "magnet-music" / "compression_state_dict.bin", weights_only=True)
    key = next(k for k in pkg["best_state"] if k.endswith("weight_v"))
    pkg["best_state"][key].view(-1)[0] = float("nan")
    torch.save(pkg, tmp_path / "compression_state_dict.bin")
    with pytest.raises(MagnetError, match="compression_state_dict.bin contains NaN/inf values.*download it again"):
        Codec.from_release_file(tmp_path / "compression_state_dict.bin")


def test_codec_folder_with_inf_is_refused(ref, tmp_path):
    folder = _copy(ref / "encodec_32khz", tmp_path / "encodec_32khz")
    state = load_file(str(folder / "model.safetensors"))
    state["quantizer.layers.1.codebook.embed"][0, 0] = float("inf")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(MagnetError, match="contains NaN/inf values"):
        Codec.from_transformers_folder(folder)


def test_truncated_codec_folder_weights_say_download_again(ref, tmp_path):
    folder = _copy(ref / "encodec_32khz", tmp_path / "encodec_32khz")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(MagnetError, match="truncated or damaged.*Download it again"):
        Codec.from_transformers_folder(folder)


@pytest.mark.parametrize("text, match", [("{not json", "not readable JSON"), ("{}", "lacks 'model_type'"),
                                         ('{"model_type": "t5"}', "holds a t5 model, not EnCodec")])
def test_bad_codec_folder_config_is_refused(ref, tmp_path, text, match):
    folder = _copy(ref / "encodec_32khz", tmp_path / "encodec_32khz")
    (folder / "config.json").write_text(text)
    with pytest.raises(MagnetError, match=match):
        Codec.from_transformers_folder(folder)


@pytest.mark.parametrize("form", ["full", "pointer"])
def test_codec_exposes_rates_and_codebooks_for_both_forms(ref, form):
    release = "magnet-music" if form == "full" else "pointer"
    codec = Codec.from_release_file(ref / release / "compression_state_dict.bin", search_dirs=[ref])
    assert (codec.sample_rate, codec.frame_rate, codec.n_q, codec.card) == (32000, 50, 4, 64)
    assert all(type(v) is int for v in (codec.sample_rate, codec.frame_rate, codec.n_q, codec.card))


# --- damaged CLAP files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clap_src(tmp_path_factory):
    from tiny_clap import tiny_clap
    return tiny_clap(tmp_path_factory.mktemp("clap") / "clap")


def test_truncated_clap_weights_say_download_again(clap_src, tmp_path):
    from magnet.clap import ClapScorer
    folder = _copy(clap_src, tmp_path / "clap")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MagnetError, match="truncated or damaged.*Download"):
        ClapScorer.from_pretrained(folder, device="cpu")


def test_clap_weights_with_nan_are_refused(clap_src, tmp_path):
    from magnet.clap import ClapScorer
    folder = _copy(clap_src, tmp_path / "clap")
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[key].view(-1)[1] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MagnetError, match="contains NaN/inf values"):
        ClapScorer.from_pretrained(folder, device="cpu")


def test_clap_config_without_model_type_is_refused(clap_src, tmp_path):
    from magnet.clap import ClapScorer
    folder = _copy(clap_src, tmp_path / "clap")
    (folder / "config.json").write_text('{"projection_dim": 16}')
    with pytest.raises(MagnetError, match="lacks 'model_type'"):
        ClapScorer.from_pretrained(folder, device="cpu")


# --- prompts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, match", [(None, "prompts must be a string or a list"),
                                            (42, "prompts must be a string or a list"),
                                            ({"a": 1}, "prompts must be a string or a list"),
                                            (["fine", 3], "prompt 1 .* is not text"),
                                            ([b"bytes"], "prompt 0 .* is not text"),
                                            ([], "no prompt given")])
def test_bad_prompts_are_refused(encoder, prompts, match):
    with pytest.raises(MagnetError, match=match):
        encoder.encode(prompts)


def test_none_in_a_list_is_an_unconditional_prompt_as_in_audiocraft(encoder):
    a, b = encoder.encode([None, "x"]), encoder.encode(["", "x"])
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask)


def test_prompt_longer_than_the_token_limit_is_refused(encoder):
    long = " ".join(["lofi hip hop beat"] * 200)
    with pytest.raises(MagnetError, match=f"prompt 1 is \\d+ T5 tokens long; the limit is {MAX_PROMPT_TOKENS}"):
        encoder.encode(["short", long])


def test_huge_prompts_are_refused_before_running_t5(encoder, monkeypatch):
    monkeypatch.setattr(encoder, "model", None)          # T5 must not run
    with pytest.raises(MagnetError, match=f"prompt 0 is \\d+ T5 tokens long; the limit is {MAX_PROMPT_TOKENS}"):
        encoder.encode(["x" * 20000])
    with pytest.raises(MagnetError, match=f"200000 characters long; the limit is {MAX_PROMPT_TOKENS} T5 tokens"):
        encoder.encode(["x" * 200000])


def test_prompt_up_to_the_limit_is_encoded_untruncated(encoder):
    ids = encoder.tokenizer("lofi hip hop beat ")["input_ids"]
    n = (MAX_PROMPT_TOKENS - 1) // (len(ids) - 1)
    prompt = "lofi hip hop beat " * n
    cond = encoder.encode([prompt])
    assert int(cond.mask[0].sum()) == len(encoder.tokenizer(prompt)["input_ids"]) <= MAX_PROMPT_TOKENS
