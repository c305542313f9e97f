"""`python -m magnet train DATA_DIR --model REL --out FILE`: a LoRA on a folder of audio (`magnet.train`)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import MagnetError
from . import common, models

# The step time with --checkpointing, from the README's measurement (Fine-tuning, "Speed and memory": 5.52 s
# against 3.75 s a training step on the CPU)
CHECKPOINTING_SLOWDOWN = 5.52 / 3.75


def add(sub) -> None:
    from ..train import PREVIEW_SECONDS, TrainSettings
    d = TrainSettings()
    t = sub.add_parser("train", help="fine-tune a LoRA on a folder of audio (captions from <name>.txt)",
                       description="Train a LoRA on the audio files in DATA_DIR (any format soundfile reads; captions "
                                   "from <name>.txt, audiocraft <name>.json, else the file name) and write it to "
                                   "--out. Use it with `generate --lora FILE[:STRENGTH]`.")
    t.add_argument("data_dir", metavar="DATA_DIR", help="folder of audio files")
    common.add_model_options(t, required=True)
    t.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    t.add_argument("--steps", default=str(d.steps),
                   help=f"optimizer steps in all; a resumed run continues to this total (default {d.steps})")
    t.add_argument("--rank", default=str(d.rank), help=f"LoRA rank (default {d.rank})")
    t.add_argument("--alpha", default=None, help="LoRA alpha (default: the rank)")
    t.add_argument("--lr", default=f"{d.lr:g}", help=f"peak learning rate (default {d.lr:g})")
    t.add_argument("--batch", default=str(d.batch), help=f"clips per micro-batch and process (default {d.batch})")
    t.add_argument("--grad-accum", default=str(d.grad_accum),
                   help=f"micro-batches per optimizer step (default {d.grad_accum}); the effective batch is "
                        f"batch x grad-accum x processes (torchrun)")
    t.add_argument("--warmup", default=str(d.warmup), help=f"warmup steps before the cosine decay (default {d.warmup})")
    t.add_argument("--seed", default=str(d.seed),
                   help=f"random seed, any whole number (default {d.seed}; the same seed on the CPU gives the same LoRA)")
    t.add_argument("--trigger", default="", help="a word put before every caption (then use it in your prompts)")
    t.add_argument("--targets", default=None, help="comma-separated layers to adapt (default: "
                                                    "self_attn.in_proj,self_attn.out_proj,cross_attention.in_proj,"
                                                    "cross_attention.out_proj,linear1,linear2)")
    t.add_argument("--dropout", default="0", help="LoRA dropout (default 0)")
    t.add_argument("--checkpointing", action="store_true",
                   help=f"gradient checkpointing: less memory, about {CHECKPOINTING_SLOWDOWN:.2f}x the step time "
                        f"(measured in the README, Fine-tuning)")
    t.add_argument("--save-every", default=str(d.save_every),
                   help="also write OUT_STEM.step<N>.safetensors (and previews) every N steps (default: only at the "
                        "end)")
    t.add_argument("--val-dir", default=None, help="folder of held-out clips: a validation loss at each save")
    t.add_argument("--crop-seconds", default=None, help="training window in seconds (default: the release's)")
    t.add_argument("--cache-dir", default=None, help="token cache folder (default: DATA_DIR/.magnet_cache)")
    t.add_argument("--loudness", default=None, metavar="LUFS",
                   help="normalise each file to this loudness (e.g. -14) in what is encoded for training; the files "
                        "are never changed (default: as recorded)")
    t.add_argument("--resume", default=None, metavar="LORA",
                   help="continue a run from a LoRA it wrote (e.g. OUT_STEM.step120.safetensors after Ctrl-C) and the "
                        "training state beside it: the same LoRA, bit for bit on the CPU, as a run never stopped; "
                        "--steps is the total to reach")
    t.add_argument("--preview", action="append", default=[], metavar="TEXT",
                   help="a prompt for the preview clips rendered at each save and at the end, into "
                        "OUT_STEM_previews/step{step:06d}_{i}.wav (repeat for several; default: the trigger word "
                        "and two captions of the set)")
    t.add_argument("--preview-seconds", default=None,
                   help=f"length of each preview clip (default {PREVIEW_SECONDS:g} s, at most the release's window)")
    t.add_argument("--no-preview", action="store_true", help="render no preview clips")
    common.add_device_options(t, with_dtype=False)
    t.set_defaults(run=run)


def settings(a):
    """The options as checked `TrainSettings`."""
    from ..train import TrainSettings
    n = common.number
    return TrainSettings(
        steps=n(a.steps, "--steps", "give the number of optimizer steps, at least 1, e.g. 500.", whole=True, lo=1),
        rank=n(a.rank, "--rank", "give a LoRA rank of at least 1, e.g. 16.", whole=True, lo=1),
        alpha=None if a.alpha is None else n(a.alpha, "--alpha", "give a number, e.g. 16 (default: the rank)."),
        lr=n(a.lr, "--lr", "give a learning rate, e.g. 1e-4."),
        batch=n(a.batch, "--batch", "give the clips per micro-batch, at least 1, e.g. 1.", whole=True, lo=1),
        grad_accum=n(a.grad_accum, "--grad-accum", "give the micro-batches per optimizer step, at least 1, e.g. 4.",
                     whole=True, lo=1),
        warmup=n(a.warmup, "--warmup", "give the warmup steps, 0 or more, e.g. 20.", whole=True, lo=0),
        seed=n(a.seed, "--seed", "give an integer such as 0.", whole=True),
        trigger=a.trigger or "", targets=tuple(a.targets.split(",")) if a.targets else (),
        dropout=n(a.dropout, "--dropout", "give a LoRA dropout, e.g. 0.05."),
        checkpointing=bool(a.checkpointing),
        save_every=n(a.save_every, "--save-every", "give 0 (only at the end) or a number of steps, e.g. 100.",
                     whole=True, lo=0),
        val_dir=a.val_dir,
        crop_seconds=None if a.crop_seconds is None else n(a.crop_seconds, "--crop-seconds",
                                                           "give the training window in seconds, e.g. 10."),
        cache_dir=a.cache_dir, loudness=common.loudness(a.loudness), previews=not a.no_preview, preview_prompts=tuple(a.preview),
        preview_seconds=None if a.preview_seconds is None else n(
            a.preview_seconds, "--preview-seconds", "give the previews' length in seconds, e.g. 5.", lo=0, lo_open=True),
        preview_dir=str(previews_dir(Path(a.out)))).checked()


def previews_dir(out: Path) -> Path:
    """Where the command line writes a run's previews: <LoRA stem>_previews beside the LoRA."""
    return out.with_name(f"{out.stem}_previews")


def run(a) -> int:
    """tqdm progress with the running loss; Ctrl-C stops after the current step and keeps the file of the last
    complete step."""
    from .. import distributed
    from ..train import check_output, train_lora
    s = settings(a)
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise MagnetError(f"--out {out} must end in .safetensors.")
    device = distributed.local_device(a.device)
    group = distributed.setup(device)         # under torchrun: join the other processes (one process: nothing)
    try:
        return _train(a, s, out, device, group, check_output, train_lora)
    finally:
        distributed.teardown()


def _train(a, s, out, device, group, check_output, train_lora) -> int:
    if group.main:
        check_output(out)                     # before the model loads or anything downloads
    if not group.main:                        # the first process loads (and downloads) first
        group.barrier()
    model = models.load(a, device=device)
    if group.main:
        group.barrier()
    from tqdm import tqdm
    bar = tqdm(total=s.steps, unit="step", desc="training", file=sys.stderr, disable=not group.main)
    stop = {"now": False}
    recent: list = []

    def progress(step, total, loss):
        recent.append(loss)
        del recent[:-10]
        bar.n = step
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")

    previous = signal.getsignal(signal.SIGINT)

    def interrupt(signum, frame):
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
        bar.write("stopping after this step (Ctrl-C again to abort without saving) ...")
    try:
        signal.signal(signal.SIGINT, interrupt)
    except ValueError:          # not the main thread
        pass
    try:
        res = train_lora(model, a.data_dir, out, s, progress=progress, should_stop=lambda: stop["now"],
                         resume=a.resume, log=bar.write)
    finally:
        bar.close()
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass
    if not group.main:
        return 0
    if res.path is None:
        common.echo("stopped before the first step: nothing written")
        return 130
    val = f", validation loss {res.val_losses[-1][1]:.3f}" if res.val_losses else ""
    print(f"wrote {res.path} ({res.steps_done} steps on {res.clips} clip(s), loss "
          f"{sum(res.losses[-10:]) / max(1, len(res.losses[-10:])):.3f}{val})"
          + (f" - stopped early: continue with --resume {res.path}" if res.cancelled else ""))
    for p in res.previews:
        if p["files"]:
            print(f"previews at step {p['step']}: {', '.join(str(f) for f in p['files'])}")
    return 0
