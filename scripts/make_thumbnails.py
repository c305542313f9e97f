"""Remake the template browser's thumbnails (workflows/<name>.jpg) from what each template makes.

Each template's graph is run node by node on the reference fixtures (../shared/reference, under the
release names the templates use), with the test suite's graph runner (tests/test_workflows.py run_graph),
and its own output is drawn: the log-mel spectrogram of the audio it saves (and of what it compares with),
a frame of the video it writes, the CLAP scores it shows, with the template's title in large type.
The fixtures are tiny random-weight models, so the sound is noise; the pictures are still each template's
real output (lengths, regions, loops, scenes, the video).

    PYTHONPATH=tests python scripts/make_thumbnails.py [--only magnet_05_best_of_four ...]

Needs pytest and the test suite's modules on the path (PYTHONPATH=tests: the graph runner's module).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
SIZE = 640                                  # the thumbnails' size (square, as before)
# Where the template browser of newer frontends (1.49, ComfyUI 0.33) draws its "Node graph" badge over a card:
# 8 px from the top-left corner, 28 px tall and about 117 px wide, on a card 224-256 px wide that zooms 5 % on
# hover. In thumbnail pixels (x0, y0, x1, y1) on the smallest card, with a margin: nothing of ours goes there.
# (The 1.2x frontend of ComfyUI 0.3.64 draws nothing over the picture.)
BADGE = (0, 0, 372, 112)
# the release names the templates use -> the fixture standing in for them
RELEASES = {"magnet-small-10secs": "magnet-music", "magnet-small-30secs": "magnet-music",
            "magnet-medium-10secs": "magnet-music", "audio-magnet-small": "magnet-audio",
            "musicgen-small": "musicgen"}
# colour per template family (background, accent)
FAMILY = {"01": ("#1b2250", "#8fa8ff"), "02": ("#173d2a", "#7fe0a0"), "03": ("#123c45", "#6fd8e8"),
          "04": ("#123c45", "#ffd36b"), "05": ("#4a3a10", "#ffd36b"), "06": ("#4a2410", "#ffa36b"),
          "07": ("#4a2410", "#ffe08a"), "08": ("#4a1030", "#ff8fc8"), "09": ("#3a1040", "#e09fff"),
          "10": ("#4a1030", "#ffb0a0"), "11": ("#103a3a", "#9ff0d0"), "12": ("#2c3a0c", "#d8ff8f"),
          "13": ("#401020", "#ffc08f"), "14": ("#e4dcf5", "#6a3fc0")}


def luminance(colour):
    r, g, b = Image.new("RGB", (1, 1), colour).getpixel((0, 0))
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255


def fail(msg):
    sys.exit(f"make_thumbnails: {msg}")


from PIL import Image, ImageDraw, ImageFont                          # noqa: E402  (a dependency of the pack)
try:
    from test_workflows import load, run_graph                     # the suite's graph runner
    from pack import load_pack
    from tiny_clap import tiny_clap
except ImportError as e:
    fail(f"needs the test modules ({e}): run it as PYTHONPATH=tests python scripts/make_thumbnails.py, after "
         f"pip install -e .[test]")


# ---------------------------------------------------------------- stand-ins for the core nodes
def test_audio(seconds=4.0, sr=32000):
    t = torch.arange(int(seconds * sr)) / sr
    x = sum(torch.sin(2 * math.pi * f * t) for f in (220.0, 277.2, 329.6)) * 0.2 * (0.6 + 0.4 * torch.sin(t * 3))
    return {"waveform": x.reshape(1, 1, -1).float(), "sample_rate": sr}


def test_frames(seconds=6.0, fps=8.0, h=120, w=160):
    """A sunset with a moving sun: frames [F, H, W, 3] in 0..1 like ComfyUI's IMAGE."""
    n = int(seconds * fps)
    y = torch.linspace(0, 1, h).reshape(h, 1, 1)
    sky = torch.cat([0.95 - 0.5 * y, 0.45 - 0.3 * y, 0.35 + 0.4 * y], -1).expand(h, w, 3)
    frames = []
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(n):
        f = sky.clone()
        cx, cy = 30 + 100 * i / n, 70 - 20 * math.sin(math.pi * i / n)
        sun = ((xx - cx) ** 2 + (yy - cy) ** 2 < 14 ** 2).unsqueeze(-1)
        f = torch.where(sun, torch.tensor([1.0, 0.85, 0.3]), f)
        f[int(h * 0.75):] = torch.tensor([0.08, 0.06, 0.12])
        frames.append(f)
    return torch.stack(frames).clamp(0, 1)


class Video:
    """What core LoadVideo gives (the parts the graphs use)."""

    def __init__(self, seconds=6.0):
        self.images, self.fps = test_frames(seconds), 8.0

    def get_duration(self):
        return self.images.shape[0] / self.fps

    def get_components(self):
        from types import SimpleNamespace
        return SimpleNamespace(images=self.images, audio=None, frame_rate=self.fps)


def externals(video_seconds=6.0):
    video = Video(video_seconds)
    info = {"loaded_duration": video.get_duration(), "loaded_fps": video.fps,
            "loaded_frame_count": video.images.shape[0]}
    return {
        "LoadAudio": lambda **k: (test_audio(),),
        "LoadVideo": lambda **k: (video,),
        "GetVideoComponents": lambda video: (video.images, None, video.fps),
        "CreateVideo": lambda images, fps, audio=None: ({"images": images, "fps": fps, "audio": audio},),
        "VHS_LoadVideo": lambda **k: (video.images, video.images.shape[0], None, info),
        "VHS_VideoInfo": lambda video_info: (video.fps, video.images.shape[0], video.get_duration(), 160, 120,
                                             video.fps, video.images.shape[0], video.get_duration(), 160, 120),
    }


# ---------------------------------------------------------------- the fixtures under the templates' names
def model_folders(tmp: Path):
    models = tmp / "magnet"
    models.mkdir()
    for name, fixture in RELEASES.items():
        (models / name).symlink_to(REFERENCE / fixture, target_is_directory=True)
    encoders = tmp / "text_encoders"
    encoders.mkdir()
    for name in ("t5-base", "t5-large"):
        (encoders / name).symlink_to(REFERENCE / name, target_is_directory=True)
    tiny_clap(tmp / "clap" / "larger_clap_music")
    (tmp / "loras").mkdir()
    tracks = tmp / "input" / "my_tracks"
    tracks.mkdir(parents=True)
    import soundfile as sf
    for i, f in enumerate((220.0, 330.0, 262.0)):
        t = np.arange(int(32000 * 1.5)) / 32000
        sf.write(str(tracks / f"track_{i}.wav"), (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 32000)
    os.environ.update(MAGNET_MODELS_DIR=str(models), MAGNET_TEXT_ENCODERS_DIR=str(encoders),
                      MAGNET_CLAP_DIR=str(tmp / "clap"), MAGNET_LORAS_DIR=str(tmp / "loras"),
                      MAGNET_INPUT_DIR=str(tmp / "input"))


# speed only: the fixtures are tiny, but training is cut to a few steps
OVERRIDES = {"MagnetTrainLora": {"steps": 4, "rank": 2, "learning_rate": 0.02},
             "MagnetModelLoader": {"dtype": "fp32"}}
# the fixtures' window is 2 s (the releases' 10 s): templates that keep a 3 s prompt or redraw seconds 4-6
# ask for the releases' 10 s
TEN = {"MagnetSampler": {"duration": 10.0}}
# and what must fit in the fixtures' 2 s window: a 1 s region, 1 s of MusicGen, 1 s of overlap
LONGER = {"magnet_03_continue_an_audio_clip": TEN,
          "magnet_04_regenerate_a_region": {**TEN, "MagnetRegenerateRegion": {"start": 4.5, "end": 5.5}},
          "magnet_07_hybrid_ar_prompt": {**TEN, "MagnetARPrompt": {"seconds": 1.0}},
          "magnet_10_long_soundtrack_for_a_video": {"MagnetSampler": {"overlap": 1.0}}}
VIDEO_SECONDS = {"magnet_13_soundtrack_with_scenes": 13.0}     # its timeline's last scene starts at 0:10


# ---------------------------------------------------------------- drawing
def mel_image(audio, width, height, accent):
    """Log-mel spectrogram of an AUDIO dict as an RGB image, low frequencies at the bottom."""
    wav = audio["waveform"][0].float().mean(0)
    sr = audio["sample_rate"]
    n_fft, hop = 1024, max(1, wav.numel() // (width * 2) or 1)
    spec = torch.stft(wav, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    mels = 80
    fmax = sr / 2
    mel = lambda f: 2595 * np.log10(1 + f / 700)                  # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(fmax), mels + 2) / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((mels, bins.size))
    for m in range(mels):
        lo, c, hi = edges[m:m + 3]
        fb[m] = np.clip(np.minimum((bins - lo) / (c - lo + 1e-9), (hi - bins) / (hi - c + 1e-9)), 0, None)
    m = torch.from_numpy(fb).float() @ spec
    db = 10 * torch.log10(m + 1e-10)
    db = (db - (db.max() - 70)).clamp(min=0) / 70                   # 70 dB range, 0..1
    v = db.flip(0).numpy()
    acc = np.array(Image.new("RGB", (1, 1), accent).getpixel((0, 0)), float) / 255
    rgb = np.stack([v ** 1.6 * acc[0] + v ** 3 * (1 - acc[0]),
                    v ** 1.6 * acc[1] + v ** 3 * (1 - acc[1]),
                    v ** 1.2 * acc[2] * 0.9 + 0.08], -1)
    img = Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))
    return img.resize((width, height), Image.BILINEAR)


def font(size, bold=True):
    for name in (("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"), "LiberationSans-Bold.ttf"):
        for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation",
                       "/Library/Fonts", "C:/Windows/Fonts"):
            p = Path(folder) / name
            if p.is_file():
                return ImageFont.truetype(str(p), size)
    return ImageFont.load_default(size)


def wrap(draw, text, f, width):
    lines, line = [], ""
    for word in text.split():
        trial = (line + " " + word).strip()
        if draw.textlength(trial, font=f) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def seconds(audio):
    return audio["waveform"].shape[-1] / audio["sample_rate"]


def panel(img, draw, box, label, audio, accent, marks=(), shade=None):
    """A spectrogram in box (x0, y0, x1, y1), its label and length; marks: seconds to draw a line at;
    shade: (start, end) seconds to highlight."""
    x0, y0, x1, y1 = box
    img.paste(mel_image(audio, x1 - x0, y1 - y0, accent), (x0, y0))
    dur = seconds(audio)
    if shade:
        a, b = (x0 + (x1 - x0) * s / dur for s in shade)
        over = Image.new("RGBA", (int(b - a), y1 - y0), (255, 255, 255, 60))
        img.paste(over, (int(a), y0), over)
        draw.rectangle([a, y0, b, y1], outline=accent, width=3)
    for s in marks:
        x = x0 + (x1 - x0) * s / dur
        draw.line([x, y0, x, y1], fill=accent, width=3)
    draw.rectangle(box, outline=accent, width=2)
    f = font(20)
    tag = f"{label}  {dur:.1f} s" if label else f"{dur:.1f} s"
    w = draw.textlength(tag, font=f)
    draw.rectangle([x0 + 6, y0 + 6, x0 + 18 + w, y0 + 34], fill=(0, 0, 0))
    draw.text((x0 + 12, y0 + 8), tag, font=f, fill=accent if luminance(accent) > 0.45 else "white")


def render(stem, wf, sinks, out: Path, overrides=None):
    num = stem.split("_")[1]
    bg, accent = FAMILY[num]
    title = wf_title(wf, stem)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(img)
    big = font(44)
    ink = "white" if luminance(bg) < 0.5 else "#1a1a1a"
    # the top-left corner is BADGE: the newer template browser covers it with its "Node graph" badge; the
    # template's number goes right of it, the title below it
    small = font(20, bold=False)
    tag = f"MAGNeT template {num}"
    x = SIZE - 24 - draw.textlength(tag, font=small)
    assert x >= BADGE[2], "the template's number would run under the badge"
    draw.text((x, 44), tag, font=small, fill=accent)
    y = BADGE[3]
    for line in wrap(draw, title, big, SIZE - 48)[:2]:
        draw.text((24, y), line, font=big, fill=ink)
        y += 52
    top = y + 14
    nodes = {n["id"]: n for n in wf["nodes"]}
    saved = [(nodes[nid], kw) for nid, (typ, kw) in sorted(sinks.items())]
    audios = [(re.sub(r"^Save Audio \((.*)\)$", r"\1", n.get("title") or n["widgets_values"][0].split("/")[-1]),
               kw["audio"]) for n, kw in saved if n["type"] == "SaveAudio"]
    videos = [kw.get("video") or kw for n, kw in saved if n["type"] in ("SaveVideo", "VHS_VideoCombine")]
    texts = [kw["source"] for n, kw in saved if n["type"] == "PreviewAny"]
    left, right, bottom = 24, SIZE - 24, SIZE - 24
    if videos:
        v = videos[0]
        frames, audio = v["images"], v["audio"]
        fps = float(v.get("fps") or v.get("frame_rate"))
        marks, strip = [], []
        if num == "13":                 # a frame at each scene's start, the scene's prompt under it
            timeline = next(n for n in wf["nodes"] if n["type"] == "MagnetPromptTimeline")["widgets_values"][0]
            scenes = [(int(m) * 60 + int(s), text) for m, s, text in
                      re.findall(r"^(\d+):(\d\d)\s+(.*)$", timeline, re.M)]
            marks = [t for t, _ in scenes][1:]
            strip = [(min(int(t * fps), len(frames) - 1), text) for t, text in scenes]
        elif num == "10":               # a film strip: a long video
            strip = [(int(i * (len(frames) - 1) / 3), None) for i in range(4)]
        if strip:
            n = len(strip)
            fw = (right - left - 12 * (n - 1)) // n
            fh = int(fw * frames.shape[1] / frames.shape[2])
            for i, (k, text) in enumerate(strip):
                x = left + i * (fw + 12)
                pic = Image.fromarray((frames[k].numpy() * 255).astype(np.uint8)).resize((fw, fh), Image.BILINEAR)
                img.paste(pic, (x, top))
                draw.rectangle([x, top, x + fw, top + fh], outline=accent, width=3)
                if text:
                    for j, line in enumerate(wrap(draw, text, font(16, bold=False), fw)[:2]):
                        draw.text((x, top + fh + 6 + 20 * j), line, font=font(16, bold=False), fill=accent)
            fh += 50 if any(text for _, text in strip) else 0
        else:
            frame = frames[len(frames) // 2]
            fw = 250
            fh = int(fw * frame.shape[0] / frame.shape[1])
            pic = Image.fromarray((frame.numpy() * 255).astype(np.uint8)).resize((fw, fh), Image.BILINEAR)
            img.paste(pic, (left, top))
            draw.rectangle([left, top, left + fw, top + fh], outline=accent, width=3)
            draw.text((left + fw + 16, top + 4), f"{len(frames)} frames", font=font(22), fill="white")
            draw.text((left + fw + 16, top + 34), f"{len(frames) / fps:.1f} s of video", font=font(22, bold=False),
                      fill=accent)
            draw.text((left + fw + 16, top + 64), "+ its new soundtrack", font=font(22, bold=False), fill=accent)
        panel(img, draw, (left, top + fh + 20, right, bottom), "soundtrack", audio, accent,
              marks=[m for m in marks if m < seconds(audio)])
    elif texts:
        scores = [float(x) for x in re.findall(r"CLAP\D*?(-?\d+\.\d+)", texts[0])]
        name, audio = audios[0]
        h = (bottom - top) * 3 // 5
        panel(img, draw, (left, top, right, top + h), "best of four", audio, accent)
        by = top + h + 20
        bw = (right - left) // max(1, len(scores))
        hi = max(scores, default=1.0)
        lo = min(scores, default=0.0) - 0.5 * (hi - min(scores, default=0.0) + 1e-3)
        for i, s in enumerate(scores):
            bh = int((bottom - by - 30) * (s - lo) / (hi - lo + 1e-9)) + 4
            best = s == max(scores)
            draw.rectangle([left + i * bw + 10, bottom - bh, left + (i + 1) * bw - 10, bottom],
                           fill=accent if best else "#777777")
            draw.text((left + i * bw + 14, bottom - bh - 26), f"{s:+.3f}", font=font(18), fill="white")
    else:
        extra = {}
        if num == "04":
            region = next(n for n in wf["nodes"] if n["type"] == "MagnetRegenerateRegion")["widgets_values"]
            region = {"start": region[2], "end": region[3], **(overrides or {}).get("MagnetRegenerateRegion", {})}
            extra = {"shade": (region["start"], region["end"])}
        if num == "03":
            extra = {"shade": (0.0, next(n for n in wf["nodes"] if n["type"] == "MagnetEncodeAudio")
                               ["widgets_values"][1])}
        if num == "07":
            ar = next(n for n in wf["nodes"] if n["type"] == "MagnetARPrompt")["widgets_values"][2]
            extra = {"shade": (0.0, (overrides or {}).get("MagnetARPrompt", {}).get("seconds", ar))}
        if num == "11":
            audios = [("clip", test_audio())] + audios
        if num == "06":                 # the rescoring weight: how much of each model's judgement counts
            node = next(n for n in wf["nodes"] if n["type"] == "MagnetRescorer")
            w = float((overrides or {}).get("MagnetRescorer", {}).get("weight", node["widgets_values"][0]))
            bar = bottom - 120
            split = left + int((right - left) * (1 - w))
            draw.rectangle([left, bar, split, bottom], fill="#e8e8e8")
            draw.rectangle([split, bar, right, bottom], fill=accent)
            draw.text((left + 14, bar + 40), f"MAGNeT {1 - w:.0%}", font=font(30), fill="#202020")
            draw.text((split + 14, bar + 40), f"MusicGen {w:.0%}", font=font(30), fill="#202020")
            bottom = bar - 20
        gap = 16
        h = (bottom - top - gap * (len(audios) - 1)) // len(audios)
        longest = max(seconds(a) for _, a in audios)
        for i, (name, audio) in enumerate(audios):
            marks, box = (), (left, top + i * (h + gap), right, top + i * (h + gap) + h)
            if num == "12":             # on one time axis: the loop, then three of it end to end
                loop = min(seconds(a) for _, a in audios)
                marks = [loop * k for k in range(1, round(seconds(audio) / loop))]
                box = (left, box[1], left + int((right - left) * seconds(audio) / longest), box[3])
            if num == "14":             # side by side: with the LoRA | without it
                w = (right - left - gap) // len(audios)
                box = (left + i * (w + gap), top, left + i * (w + gap) + w, bottom)
            panel(img, draw, box, name, audio, accent,
                  marks=marks, **(extra if i == len(audios) - 1 or num in ("03", "07") else {}))
    img.save(out, "JPEG", quality=88)


def wf_title(wf, stem):
    note = next((n for n in wf["nodes"] if n["type"] == "MarkdownNote"), None)
    if note:
        m = re.match(r"##\s*(.+)", note["widgets_values"][0])
        if m:
            return m.group(1).strip()
    return stem.split("_", 2)[2].replace("_", " ").capitalize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="template names (default: all)")
    args = ap.parse_args()
    if not (REFERENCE / "magnet-music").is_dir():
        fail(f"the reference fixtures are not at {REFERENCE}")
    torch.manual_seed(0)
    ours = load_pack().NODE_CLASS_MAPPINGS
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        model_folders(Path(tmp))
        for path in sorted((ROOT / "workflows").glob("*.json")):
            if args.only and path.stem not in args.only:
                continue
            wf = load(path)
            try:
                overrides = {**OVERRIDES, **LONGER.get(path.stem, {})}
                sinks = run_graph(wf, ours, overrides, externals(VIDEO_SECONDS.get(path.stem, 6.0)))
            except Exception as e:           # report it, go on with the others
                print(f"{path.name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                failed.append(path.name)
                continue
            render(path.stem, wf, sinks, path.with_suffix(".jpg"), overrides)
            print(f"{path.with_suffix('.jpg').relative_to(ROOT)}: {json.dumps(wf_title(wf, path.stem))}")
    if failed:
        fail(f"no thumbnail for {', '.join(failed)}")


if __name__ == "__main__":
    main()
