"""The ComfyUI-Manager / Registry / comfy-cli install route, end to end, without ComfyUI itself.

Those tools copy the repository to `custom_nodes/<folder>` and install `requirements.txt` only (never
`pip install -e`). ComfyUI then loads the folder as `load_custom_node` does: a module named after the
folder path with '.' replaced by '_x_', executed from its `__init__.py`. This script does exactly that
in the current Python (which must hold torch + requirements.txt and NOT the `magnet` distribution),
then runs Text Encoder Loader -> Text Encode -> Model Loader -> Sampler -> Decode on the reference
fixtures, filling every widget from its declared default.

    python .ci/comfy_route.py [--reference ../shared/reference]
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".ci-venv*", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist")


def load_like_comfyui(folder: Path):
    """nodes.load_custom_node for a folder: sys_module_name = path with '.' -> '_x_', exec __init__.py."""
    module_path = str(folder)
    name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def widget_defaults(cls) -> dict:
    """What a freshly placed node holds: each widget's default (a combo's first choice)."""
    out = {}
    for section in ("required", "optional"):
        for key, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, (list, tuple)):
                out[key] = opts.get("default", kind[0] if kind else None)
            elif "default" in opts:
                out[key] = opts["default"]
    return out


def run(mappings, node: str, **inputs):
    cls = mappings[node]
    args = {**widget_defaults(cls), **inputs}
    result = getattr(cls(), cls.FUNCTION)(**args)
    if isinstance(result, dict):
        result = result["result"]
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES), (node, type(result))
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default=str(ROOT.parent / "shared" / "reference"))
    a = ap.parse_args()
    ref = Path(a.reference).resolve()
    if not (ref / "magnet-music" / "state_dict.bin").is_file():
        print(f"comfy_route: reference fixtures not found at {ref}", file=sys.stderr)
        return 1
    if importlib.util.find_spec("magnet") is not None:
        print("comfy_route: the `magnet` distribution is installed in this Python; this check needs a Python "
              "that has only requirements.txt", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ComfyUI" / "custom_nodes" / "ComfyUI-MAGNeT"
        shutil.copytree(ROOT, folder, ignore=SKIP)
        models = Path(tmp) / "models"
        for sub, names in (("magnet", ["magnet-music", "musicgen"]), ("text_encoders", ["t5-base", "t5-large"])):
            (models / sub).mkdir(parents=True)
            for n in names:
                (models / sub / n).symlink_to(ref / n)
        os.environ["MAGNET_MODELS_DIR"] = str(models / "magnet")
        os.environ["MAGNET_TEXT_ENCODERS_DIR"] = str(models / "text_encoders")
        pack = load_like_comfyui(folder)
        m = pack.NODE_CLASS_MAPPINGS
        releases = m["MagnetModelLoader"].INPUT_TYPES()["required"]["release"][0]
        assert "magnet-music" in releases, releases
        te, = run(m, "MagnetTextEncoderLoader", text_encoder="t5-base")
        cond, = run(m, "MagnetTextEncode", text_encoder=te, text="lofi hip hop beat")
        model, codec = run(m, "MagnetModelLoader", release="magnet-music")
        tokens, = run(m, "MagnetSampler", model=model, conditioning=cond, seed=1, duration=1.0,
                      decoding_steps="2,1,1,1")
        audio, = run(m, "MagnetDecodeAudio", codec=codec, tokens=tokens)
        wav, sr = audio["waveform"], audio["sample_rate"]
        seconds = wav.shape[-1] / sr
        assert wav.dim() == 3 and wav.shape[0] == 1 and 0.9 <= seconds <= 1.0, (tuple(wav.shape), sr)
        assert math.isfinite(float(wav.abs().max())), "non-finite audio"
        print(f"comfy_route: loaded as {pack.__name__!r}; {len(m)} nodes; generated {seconds:.2f} s at {sr} Hz "
              f"through Text Encoder Loader -> Text Encode -> Model Loader -> Sampler -> Decode: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
