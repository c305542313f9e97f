"""Listening while a LoRA trains: preview clips rendered with the adapters as they are, through the normal
generation path (`MagnetModel.generate` on the model running the training LM), from a fixed seed so the clips of
successive saves compare."""
from __future__ import annotations

from pathlib import Path

import torch

from .train_state import derive_seed


def preview_prompts(prompts, trigger: str, data) -> list[str]:
    """The prompts previews are rendered from: `prompts` when given, else the trigger word and two captions of
    the dataset (`data`: a `dataset.AudioFolder`)."""
    if prompts:
        return list(prompts)
    captions = list(dict.fromkeys(c.caption for c in sorted(data.clips, key=lambda c: str(c.path))))
    picks = captions[:1] + captions[len(captions) // 2:][:1] if len(captions) > 1 else captions
    picks = list(dict.fromkeys(picks))
    trigger = (trigger or "").strip()
    return ([trigger] if trigger and trigger not in picks else []) + picks[:2]


def render_previews(model, train_lm, prompts: list[str], seconds: float, seed: int, step: int, folder=None) -> dict:
    """Clips of `prompts` from the model with the adapters as they are (`train_lm`), through the normal
    generation path, seeded from `seed` (the same at every save, so saves compare). The RNG streams of training
    are left as they were. Written as `folder/step{step:06d}_{i}.wav` when a folder is given."""
    from . import audio
    device = next(train_lm.parameters()).device
    was_training = train_lm.training
    train_lm.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            m = model.with_lm(train_lm)
            codes = m.generate(prompts, duration=seconds, seed=derive_seed(seed, "preview"))
            wav = m.decode(codes)
    finally:
        train_lm.train(was_training)
    files = []
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(wav.shape[0]):
            files.append(audio.write_wav(folder / f"step{step:06d}_{i}.wav", wav[i], model.sample_rate))
    return {"step": step, "prompts": list(prompts), "audio": wav, "sample_rate": model.sample_rate, "files": files}
