"""`python -m magnet convert RELEASE OUT.safetensors`: a release as one safetensors file."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import MagnetError
from . import common


def add(sub) -> None:
    c = sub.add_parser("convert", help="write a release as one .safetensors file (faster to load, never code)")
    c.add_argument("release", help="official release folder (state_dict.bin + compression_state_dict.bin)")
    c.add_argument("output", help="output .safetensors path")
    c.add_argument("--codec", help="transformers EnCodec folder, for releases whose codec file is a pointer")
    c.add_argument("--fp16", action="store_true", help="store LM weights in float16 (half the size)")
    c.set_defaults(run=run)


def run(a) -> int:
    import torch

    from ..checkpoints import convert_release, converted_path
    out = converted_path(a.output)
    common.output_folder(out, "the output")
    partial = out.with_name(out.name + ".partial")      # what convert_release writes, then renames
    try:
        out = convert_release(a.release, out, codec_dir=a.codec, dtype=torch.float16 if a.fp16 else None)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        if _is_write_error(e, out, partial):
            raise MagnetError(f"cannot write {out}: {common.reason(e)}. Choose a writable folder with enough free "
                              f"space.") from None
        raise
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _is_write_error(e: BaseException, out: Path, partial: Path) -> bool:
    """An OSError about the output (or with no file named), or safetensors failing to serialize."""
    if isinstance(e, OSError):
        names = [Path(os.fsdecode(f)) for f in (e.filename, e.filename2) if f is not None]
        return not names or any(n in (out, partial) or n in out.parents for n in names)
    return type(e).__name__ == "SafetensorError" and "serializ" in str(e)
