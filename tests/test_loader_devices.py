"""The loader nodes take the device names `devices.parse_device` takes, and refuse every other value as a
node error naming it (never a raw ValueError/RuntimeError from torch)."""
import pytest
import torch

from pack import load_pack


@pytest.fixture
def pack(ref, monkeypatch):
    for var in ("MAGNET_MODELS_DIR", "MAGNET_TEXT_ENCODERS_DIR"):      # the loaders list the fixtures
        monkeypatch.setenv(var, str(ref))
    return load_pack()


@pytest.mark.parametrize("device", ["gpu\u00b2", "cpu:\u00b2", "cuda:99999999999999999999", "cuda:-1", "cuda:1",
                                    "cpu:1", "cpu cuda", 7, None.__class__])
@pytest.mark.parametrize("node, args", [("MagnetModelLoader", ("magnet-music",)),
                                        ("MagnetTextEncoderLoader", ("t5-base",)),
                                        ("MagnetMusicGenLoader", ("musicgen",))])
def test_a_device_this_machine_cannot_name_is_a_node_error(pack, monkeypatch, node, args, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # one GPU: cuda:1 does not exist
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    display = pack.NODE_DISPLAY_NAME_MAPPINGS[node]
    with pytest.raises(pack.magnet.errors.MagnetError) as info:
        pack.NODE_CLASS_MAPPINGS[node]().load(*args, device)
    msg = str(info.value)
    assert msg.startswith(f"{display}: device {device!r}") and msg.count(display) == 1, msg
    assert "auto" in msg, msg


def test_the_loaders_take_the_spellings_of_the_grammar(pack):
    model, codec = pack.NODE_CLASS_MAPPINGS["MagnetModelLoader"]().load("magnet-music", " CPU:0 ", "fp32")
    assert model.obj.device == torch.device("cpu") and codec.obj.n_q == model.obj.cfg.n_q
