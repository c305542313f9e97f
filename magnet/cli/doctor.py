"""`python -m magnet doctor`: what this machine runs, and a check that it runs it right (`magnet.doctor`)."""
from __future__ import annotations

from ..errors import MagnetError
from . import common


def add(sub) -> None:
    dr = sub.add_parser("doctor", help="check this machine: versions, device, kernels, correctness, speed",
                        description="Print the environment (versions, device, default dtype, kernels), check the "
                                    "decoding path on the device against the specification on a tiny random "
                                    "model (and on a release's real LM with --release), and time one decoding "
                                    "step of the small release's architecture. Ends with one verdict line; exit "
                                    "status 0 when every check passed, 1 otherwise. Paste the whole output (or "
                                    "--json) into a bug report.")
    dr.add_argument("--device", default=None, help=common.DEVICE_HELP)
    dr.add_argument("--dtype", default="auto", help="weights: auto (the device's default), fp32, fp16, bf16")
    dr.add_argument("--release", default=None, metavar="DIR",
                    help="also check this release's real LM (a few steps of 1 s): folder or converted .safetensors")
    dr.add_argument("--text-encoder", default=None, metavar="DIR",
                    help="T5 folder for --release (default: found beside it; none found = random text states)")
    dr.add_argument("--codec", default=None, metavar="DIR", help="EnCodec folder, for a release whose codec "
                                                                 "file is a pointer")
    dr.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    dr.add_argument("--no-speed", action="store_true", help="skip the step-time measurement (on a CPU, most of "
                                                            "the doctor's time)")
    dr.set_defaults(run=run)


def run(a) -> int:
    from .. import doctor
    if a.codec is not None and a.release is None:
        raise MagnetError("--codec needs --release: give the release folder whose codec file points to it.")
    echo = common.echo if a.json else (lambda line: print(line, flush=True))
    report = doctor.run(a.device, a.dtype, release=a.release, text_encoder=a.text_encoder, codec=a.codec,
                        speed=not a.no_speed, echo=echo)
    if a.json:
        print(doctor.to_json(report), flush=True)
    return 0 if report["ok"] else 1
