"""Working with every supported transformers: the version check and the EnCodec key names of each scheme.

These tests run in any transformers version (the CI also runs the parity tests in a venv with the
oldest supported one)."""
import pytest
import torch

from magnet import compat
from magnet.codec import Codec, _fit_quantizer_count
from magnet.errors import MagnetError


# --- the version check ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [("4.46.3", (4, 46, 3)), ("5.0.0rc1", (5, 0, 0)), ("4.57.0.dev0", (4, 57, 0)),
                                          ("4.40", (4, 40, 0)), ("2.13.0+cpu", (2, 13, 0))])
def test_versions_parse_to_numbers(text, parsed):
    assert compat.parse_version(text) == parsed


def test_too_old_transformers_names_installed_and_needed_version_and_the_command():
    with pytest.raises(MagnetError) as e:
        compat.check_transformers("4.30.2")
    msg = str(e.value)
    assert "transformers 4.30.2 is installed" in msg
    assert f"transformers>={compat.MIN_TRANSFORMERS}" in msg
    assert f'pip install -U "transformers>={compat.MIN_TRANSFORMERS}"' in msg
    assert "ComfyUI" in msg and "damaged" not in msg


@pytest.mark.parametrize("version", [compat.MIN_TRANSFORMERS, "4.46.3", "4.56.2", "5.24.0", "6.0.0", None, "unknown"])
def test_supported_or_unknown_transformers_passes_the_check(version):
    compat.check_transformers(version)


def test_import_time_check_reads_the_installed_version(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda dist="transformers": "4.20.0")
    with pytest.raises(MagnetError, match="transformers 4.20.0 is installed"):
        compat.check_transformers()


def test_installed_transformers_is_supported():
    import transformers
    assert compat.parse_version(transformers.__version__) >= compat.parse_version(compat.MIN_TRANSFORMERS)


@pytest.mark.parametrize("version, key", [((4, 46, 3), "torch_dtype"), ((4, 55, 4), "torch_dtype"),
                                          ((4, 56, 0), "dtype"), ((5, 24, 0), "dtype")])
def test_dtype_keyword_follows_the_version(monkeypatch, version, key):
    monkeypatch.setattr(compat, "transformers_version", lambda: version)
    assert compat.dtype_kwargs(torch.float32) == {key: torch.float32}


def test_loads_never_allow_remote_code():
    kw = compat.tokenizer_kwargs()
    assert kw["trust_remote_code"] is False and kw["local_files_only"] is True


# --- EnCodec key names: each scheme maps onto each other --------------------------------------------

def _scheme(weight_norm: str, buffers: tuple) -> dict:
    """A miniature EnCodec state dict in one naming scheme (two convs, two codebooks)."""
    state = {}
    for conv in ("encoder.layers.0.conv", "decoder.layers.3.conv"):
        state[f"{conv}.bias"] = torch.zeros(4)
        if weight_norm == "parametrizations":
            state[f"{conv}.parametrizations.weight.original0"] = torch.zeros(4, 1, 1)
            state[f"{conv}.parametrizations.weight.original1"] = torch.zeros(4, 2, 7)
        else:
            state[f"{conv}.weight_g"] = torch.zeros(4, 1, 1)
            state[f"{conv}.weight_v"] = torch.zeros(4, 2, 7)
    for q in range(2):
        state[f"quantizer.layers.{q}.codebook.embed"] = torch.zeros(8, 4)
        for b in buffers:
            state[f"quantizer.layers.{q}.codebook.{b}"] = torch.zeros({"inited": 1, "cluster_size": 8}.get(b, 8), *(
                (4,) if b == "embed_avg" else ()))
    return state


SCHEMES = {
    "parametrizations+buffers (transformers>=4.31 on torch>=2.1)": ("parametrizations", compat.CODEBOOK_BUFFERS),
    "weight_g/v+buffers (hub files, older torch)": ("weight_g", compat.CODEBOOK_BUFFERS),
    "parametrizations, embed only": ("parametrizations", ()),
    "weight_g/v, embed only": ("weight_g", ()),
}


@pytest.mark.parametrize("model_scheme", SCHEMES)
@pytest.mark.parametrize("file_scheme", SCHEMES)
def test_encodec_keys_of_any_scheme_map_onto_any_other(file_scheme, model_scheme):
    expected = _scheme(*SCHEMES[model_scheme])
    state, keep = compat.adapt_encodec_state(_scheme(*SCHEMES[file_scheme]), expected)
    assert set(state) | set(keep) == set(expected)
    assert not set(state) - set(expected)
    assert all(k.split(".")[-1] in compat.CODEBOOK_BUFFERS for k in keep)   # only unused buffers kept from the model


def test_weight_norm_names_convert_both_ways():
    old, new = "decoder.layers.1.conv.weight_g", "decoder.layers.1.conv.parametrizations.weight.original0"
    assert compat.rename_weight_norm(old, parametrized=True) == new
    assert compat.rename_weight_norm(new, parametrized=False) == old
    assert compat.rename_weight_norm("encoder.layers.1.conv.bias", parametrized=True) == "encoder.layers.1.conv.bias"


def test_codec_state_in_the_other_weight_norm_scheme_loads_identically(music_codec_export):
    config, state = music_codec_export          # export() writes weight_g / weight_v
    reference = Codec.from_config_and_state(config, state)
    other = {compat.rename_weight_norm(k, parametrized=True): v for k, v in state.items()}
    other = {k: v for k, v in other.items() if not k.endswith(("cluster_size", "embed_avg", "inited"))}
    rebuilt = Codec.from_config_and_state(config, other)
    codes = torch.randint(0, reference.card, (1, reference.n_q, 6))
    assert torch.equal(reference.decode(codes), rebuilt.decode(codes))


def test_unknown_key_names_of_a_complete_codec_blame_the_version_not_the_file(music_codec_export):
    config, state = music_codec_export
    state = {k.replace("codebook.embed", "codebook.embedding") if k.endswith("codebook.embed") else k: v
             for k, v in state.items()}
    with pytest.raises(MagnetError) as e:
        Codec.from_config_and_state(config, state)
    msg = str(e.value)
    assert "names EnCodec's weights differently" in msg and "pip install" in msg and "damaged" not in msg


def test_codec_missing_a_tensor_is_a_damaged_file(music_codec_export):
    config, state = music_codec_export
    state = {k: v for k, v in state.items() if not k.startswith("decoder.layers.0.")}
    with pytest.raises(MagnetError, match="do not match its configuration.*damaged"):
        Codec.from_config_and_state(config, state)


class _Old446Config:
    """transformers 4.4x-4.5x: 10 bits per code whatever the codebook size."""
    codebook_size, frame_rate, target_bandwidths = 64, 50, [1.0]

    @property
    def num_quantizers(self):
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * 10))


class _NewConfig(_Old446Config):
    """transformers >= 4.56: ceil(log2(codebook_size)) bits per code."""
    codebook_nbits = 6

    @property
    def num_quantizers(self):
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.codebook_nbits))


@pytest.mark.parametrize("cls", [_Old446Config, _NewConfig])
@pytest.mark.parametrize("n_q", [1, 2, 4, 8, 32])
def test_bandwidth_is_set_so_each_version_builds_the_codebook_count(cls, n_q):
    cfg = cls()
    _fit_quantizer_count(cfg, n_q)
    assert cfg.num_quantizers == n_q


@pytest.fixture(scope="module")
def music_codec_export(ref):
    return Codec.from_release_file(ref / "magnet-music" / "compression_state_dict.bin").export()
