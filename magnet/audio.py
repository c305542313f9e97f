"""Audio utilities: validation, resampling, channel conversion, length fitting, loudness, file I/O.

Waveforms are float tensors `[C, S]` (one clip) or `[B, C, S]` (a batch), values nominally in
[-1, 1]. No torchaudio: resampling is julius' `resample_frac`, files go through soundfile.
"""
from __future__ import annotations

import math
import numbers
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from .deps import require
from .errors import MagnetError, first_line


def check_waveform(wav, what: str = "waveform") -> torch.Tensor:
    """Check that `wav` is a finite, non-empty float tensor [C, S] or [B, C, S]; return it.

    Raises MagnetError naming `what` and the fix.
    """
    if not isinstance(wav, torch.Tensor):
        raise MagnetError(f"{what} must be a torch tensor [channels, samples] or [batch, channels, samples], "
                          f"got {type(wav).__name__}. Pass audio as a tensor (e.g. torch.from_numpy(array)).")
    if not wav.is_floating_point():
        raise MagnetError(f"{what} has integer samples ({wav.dtype}); audio must be float in [-1, 1]. "
                          f"Convert it, e.g. wav.float() / 32768 for 16-bit PCM.")
    if wav.dim() not in (2, 3):
        raise MagnetError(f"{what} has shape {tuple(wav.shape)}; expected [channels, samples] or "
                          f"[batch, channels, samples]. Add or remove dimensions (e.g. wav[None] for mono).")
    if wav.numel() == 0:
        raise MagnetError(f"{what} is empty (shape {tuple(wav.shape)}). Give audio with at least one "
                          f"channel and one sample.")
    if not bool(torch.isfinite(wav).all()):
        raise MagnetError(f"{what} contains NaN or infinite samples. Check the audio source (or replace "
                          f"them, e.g. torch.nan_to_num(wav)).")
    return wav


def resample(wav: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """Resample along the last dimension (julius.resample_frac, a windowed-sinc filter); identity when equal."""
    from_sr, to_sr = _rate(from_sr, "from_sr"), _rate(to_sr, "to_sr")
    _check_tensor(wav, "audio to resample", min_dim=1)
    if from_sr == to_sr:
        return wav
    julius = require("julius")

    return _allocating(lambda: julius.resample_frac(wav, from_sr, to_sr),
                       f"resampling {wav.shape[-1]} samples from {from_sr} Hz to {to_sr} Hz",
                       "Resample shorter audio, or between common rates (e.g. 48000 -> 32000).")


def convert_audio_channels(wav: torch.Tensor, channels: int) -> torch.Tensor:
    """[..., C, S] -> [..., channels, S]: downmix to mono by mean, mono -> N by repeat, or keep the first N."""
    _check_tensor(wav, "audio", min_dim=2)
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)):
        raise MagnetError(f"channels must be a whole number (1 = mono, 2 = stereo), got {channels!r}.")
    src = wav.shape[-2]
    if channels < 1:
        raise MagnetError(f"Cannot convert audio to {channels} channels; use 1 (mono) or 2 (stereo).")
    if src == channels:
        return wav
    if channels == 1:
        return wav.mean(dim=-2, keepdim=True)
    if src == 1:
        return wav.repeat_interleave(channels, dim=-2)
    if src > channels:
        return wav[..., :channels, :]
    raise MagnetError(f"The audio has {src} channels but {channels} are needed and it is not mono. "
                      f"Give mono audio or audio with at least {channels} channels.")


def convert_audio(wav: torch.Tensor, from_sr: int, to_sr: int, to_channels: int) -> torch.Tensor:
    """Convert [C, S] or [B, C, S] audio to `to_channels` channels at `to_sr` (channels first, then rate)."""
    check_waveform(wav, "audio")
    return resample(convert_audio_channels(wav, to_channels), from_sr, to_sr)


def seconds_to_samples(seconds, sample_rate: int) -> int:
    """`round(seconds * sample_rate)`: how many samples a duration of `seconds` is at `sample_rate`
    (e.g. a video's duration -> the exact audio length that fits it)."""
    sample_rate = _rate(sample_rate, "sample_rate")
    try:
        ok = not isinstance(seconds, bool) and math.isfinite(float(seconds)) and float(seconds) >= 0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise MagnetError(f"duration {seconds!r} must be a finite number of seconds >= 0.")
    samples = float(seconds) * sample_rate
    if not samples < _MAX_SAMPLES:
        raise MagnetError(f"duration {float(seconds):g} s is too long to hold as audio at {sample_rate} Hz. "
                          f"Give a duration in seconds (e.g. a video's length), not in samples or frames.")
    return int(round(samples))


def fit_length(wav: torch.Tensor, samples: int) -> torch.Tensor:
    """Make [C, S] or [B, C, S] audio exactly `samples` long: trim the end, or pad it with silence.

    Returns a new tensor (never a view of `wav`). With `seconds_to_samples` this fits generated audio
    to a video: `fit_length(wav, seconds_to_samples(video_seconds, sample_rate))`.
    """
    check_waveform(wav, "audio to fit")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise MagnetError(f"fit_length needs a whole number of samples >= 1, got {samples!r} "
                          f"(use seconds_to_samples(seconds, sample_rate) for a duration).")
    if samples >= _MAX_SAMPLES:
        raise MagnetError(f"fit_length to {samples} samples is far too long. Give the length in samples "
                          f"(seconds_to_samples(seconds, sample_rate)), not a larger unit.")
    have = wav.shape[-1]
    if have >= samples:
        return wav[..., :samples].clone()
    return _allocating(lambda: torch.nn.functional.pad(wav, (0, int(samples) - have)),
                       f"padding the audio to {int(samples)} samples", "Ask for a shorter length.")


def normalize_loudness(wav: torch.Tensor, sample_rate: int, target_lufs: float = -14.0,
                       peak: float = 1.0) -> torch.Tensor:
    """Scale each batch item to `target_lufs` integrated loudness (ITU-R BS.1770, via pyloudnorm).

    Takes [B, C, S] (or [C, S]) and returns a new tensor of the same shape. Peak guard: if the gain
    would push an item's peak above `peak` (1.0), the gain is lowered so the peak is exactly `peak`;
    that item then ends up quieter than the target rather than clipped. Items whose loudness cannot
    be measured (silent, below the -70 LUFS gate, or shorter than the 400 ms measuring block) are
    returned unchanged.
    """
    pyloudnorm = require("pyloudnorm")

    check_waveform(wav, "audio to normalize")
    sample_rate = _rate(sample_rate, "sample_rate")
    target_lufs = _lufs(target_lufs)
    if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not peak > 0:
        raise MagnetError(f"peak {peak!r} must be a number > 0 (1.0 = full scale; float('inf') = no peak guard).")
    batch = wav if wav.dim() == 3 else wav[None]
    meter = pyloudnorm.Meter(sample_rate)
    out = []
    for item in batch:
        data = item.detach().to("cpu", torch.float64).numpy().T  # [S, C] as pyloudnorm wants
        gain = 1.0
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loudness = meter.integrated_loudness(data)
            except ValueError:  # shorter than one measuring block
                loudness = float("nan")
        if np.isfinite(loudness):
            gain = 10.0 ** ((target_lufs - loudness) / 20.0)
            item_peak = float(np.abs(data).max())
            if item_peak * gain > peak:
                gain = peak / item_peak
        out.append(item * gain if gain != 1.0 else item.clone())
    result = torch.stack(out)
    return result if wav.dim() == 3 else result[0]


def write_wav(path: str | Path, wav: torch.Tensor, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write [C, S] or [1, C, S] audio to `path` (format from the extension: .wav, .flac, .ogg).

    Samples are clipped to [-1, 1]. The file is written under a temporary name in the same folder
    and renamed into place, so a failed write leaves no partial file.
    """
    sf = require("soundfile")

    path = _path(path, "output file", "a file name ending in .wav or .flac")
    check_waveform(wav, "audio to write")
    if wav.dim() == 3:
        if wav.shape[0] != 1:
            raise MagnetError(f"write_wav writes one clip, got a batch of {wav.shape[0]}. Write each item "
                              f"(wav[i]) to its own file.")
        wav = wav[0]
    if path.is_dir():
        raise MagnetError(f"Cannot write {path}: it is a folder. Give a file name, e.g. {path / 'out.wav'}.")
    sample_rate = _rate(sample_rate, "sample_rate")
    if sample_rate > _MAX_FILE_RATE:
        raise MagnetError(f"sample_rate {sample_rate} Hz is too high for an audio file (at most "
                          f"{_MAX_FILE_RATE} Hz). Give the rate in Hz, e.g. 32000.")
    data = wav.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).numpy().T  # [S, C]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MagnetError(f"Cannot write {path} ({e}). Choose a folder you can write to.") from None
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")  # same extension: same format
    try:
        sf.write(tmp, data, sample_rate, subtype=subtype)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # libsndfile's "System error" (code 2) is the operating system refusing: no permission, no space;
        # soundfile asserts that every frame was written, so a disk filling up mid-write is an AssertionError
        if isinstance(e, (OSError, AssertionError)) or (isinstance(e, sf.LibsndfileError) and e.code == 2):
            reason = e if str(e) else "the disk is full"
            raise MagnetError(f"Cannot write {path} ({reason}). Choose a folder you can write to, with enough "
                              f"free space.") from None
        if isinstance(e, (sf.LibsndfileError, TypeError, ValueError, RuntimeError)):
            raise MagnetError(f"Cannot write {path} as {subtype} ({e}). Use a .wav or .flac file name "
                              f"and a subtype such as PCM_16, PCM_24 or FLOAT.") from None
        raise
    return path


def wav_bytes(wav: torch.Tensor, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """[C, S] audio as the bytes of a WAV file (samples clipped to [-1, 1])."""
    import io
    sf = require("soundfile")
    check_waveform(wav, "audio to encode")
    buf = io.BytesIO()
    sf.write(buf, wav.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).numpy().T, _rate(sample_rate, "sample_rate"),
             subtype=subtype, format="WAV")
    return buf.getvalue()


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read an audio file (WAV, FLAC, OGG, MP3, ...) -> (float32 [C, S], sample_rate)."""
    sf = require("soundfile")

    path = _path(path, "audio file", "the path of an audio file")
    if not path.is_file():
        raise MagnetError(f"Audio file not found: {path}. Check the path." if not path.exists() else
                          f"{path} is not a file. Give the path of an audio file.")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except MemoryError:
        raise MagnetError(f"Not enough memory to read {path}. Read a shorter file (or cut this one).") from None
    except Exception as e:      # whatever libsndfile or soundfile meets in a damaged file
        raise MagnetError(f"Cannot read audio file {path} ({first_line(e) or type(e).__name__ or 'truncated'}). It "
                          f"is damaged or in a format libsndfile does not read: convert it to WAV or FLAC.") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise MagnetError(f"Audio file {path} holds no samples. Give a file with audio in it.")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


_MAX_SAMPLES = 2 ** 40        # ~1 year at 32 kHz: beyond it a "duration" is a unit mistake, and no buffer fits
_MAX_FILE_RATE = 2 ** 31 - 1  # libsndfile stores the rate as a C int
LUFS_RANGE = (-70.0, 0.0)     # pyloudnorm's gate .. full scale


def _lufs(value, name: str = "target_lufs"):
    """A loudness target: a finite real number of LUFS within LUFS_RANGE (returned as given)."""
    lo, hi = LUFS_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo <= value <= hi:  # NaN fails too
        raise MagnetError(f"{name} {value!r} must be a loudness in LUFS between {lo:g} and {hi:g} "
                          f"(e.g. -14 for streaming, -23 for broadcast).")
    return value


def _path(value, what: str, fix: str) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise MagnetError(f"{what} {value!r} is not a path: give {fix}.")


def _check_tensor(wav, what: str, min_dim: int) -> None:
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point() or wav.dim() < min_dim or wav.numel() == 0:
        shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
        raise MagnetError(f"{what} must be a non-empty float tensor [..., channels, samples], got {shape}"
                          f"{' ' + str(wav.dtype) if isinstance(wav, torch.Tensor) else ''}. Pass audio as a "
                          f"float tensor (e.g. torch.from_numpy(array).float()).")


def _allocating(fn, doing: str, fix: str):
    """Run fn; an allocation failure (MemoryError, torch's out-of-memory RuntimeError) -> MagnetError."""
    try:
        return fn()
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_out_of_memory(e):
            raise
        raise MagnetError(f"Not enough memory for {doing}. {fix}") from None


def is_out_of_memory(e: BaseException) -> bool:
    """True for MemoryError and torch's out-of-memory errors (CUDA, MPS, the CPU allocator)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate"))


def _rate(value, name: str) -> int:
    try:
        ok = not isinstance(value, bool) and float(value).is_integer() and value > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MagnetError(f"{name} must be a positive whole number of Hz, got {value!r}.")
    return int(value)
