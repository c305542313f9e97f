"""The doctor's environment report: Python, torch and transformers, the device (name, memory), the dtype a
model takes there by default and the autocast policy, and which kernels run (oneDNN linears, the CPU's
features and the linear layers fast mode chose here (bf16, int8 or fp32, with the measured rates), the SDPA
kernels that accept the model's attention, CUDA graphs)."""
from __future__ import annotations

import contextlib
import os
import platform
import warnings

import torch
import torch.nn.functional as F

from .. import devices, linears
from ..cuda_graphs import graphs_wanted
from ..stage_forward import DEFAULT_SETTINGS
from ..transformer import band_mask


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram() -> tuple[float | None, float | None]:
    """(total, available) GiB, where the OS says."""
    total = avail = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


def autocast(model):
    """The engine's mixed-precision context for a model's LM (the one every generation runs under)."""
    return devices.autocast_for(model.device, model.dtype)


def _autocast_text(model) -> str:
    ac = autocast(model)
    if not getattr(ac, "_enabled", False):
        return "off (the weights' dtype)"
    return f"{getattr(ac, 'device', '?')} {str(getattr(ac, 'fast_dtype', '?')).replace('torch.', '')}"


def _sdpa_kernels(device: torch.device, dtype: torch.dtype, head_dim: int, band: int) -> dict | None:
    """Which SDPA kernels accept the model's full attention and its band mask here (a probe on a small input;
    torch picks among them)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:                  # torch < 2.3
        return None
    q = torch.randn(1, 2, 24, head_dim, device=device).to(dtype)
    out = {}
    for label, mask in (("full", None), ("band", band_mask(24, band, device))):
        usable = []
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with warnings.catch_warnings(), sdpa_kernel([backend]):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                usable.append(name.split("_")[0].lower())
            except RuntimeError:
                pass
        out[label] = usable
    return out


def environment(device: torch.device, model=None) -> dict:
    """Versions, the device, the default dtype and autocast, and which kernels run (see the module doc)."""
    import transformers

    from .. import __version__
    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "magnet": __version__, "device": str(device)}
    cpu_total, cpu_avail = _ram()
    env["cpu"] = {"name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "ram_gib": cpu_total, "ram_available_gib": cpu_avail}
    with contextlib.suppress(Exception):
        env["cpu"]["capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        cc = torch.cuda.get_device_capability(idx)
        env["cuda"] = {"name": torch.cuda.get_device_name(idx), "capability": f"{cc[0]}.{cc[1]}",
                       "memory_gib": total / 2 ** 30, "free_gib": free / 2 ** 30, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(),
                       "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                       "tf32_cudnn": torch.backends.cudnn.allow_tf32, "devices": torch.cuda.device_count()}
    elif device.type == "mps":
        env["mps"] = {"macos": platform.mac_ver()[0]}
        with contextlib.suppress(Exception):
            env["mps"]["recommended_max_gib"] = torch.mps.recommended_max_memory() / 2 ** 30
    env["default_dtype"] = dtype_name(devices.default_dtype(device))
    if model is not None:
        env["dtype"] = dtype_name(model.dtype)
        env["autocast"] = _autocast_text(model)
        env["codec_device"] = str(next(model.codec.parameters()).device)
    settings = model.decoding if model is not None else DEFAULT_SETTINGS
    env["kernels"] = {
        "onednn_linears": device.type == "cpu" and linears.onednn_available(),
        "int8_fast_mode": device.type == "cpu" and linears.int8_available(),
        "bf16_fast_mode": device.type == "cpu" and linears.bf16_accelerated(),
        "prune_positions": device.type == "cpu" and bool(getattr(settings, "prune_on_cpu", False)),
        "cuda_graphs": device.type == "cuda" and graphs_wanted(settings),
        "MAGNET_CUDA_GRAPHS": os.environ.get("MAGNET_CUDA_GRAPHS"),
    }
    if device.type == "cpu":
        env["cpu"]["features"] = linears.cpu_features()
        choice = linears.choose_linears()
        rates = choice.rates or linears.measure_linears(
            ["fp32"] + (["bf16"] if linears.bf16_available() else []) + (["int8"] if linears.int8_available() else []))
        env["kernels"]["fast_linears"] = {"path": choice.path, "how": choice.how, "gflops": rates,
                                          "env": os.environ.get(linears.LINEARS_ENV)}
    with contextlib.suppress(Exception):
        dt = model.dtype if model is not None else devices.default_dtype(device)
        if device.type == "cuda" and model is not None and getattr(autocast(model), "_enabled", False):
            dt = autocast(model).fast_dtype
        env["kernels"]["sdpa"] = _sdpa_kernels(device, dt, 64, 5)
    return env


def environment_lines(env: dict) -> list[str]:
    k = env["kernels"]
    cpu = env["cpu"]
    ram = f", {cpu['ram_gib']:.1f} GiB RAM" if cpu.get("ram_gib") else ""
    if cpu.get("ram_available_gib"):
        ram += f" ({cpu['ram_available_gib']:.1f} free)"
    lines = [f"python   {env['python']} ({env['platform']})",
             f"torch    {env['torch']}   transformers {env['transformers']}   magnet {env['magnet']}",
             f"cpu      {cpu['name']}, {cpu['cores']} cores (torch uses {cpu['torch_threads']} threads){ram}"
             + (f", {cpu['capability']}" if cpu.get("capability") else "")]
    if "cuda" in env:
        c = env["cuda"]
        lines.append(f"cuda     {c['name']}, compute capability {c['capability']}, {c['memory_gib']:.1f} GiB "
                     f"({c['free_gib']:.1f} free); CUDA {c['cuda']}, cuDNN {c['cudnn']}, bf16 "
                     f"{'yes' if c['bf16'] else 'no'}, TF32 matmul {'on' if c['tf32_matmul'] else 'off'} / "
                     f"cuDNN {'on' if c['tf32_cudnn'] else 'off'}")
    if "mps" in env:
        m = env["mps"]
        mem = f", recommended max {m['recommended_max_gib']:.1f} GiB" if m.get("recommended_max_gib") else ""
        lines.append(f"mps      macOS {m['macos'] or '?'}{mem}")
    dtype = env.get("dtype", env["default_dtype"])
    lines.append(f"device   {env['device']}: weights {dtype} (auto here: {env['default_dtype']}), autocast "
                 f"{env.get('autocast', '?')}, codec on {env.get('codec_device', '?')}")
    yn = {True: "yes", False: "no"}
    graphs = yn[k["cuda_graphs"]] if env["device"].startswith("cuda") else "n/a (not CUDA)"
    if k.get("MAGNET_CUDA_GRAPHS") is not None:
        graphs += f" (MAGNET_CUDA_GRAPHS={k['MAGNET_CUDA_GRAPHS']})"
    lines.append(f"kernels  oneDNN linears {yn[k['onednn_linears']]}, int8 {yn[k['int8_fast_mode']]}, bf16 in "
                 f"hardware {yn[k.get('bf16_fast_mode', False)]}, position pruning {yn[k['prune_positions']]}, "
                 f"CUDA graphs {graphs}")
    if "features" in cpu:
        lines.append(f"cpu has  {linears.cpu_features_text(cpu['features'])}")
    if k.get("fast_linears"):
        f = k["fast_linears"]
        lines.append(f"fast     {linears.LinearsChoice(f['path'], f['how'], f['gflops']).describe()}"
                     + (f" ({linears.LINEARS_ENV}={f['env']})" if f.get("env") else ""))
    if k.get("sdpa"):
        lines.append(f"sdpa     kernels that run full attention: {', '.join(k['sdpa']['full']) or 'none'}; "
                     f"the band mask: {', '.join(k['sdpa']['band']) or 'none'}")
    return lines
