"""Benchmark dataset preparation (`magnet.prepare`): CLAP tagging, tempo and key, on a real-size CLAP with random
weights (no download) and synthetic music.

    python scripts/benchmark_prepare.py                  # 120 s of audio in 2 files of 60 s (44.1 kHz stereo)
    python scripts/benchmark_prepare.py --seconds 300 --file-seconds 100 --threads 2

The CLAP is laion/larger_clap_music's architecture, built from transformers' ClapConfig: the HTSAT-base audio
encoder (patch embedding 128, hidden size 1024, depths 2-2-12-2, heads 4-8-16-32, window 8, 64 mel bands, 256 x
256 spectrogram patches), RoBERTa-base as the text encoder (768 wide, 12 layers), 512-wide projections, no fusion;
its feature extractor is the released one's (48 kHz, 10 s windows, hop 480, 50-14000 Hz, repeat-pad). The
tokenizer is byte-level BPE without merges (the text side runs once per run, for the vocabulary).

Printed: the one-off costs (building the model, the vocabulary's text embeddings, librosa's first call), then per
pass over the files: seconds per minute of audio and the real-time factor (audio seconds / wall seconds) for CLAP
tags alone, tags + tempo + key (when librosa is installed), and the whole `prepare_folder` run (reading, tagging,
writing the captions and the manifest), with the process's CPU seconds beside (on a machine shared with other
jobs the wall time grows with the load, the CPU seconds much less); the peak RSS of the process; the CPU's model
and SIMD flags (lscpu) and the load average.
Import the engine from the installed package (`pip install -e .` at the repository root).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def larger_clap_music_like(folder: Path) -> Path:
    """A random-weight CLAP of larger_clap_music's architecture, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizerFast
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    bpe.decoder = decoders.ByteLevel()
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe)
    cfg = ClapConfig(
        text_config=dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, projection_dim=512),
        audio_config=dict(spec_size=256, num_mel_bins=64, window_size=8, patch_size=4, patch_stride=(4, 4),
                          depths=[2, 2, 12, 2], num_attention_heads=[4, 8, 16, 32], patch_embeds_hidden_size=128,
                          hidden_size=1024, projection_dim=512, enable_fusion=False),
        projection_dim=512)
    torch.manual_seed(0)
    model = ClapModel(cfg).eval()
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, frequency_min=50, frequency_max=14000,
                              truncation="rand_trunc", padding="repeatpad")
    model.save_pretrained(folder, safe_serialization=True)
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def synthetic_music(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Stereo [S, 2]: a chord progression with harmonics, a kick and hi-hat pattern at 100 BPM, a little noise."""
    g = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    roots = [220.0, 174.61, 261.63, 196.0]              # A, F, C, G
    x = np.zeros(n)
    bar = int(2.4 * sr)
    for i, start in enumerate(range(0, n, bar)):
        seg = slice(start, min(n, start + bar))
        for ratio in (1.0, 1.25, 1.5):
            for h in (1, 2, 3):
                x[seg] += 0.08 / h * np.sin(2 * np.pi * roots[i % 4] * ratio * h * t[seg])
    beat = int(0.6 * sr)
    for start in range(0, n, beat):
        k = np.arange(min(beat, n - start))
        x[start:start + len(k)] += 0.5 * np.sin(2 * np.pi * 55 * k / sr) * np.exp(-k / (0.05 * sr))
        hat = start + beat // 2
        if hat < n:
            m = np.arange(min(int(0.03 * sr), n - hat))
            x[hat:hat + len(m)] += 0.1 * g.standard_normal(len(m)) * np.exp(-m / (0.005 * sr))
    x += 0.01 * g.standard_normal(n)
    x /= max(1.0, np.abs(x).max() / 0.9)
    return np.stack([x, np.roll(x, 7)], axis=1).astype(np.float32)


def cpu_info() -> tuple[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("sse4", "avx", "amx", "fma", "f16c"))]
    return fields.get("Model name", "unknown").strip(), " ".join(simd) or "none listed"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="audio in all (default 120)")
    ap.add_argument("--file-seconds", type=float, default=60.0, help="length of each file (default 60)")
    ap.add_argument("--rate", type=int, default=44100, help="the files' sample rate (default 44100)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from magnet.clap import ClapScorer
    from magnet.prepare import prepare_folder
    from magnet.tagging import Tagger, analyse_file, load_librosa

    model_name, flags = cpu_info()
    print(f"CPU: {model_name} ({os.cpu_count()} logical CPUs); SIMD flags: {flags}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} (other processes share the CPU "
          f"when it is above the CPU count)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        clap_dir = larger_clap_music_like(tmp / "larger_clap_music_like")
        scorer = ClapScorer.from_pretrained(clap_dir, device="cpu")
        params = sum(p.numel() for p in scorer.model.parameters())
        print(f"CLAP (larger_clap_music architecture, random weights): {params / 1e6:.0f} M parameters, built and "
              f"loaded in {time.perf_counter() - t0:.1f} s")

        data = tmp / "data"
        data.mkdir()
        import soundfile as sf
        n_files = max(1, round(a.seconds / a.file_seconds))
        for i in range(n_files):
            sf.write(str(data / f"track_{i}.wav"), synthetic_music(a.seconds / n_files, a.rate, i), a.rate)
        warm = tmp / "warm.wav"
        sf.write(str(warm), synthetic_music(12.0, a.rate, 99), a.rate)
        audio = a.seconds

        t0 = time.perf_counter()
        clap_only = Tagger(scorer, librosa=False)
        print(f"one-off: the vocabulary's text embeddings {time.perf_counter() - t0:.2f} s")
        analyse_file(clap_only, warm)                     # first-call costs out of the timings
        with_lr = None
        if load_librosa()[0] is not None:
            with_lr = Tagger(scorer)
            t0 = time.perf_counter()
            analyse_file(with_lr, warm)
            print(f"one-off: librosa's first call (imports, JIT) and a 12 s warm-up file {time.perf_counter() - t0:.1f} s")
        else:
            print("librosa is not installed: tempo and key are not measured")

        rows = []
        files = sorted(data.glob("*.wav"))
        for label, tagger in (("CLAP tags", clap_only), ("tags + tempo + key", with_lr)):
            if tagger is None:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            for f in files:
                analyse_file(tagger, f)
            rows.append((label, time.perf_counter() - t0, time.process_time() - c0))
        t0, c0 = time.perf_counter(), time.process_time()
        result = prepare_folder(data, scorer, log=lambda m: None)
        rows.append((f"prepare_folder ({'with' if result.tempo_and_key else 'without'} tempo + key)",
                     time.perf_counter() - t0, time.process_time() - c0))
        line = json.loads(result.manifest_text.splitlines()[0])
        print(f"{n_files} files, {audio:.0f} s of audio at {a.rate} Hz stereo; e.g. caption: {line['caption']!r}")
        threads = torch.get_num_threads()
        print(f"{'pass':<36} {'seconds':>8} {'s / audio min':>14} {'x real time':>12} {'CPU s':>8} "
              f"{'x real time, CPU s / ' + str(threads):>24}")
        for label, secs, cpu in rows:
            print(f"{label:<36} {secs:8.2f} {secs / (audio / 60):14.2f} {audio / secs:12.1f} {cpu:8.2f} "
                  f"{audio / (cpu / threads):24.1f}")
        print(f"(the last column: the real-time factor if this process had its {threads} threads' cores to itself "
              f"and they scaled perfectly: audio seconds / (CPU seconds / threads))")
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; load average at the "
              f"end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
