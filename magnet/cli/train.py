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
    t = sub.add_parser("train", help="fine-tune a LoRA on a folder of audio (captions from <name>.txt)",
                       description="Train a LoRA on the audio files in DATA_DIR (any format soundfile reads; captions "
                                   "from <name>.txt, audiocraft <name>.json, else the file name) and write it to "
                                   "--out. Use it with `generate --lora FILE[:STRENGTH]`.")
    t.add_argument("data_dir", metavar="DATA_DIR", help="folder of audio files")
    common.add_model_options(t, required=True)
    t.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    t.add_argument("--steps", default="500", help="optimizer steps (default 500)")
    t.add_argument("--rank", default="16", help="LoRA rank (default 16)")
    t.add_argument("--alpha", default=None, help="LoRA alpha (default: the rank)")
    t.add_argument("--lr", default="1e-4", help="peak learning rate (default 1e-4)")
    t.add_argument("--batch", default="1", help="clips per micro-batch (default 1)")
    t.add_argument("--grad-accum", default="1", help="micro-batches per optimizer step (default 1)")
    t.add_argument("--warmup", default="20", help="warmup steps before the cosine decay (default 20)")
    t.add_argument("--seed", default="0", help="random seed (default 0; the same seed on the CPU gives the same LoRA)")
    t.add_argument("--trigger", default="", help="a word put before every caption (then use it in your prompts)")
    t.add_argument("--targets", default=None, help="comma-separated layers to adapt (default: "
                                                    "self_attn.in_proj,self_attn.out_proj,cross_attention.in_proj,"
                                                    "cross_attention.out_proj,linear1,linear2)")
    t.add_argument("--dropout", default="0", help="LoRA dropout (default 0)")
    t.add_argument("--checkpointing", action="store_true",
                   help=f"gradient checkpointing: less memory, about {CHECKPOINTING_SLOWDOWN:.2f}x the step time "
                        f"(measured in the README, Fine-tuning)")
    t.add_argument("--save-every", default="0", help="also write the file every N steps (default: only at the end)")
    t.add_argument("--val-dir", default=None, help="folder of held-out clips: a validation loss at each save")
    t.add_argument("--crop-seconds", default=None, help="training window in seconds (default: the release's)")
    t.add_argument("--cache-dir", default=None, help="token cache folder (default: DATA_DIR/.magnet_cache)")
    t.add_argument("--resume", default=None, metavar="LORA", help="continue from this LoRA file (its step count)")
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
        cache_dir=a.cache_dir).checked()


def run(a) -> int:
    """tqdm progress with the running loss; Ctrl-C stops after the current step and keeps the file of the last
    complete step."""
    from ..train import train_lora
    s = settings(a)
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise MagnetError(f"--out {out} must end in .safetensors.")
    model = models.load(a, device=a.device)
    from tqdm import tqdm
    bar = tqdm(total=s.steps, unit="step", desc="training", file=sys.stderr)
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
    if res.path is None:
        common.echo("stopped before the first step: nothing written")
        return 130
    val = f", validation loss {res.val_losses[-1][1]:.3f}" if res.val_losses else ""
    print(f"wrote {res.path} ({res.steps_done} steps on {res.clips} clip(s), loss "
          f"{sum(res.losses[-10:]) / max(1, len(res.losses[-10:])):.3f}{val})"
          + (" - stopped early" if res.cancelled else ""))
    return 0
