"""Per-device policies, checked on the CPU with the GPU queries faked: the `auto` device and weight type,
bf16 refusals, the autocast context (never torch.autocast for MPS: torch 2.1-2.4 refuse the device type),
and EnCodec kept on the CPU when the LM runs on MPS."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from magnet import devices
from magnet.errors import MagnetError

ROOT = Path(__file__).resolve().parents[1]

GPUS = {   # name: (compute capability, bf16 supported, auto weight type)
    "Tesla P100-PCIE-16GB": ((6, 0), False, torch.float32),              # Pascal: fp16 slow
    "NVIDIA GeForce GTX 1080 Ti": ((6, 1), False, torch.float32),
    "NVIDIA GeForce GTX 1660 SUPER": ((7, 5), True, torch.float32),       # Turing TU116: fp16 gives NaN
    "NVIDIA GeForce GTX 1650": ((7, 5), True, torch.float32),
    "NVIDIA T600": ((7, 5), True, torch.float32),
    "NVIDIA GeForce RTX 2080 Ti": ((7, 5), True, torch.float16),          # Turing RTX
    "Tesla V100-SXM2-16GB": ((7, 0), True, torch.float16),
    "NVIDIA GeForce RTX 3090": ((8, 6), True, torch.float16),             # Ampere
    "NVIDIA H100 80GB HBM3": ((9, 0), True, torch.float16),
}


def fake_gpu(monkeypatch, name, capability=None, bf16=None):
    capability_, bf16_, _ = GPUS.get(name, ((8, 0), True, None))
    capability = capability or capability_
    bf16 = bf16_ if bf16 is None else bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("name", sorted(GPUS))
def test_auto_weight_type_per_gpu(monkeypatch, name):
    fake_gpu(monkeypatch, name)
    expected = GPUS[name][2]
    assert devices.default_dtype("cuda") == expected
    assert devices.parse_dtype("auto", torch.device("cuda")) == expected
    assert devices.parse_dtype("fp16", torch.device("cuda")) == torch.float16      # asked for: allowed


@pytest.mark.parametrize("name", ["Tesla P100-PCIE-16GB", "NVIDIA GeForce GTX 1080 Ti"])
def test_bf16_refused_where_unsupported_naming_the_alternatives(monkeypatch, name):
    fake_gpu(monkeypatch, name)
    with pytest.raises(MagnetError) as info:
        devices.parse_dtype("bf16", "cuda")
    msg = str(info.value)
    assert "bf16" in msg and "fp16" in msg and "fp32" in msg and name in msg, msg


def test_bf16_accepted_where_supported_and_on_the_cpu(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3090")
    assert devices.parse_dtype("bf16", "cuda") == torch.bfloat16
    assert devices.parse_dtype("bf16", "cpu") == torch.bfloat16
    assert devices.parse_dtype("bf16") == torch.bfloat16     # no device named: nothing to check against


def test_a_failing_cuda_query_means_fp32(monkeypatch):
    def broken(device=None):
        raise RuntimeError("CUDA driver initialization failed")
    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    assert devices.default_dtype("cuda") == torch.float32


def test_mps_defaults_to_fp32_and_allows_fp16(monkeypatch):
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.default_dtype("mps") == torch.float32
    assert devices.parse_dtype("auto", "mps") == torch.float32
    assert devices.parse_dtype("fp16", "mps") == torch.float16


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    assert devices.default_device().type == expected
    assert devices.parse_device("auto").type == expected


# -- autocast ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["mps", "cpu", "xpu", "mps:0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_autocast_is_never_asked_for_other_devices_than_cuda(monkeypatch, device, dtype):
    def refuse(*a, **k):
        raise RuntimeError(f"unsupported autocast device_type '{a[0] if a else k.get('device_type')}'")
    monkeypatch.setattr(torch, "autocast", refuse)     # torch 2.1-2.4 on "mps", even with enabled=False
    ctx = devices.autocast_for(torch.device(device), dtype)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        pass


def test_autocast_on_cuda_follows_the_weights(monkeypatch):
    made = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: made.append((a, k)) or contextlib.nullcontext())
    devices.autocast_for(torch.device("cuda:0"), torch.float16)
    devices.autocast_for("cuda", torch.bfloat16)
    devices.autocast_for("cuda", torch.float32)
    assert made == [(("cuda",), {"dtype": torch.float16}), (("cuda",), {"dtype": torch.bfloat16}),
                    (("cuda",), {"enabled": False})]


def test_every_autocast_site_goes_through_the_helper():
    """torch.autocast is called only by devices.autocast_for (and cuda_graphs' graph capture, which runs on
    CUDA only)."""
    allowed = {ROOT / "magnet" / "devices.py", ROOT / "magnet" / "cuda_graphs.py"}
    offenders = []
    for path in sorted([*(ROOT / "magnet").rglob("*.py"), *(ROOT / "nodes").glob("*.py")]):
        if path in allowed:
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\btorch\.autocast\s*\(|\bautocast\s*\(\s*[\"']|torch\.(cpu|cuda)\.amp\.autocast", line):
                offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_model_autocast_uses_the_helper(monkeypatch):
    """The generation boundary (CodecLM) enters the one autocast every feature runs under."""
    from magnet import model as model_mod
    calls = []

    def fake(device, dtype):
        calls.append((torch.device(device).type, dtype))
        return contextlib.nullcontext()
    monkeypatch.setattr(model_mod, "autocast_for", fake)
    m = SimpleNamespace(device=torch.device("mps"), dtype=torch.float16)
    with model_mod.CodecLM._autocast(m):
        pass
    assert calls == [("mps", torch.float16)]


# -- EnCodec beside an MPS model ------------------------------------------------------------------------

@pytest.mark.parametrize("device, expected", [("mps", "cpu"), ("mps:0", "cpu"), ("cuda:1", "cuda:1"),
                                              ("cpu", "cpu"), ("xpu", "xpu")])
def test_codec_device(device, expected):
    assert devices.codec_device(torch.device(device)) == torch.device(expected)


def test_engine_keeps_the_codec_on_the_cpu_when_the_model_runs_on_mps(monkeypatch):
    """load_parts with the device choice faked to MPS (the LM builder stubbed: no MPS tensor can exist here)."""
    from magnet import model as model_mod
    monkeypatch.setattr(model_mod, "parse_device", lambda device: torch.device("mps"))
    moved = []

    class Codec(torch.nn.Linear):
        def to(self, *args, **kw):
            moved.append(torch.device(args[0]))
            return super().to(*args, **kw)

    release = SimpleNamespace(lm_config=SimpleNamespace(kind="magnet", text_encoder="t5-base"), lm_state={},
                              codec=Codec(2, 2), source="fake")
    monkeypatch.setattr(model_mod, "load_release", lambda *a, **k: release)
    built = {}
    monkeypatch.setattr(model_mod, "build_lm", lambda cfg, state, src, device, dtype: built.update(device=device,
                                                                                                  dtype=dtype) or "lm")
    lm, codec, te, _ = model_mod.load_parts("fake", "magnet", "{source}", text_encoder=False, device="mps")
    assert built == {"device": torch.device("mps"), "dtype": torch.float32}
    assert moved == [torch.device("cpu")] and next(codec.parameters()).device.type == "cpu" and te is None


def test_comfyui_codec_patcher_loads_to_the_cpu_for_mps(monkeypatch, tmp_path):
    from pack import load_pack
    nodes = load_pack().nodes
    (tmp_path / "magnet-fake").mkdir()
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(tmp_path))
    monkeypatch.setattr(nodes.loaders, "pick_device", lambda device: torch.device("mps"))
    made = SimpleNamespace(lm=torch.nn.Linear(1, 1), codec=torch.nn.Linear(1, 1))
    monkeypatch.setattr(nodes.loaders.MagnetModel, "from_pretrained", lambda *a, **k: made)
    managed = {}
    monkeypatch.setattr(nodes.comfy, "manage", lambda module, dev=None, label="": managed.update({label: dev}))
    nodes.loaders.MagnetModelLoader().load("magnet-fake", "mps", "fp32")
    assert managed == {"MAGNeT LM (magnet-fake)": torch.device("mps"), "EnCodec (magnet-fake)": torch.device("cpu")}


# -- device names: a strict grammar, every other value refused naming it -------------------------------

def _gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("name, gpus, want", [
    ("cpu", 0, "cpu"), (" CPU ", 0, "cpu"), ("cpu:0", 0, "cpu:0"), ("gpu", 1, "cuda"), ("nvidia", 1, "cuda"),
    ("cuda:0", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"), ("gpu1", 2, "cuda:1"), ("CUDA:01", 2, "cuda:1"),
    (torch.device("cuda", 1), 2, "cuda:1"), (torch.device("cpu"), 0, "cpu")])
def test_device_names_in_the_grammar_give_that_device(monkeypatch, name, gpus, want):
    _gpus(monkeypatch, gpus)
    assert devices.parse_device(name, "--device") == torch.device(want)


@pytest.mark.parametrize("name, gpus", [
    ("gpu\u00b2", 2), ("cpu:\u00b2", 0), ("cuda:\u0661", 2), ("\uff43\uff50\uff55", 0), ("cuda:99999999999999999999", 2),
    ("cuda:" + "9" * 5000, 2), ("cuda:-1", 2), ("cuda:1", 1), ("gpu1", 1), ("cuda:0", 0), ("cuda", 0),
    ("cpu:1", 0), ("cuda:", 2), ("cuda:1:2", 2), ("cu da", 2), ("cuda 1", 2), ("cuda:1.0", 2), ("tpu", 2),
    ("meta", 0), ("mps:1", 0), ("xpu", 0), ("-", 0), ("\x00", 0), (torch.device("meta"), 0),
    (torch.device("cuda", 3), 2), (torch.device("cuda"), 0)])
def test_anything_but_a_device_this_machine_has_is_refused_naming_it(monkeypatch, name, gpus):
    _gpus(monkeypatch, gpus)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    with pytest.raises(MagnetError) as info:
        devices.parse_device(name, "--device")
    msg = str(info.value)
    assert msg.startswith(f"--device {name!r}"[:60]) and "Use auto or one of: cpu" in msg, msg


@pytest.mark.parametrize("value", [3, 0, 1.5, True, b"cpu", ["cpu"], object()])
def test_a_device_that_is_not_a_name_is_refused_naming_its_type(value):
    with pytest.raises(MagnetError, match=rf"^device .* must be a device name .* not a {type(value).__name__}"):
        devices.parse_device(value)
