"""The full state of a LoRA training run, saved beside the LoRA so a stopped run resumes exactly.

`<LoRA stem>.state.safetensors` holds every tensor (AdamW's `exp_avg` / `exp_avg_sq` / `step` per adapter
parameter, by name; each RNG stream's state as a byte tensor) and, as JSON in its metadata, everything else: the
step done and the total, the settings, the release, the dataset's fingerprint and the GradScaler's state. It
loads without running code (safetensors + JSON, never pickle).

The data order, crops, masks, stages and condition dropout of a step are derived from (seed, step, example)
alone (`derive_seed`), so they need no state: a run resumed at step N draws what the run that was never stopped
drew at step N. With the optimizer's moments, the schedule position (the step) and the RNG streams restored, a
resumed run on the CPU ends with the same LoRA, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MagnetError, first_line
from .files import save_safetensors

STATE_SUFFIX = ".state.safetensors"
STATE_FORMAT = "magnet-train-state"
STATE_VERSION = "1"
# what must be the same to continue a run (the issue of a LoRA is what it adapts and how it is scaled)
MUST_MATCH = ("release", "rank", "alpha", "targets", "dataset")


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from a seed of any size and keys (step, example index, a purpose): what every random draw
    of training starts from, so a draw depends on these alone (not on batch size, processes, or a restart)."""
    text = ":".join([str(int(seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def state_path(lora_path: str | Path) -> Path:
    """The state file that belongs to a LoRA file: `<stem>.state.safetensors` beside it."""
    p = Path(lora_path)
    return p.with_name(p.name[: -len(".safetensors")] + STATE_SUFFIX if p.name.endswith(".safetensors")
                       else p.name + STATE_SUFFIX)


def is_state_file(path: str | Path) -> bool:
    return str(path).endswith(STATE_SUFFIX)


def dataset_fingerprint(digests, captions) -> dict:
    """The dataset a run trains on: how many clips, a hash of their sorted content hashes (what the token cache
    keys on) and one of their sorted captions."""
    def h(items):
        return hashlib.sha256("\n".join(sorted(items)).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return {"clips": len(list(digests)), "audio": h(digests), "captions": h(captions)}


@dataclass
class TrainState:
    """A loaded state: `info` (the JSON part) and `tensors`."""
    path: Path
    info: dict
    tensors: dict

    @property
    def step(self) -> int:
        return int(self.info["step"])


def save_state(path: Path, *, step: int, total: int, info: dict, optimizer: torch.optim.Optimizer,
               param_names: dict, scaler=None) -> Path:
    """Write the state atomically (a temporary name in the same folder, then os.replace).

    param_names: {parameter: its name} for every parameter the optimizer updates. info: the JSON-able rest
    (settings, release, dataset fingerprint)."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for p, name in param_names.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"adam.{name}.{key}"] = value.detach().to("cpu")
            else:
                tensors[f"adam.{name}.{key}"] = torch.tensor(float(value))
    body = dict(info, format=STATE_FORMAT, version=STATE_VERSION, step=int(step), total=int(total),
                scaler=scaler.state_dict() if scaler is not None else None)
    return save_safetensors(Path(path), tensors, {"state": json.dumps(body)})


def load_state(path: str | Path) -> TrainState:
    """Read a state file; anything damaged (not safetensors, no or bad JSON, a step that is not a whole number,
    settings of the wrong type) is a MagnetError naming the file."""
    from safetensors import safe_open
    path = Path(path).expanduser()
    fix = "It is damaged: resume from an intact file, or start the training again."
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta["state"])
    except FileNotFoundError:
        raise MagnetError(f"training state {path} not found. {fix}") from None
    except Exception as e:          # whatever the parser meets in a damaged file
        raise MagnetError(f"training state {path} is not readable ({type(e).__name__}: {first_line(e)}). "
                          f"{fix}") from None
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        raise MagnetError(f"{path} is not a MAGNeT training state. {fix}")
    if info.get("version") != STATE_VERSION:
        raise MagnetError(f"training state {path} has version {info.get('version')!r}; this package reads "
                          f"{STATE_VERSION}. Start the training again.")
    _check_info(info, path, fix)
    return TrainState(path, info, tensors)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_info(info: dict, path: Path, fix: str) -> None:
    s = info.get("settings")
    problems = []
    if not _whole(info.get("step")) or info["step"] < 0:
        problems.append(f"step {info.get('step')!r}")
    if not _whole(info.get("total")) or info["total"] < 1:
        problems.append(f"total {info.get('total')!r}")
    if not isinstance(s, dict):
        problems.append("settings")
    else:
        if not _whole(s.get("rank")) or s["rank"] < 1:
            problems.append(f"rank {s.get('rank')!r}")
        a = s.get("alpha")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            problems.append(f"alpha {a!r}")
        if not isinstance(s.get("targets"), list) or not all(isinstance(t, str) for t in s["targets"]):
            problems.append(f"targets {s.get('targets')!r}")
        if not _whole(s.get("seed")):
            problems.append(f"seed {s.get('seed')!r}")
    if not isinstance(info.get("release"), str):
        problems.append(f"release {info.get('release')!r}")
    if not isinstance(info.get("dataset"), dict):
        problems.append(f"dataset {info.get('dataset')!r}")
    if problems:
        raise MagnetError(f"training state {path}: {', '.join(problems)} damaged or missing. {fix}")


def check_resume(state: TrainState, current: dict) -> None:
    """Refuse to continue a run whose release, rank, alpha, targets or dataset differ, naming both values.
    `current`: {'release', 'rank', 'alpha', 'targets', 'dataset'} of the run asked for."""
    s = state.info["settings"]
    saved = {"release": state.info["release"], "rank": s["rank"], "alpha": float(s["alpha"]),
             "targets": list(s["targets"]), "dataset": state.info["dataset"]}
    for key in MUST_MATCH:
        want, have = saved[key], current[key]
        if key == "alpha":
            want, have = float(want), float(have)
        if key == "targets":
            want, have = sorted(want), sorted(have)
        if want != have:
            if key == "dataset":
                what = ("other audio" if want.get("audio") != have.get("audio") else "other captions"
                        if want.get("captions") != have.get("captions") else
                        f"loudness target {want.get('loudness')} then, {have.get('loudness')} now")
                raise MagnetError(f"cannot resume {state.path}: the dataset differs ({want.get('clips')} clips "
                                  f"then, {have.get('clips')} now; {what}). Resume with the same files and "
                                  f"captions, or start a new training.")
            raise MagnetError(f"cannot resume {state.path}: its {key} is {want!r}, this run's is {have!r}. Resume "
                              f"with {key} {want!r}, or start a new training.")


def restore_optimizer(state: TrainState, optimizer: torch.optim.Optimizer, param_names: dict) -> None:
    """Put the saved AdamW state back, parameter by name; a parameter missing from the state is an error."""
    for p, name in param_names.items():
        entry = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = state.tensors.get(f"adam.{name}.{key}")
            if t is None:
                if state.step == 0:
                    continue
                raise MagnetError(f"training state {state.path} has no optimizer state for {name}. It is damaged "
                                  f"or from other targets: start the training again.")
            if key != "step" and tuple(t.shape) != tuple(p.shape):
                raise MagnetError(f"training state {state.path}: the optimizer state of {name} has shape "
                                  f"{tuple(t.shape)}, the adapter {tuple(p.shape)}. Start the training again.")
            entry[key] = t.to(p.device) if key != "step" else t.clone()
        if entry:
            optimizer.state[p] = entry


def restore_rng(state: TrainState) -> None:
    cpu = state.tensors.get("rng.cpu")
    if cpu is not None:
        torch.set_rng_state(cpu.to(torch.uint8))
    cuda = [state.tensors[k] for k in sorted((k for k in state.tensors if k.startswith("rng.cuda.")),
                                             key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda[:torch.cuda.device_count()]])
