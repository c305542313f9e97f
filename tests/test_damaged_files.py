"""Damaged files, as a careless download or an attacker makes them: seeded random bytes (some with the magic of
the format they pretend to be) and truncations of real files. Every loader answers with a MagnetError naming
the file, never a raw exception."""
from __future__ import annotations

import random
import shutil
import struct
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from magnet.errors import MagnetError

PREFIXES = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS",
            struct.pack("<Q", 64) + b'{"__metadata__":', struct.pack("<Q", 2 ** 40) + b"{"]


def _random_files(seed: int, n: int):
    rng = random.Random(seed)
    for i in range(n):
        body = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 64, 300, 2048])))
        yield i, rng.choice(PREFIXES) + body


def _truncations(data: bytes, seed: int, n: int):
    rng = random.Random(seed)
    for i in range(n):
        yield i, data[:rng.randrange(1, max(2, len(data)))]


def _refuses_naming(fn, path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(path)
    except MagnetError as e:
        assert path.name in str(e), str(e)
    # loading successfully is fine too (a truncation may cut only what is not needed)


@pytest.fixture(scope="module")
def samples(ref, tmp_path_factory):
    from magnet import lora as L
    from magnet.checkpoints import convert_release
    d = tmp_path_factory.mktemp("samples")
    out = {"state_dict.bin": (ref / "magnet-music" / "state_dict.bin").read_bytes(),
           "compression_state_dict.bin": (ref / "magnet-music" / "compression_state_dict.bin").read_bytes()}
    L.save_lora(d / "l.safetensors", {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)},
                {"magnet_lora": "1", "fingerprint": "{}", "rank": "2", "alpha": "2.0", "targets": "[]"})
    out["lora"] = (d / "l.safetensors").read_bytes()
    out["converted"] = convert_release(ref / "magnet-music", d / "c.safetensors").read_bytes()
    sf.write(str(d / "a.wav"), np.zeros((800, 1), np.float32) + 0.1, 8000)
    out["wav"] = (d / "a.wav").read_bytes()
    return out


def _loaders(ref, tmp_path):
    from magnet import lora as L
    from magnet.audio import read_audio
    from magnet.checkpoints import load_release
    from magnet.compat import load_torch_file
    from magnet.train_state import load_state

    def official(path):                      # a release folder whose LM file is the damaged one
        folder = tmp_path / f"rel_{path.stem}"
        folder.mkdir(exist_ok=True)
        shutil.copy(path, folder / "state_dict.bin")
        shutil.copy(ref / "magnet-music" / "compression_state_dict.bin", folder / "compression_state_dict.bin")
        try:
            load_release(folder)
        except MagnetError as e:
            raise MagnetError(str(e).replace("state_dict.bin", path.name)) from None

    def codec(path):                          # a release folder whose codec file is the damaged one
        folder = tmp_path / f"codec_{path.stem}"
        folder.mkdir(exist_ok=True)
        shutil.copy(ref / "magnet-music" / "state_dict.bin", folder / "state_dict.bin")
        shutil.copy(path, folder / "compression_state_dict.bin")
        try:
            load_release(folder)
        except MagnetError as e:
            raise MagnetError(str(e).replace("compression_state_dict.bin", path.name)) from None

    return {"torch file": (load_torch_file, ".bin", "state_dict.bin"), "release LM": (official, ".bin", "state_dict.bin"),
            "release codec": (codec, ".bin", "compression_state_dict.bin"),
            "LoRA": (L.load_lora, ".safetensors", "lora"), "converted": (load_release, ".safetensors", "converted"),
            "training state": (load_state, ".safetensors", "lora"), "audio": (read_audio, ".wav", "wav")}


@pytest.mark.parametrize("loader", ["torch file", "release LM", "release codec", "LoRA", "converted",
                                    "training state", "audio"])
def test_random_and_truncated_files_are_refused_with_a_magnet_error_naming_them(ref, tmp_path, samples, loader):
    fn, suffix, sample = _loaders(ref, tmp_path)[loader]
    n = 40 if loader.startswith("release") else 150
    cases = [(f"random{i}", data) for i, data in _random_files(sum(map(ord, loader)), n)]
    cases += [(f"cut{i}", data) for i, data in _truncations(samples[sample], 7, n // 3)]
    for name, data in cases:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        _refuses_naming(fn, path)
