"""Set metrics: the Frechet distance (FAD) between two sets of embeddings, set statistics files, FAD-inf,
and the clips of a set farthest from a reference set, in numpy (no scipy).

    from magnet import metrics
    d = metrics.frechet_distance(a, b)                    # a [N1, D], b [N2, D] (numpy or torch)
    ref = metrics.set_stats(ref_clips, "clap:...")         # clips: one [n_i, D] array per clip
    metrics.save_stats("musiccaps.npz", ref)
    d = metrics.fad(metrics.load_stats("musiccaps.npz"), metrics.set_stats(gen_clips, "clap:..."))
    inf = metrics.fad_inf(ref, gen_clips)                  # FadInf(score, slope, r2, sizes, fads)
    worst = metrics.farthest_clips(ref, gen_clips, names)  # [(name, distance)], farthest first

What the numbers are (the embeddings themselves come from `magnet.embeddings`):

- Frechet distance: d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), each set's mean and unbiased
  covariance (np.cov(rowvar=False), divisor N - 1), as pytorch-fid and fadtk compute it. In float64.
  The trace of sqrtm(S1 S2) is computed as the trace of sqrtm(R S2 R) with R = sqrtm(S1): S1 S2 and
  R S2 R have the same eigenvalues, and R S2 R is symmetric, so both square roots are symmetric
  eigendecompositions (`numpy.linalg.eigh`) - exact for positive semi-definite covariances, with real
  results. So there is no complex round-off to discard (pytorch-fid takes the real part and raises when
  the imaginary part of the diagonal exceeds 1e-3; here an eigenvalue below zero, which only round-off
  makes, is set to zero). As pytorch-fid and fadtk do when the square root is not finite, a decomposition
  that fails or gives a non-finite result is retried with 1e-6 added to both covariances' diagonals.
  Measured against scipy.linalg.sqrtm of S1 S2 in float64 (tests/test_metrics.py, widths 16 to 512): at
  most 2e-12 relative apart on well-conditioned sets, and at most 3e-8 where a set has no more rows than
  dimensions (singular covariances).
- Stats (`SetStats`): mean, covariance, `count` (embedding rows) and `clips`, and the `embedding`
  identity string (which model, protocol and loudness made the rows). Two sets are compared only under
  the same identity. Saved as .npz (plain arrays, read with allow_pickle=False).
- FAD-inf (fadtk, Gui et al. 2024): FAD is biased upwards by about c / N for N samples. GEN is cut
  into random subsets of `clips` (all rows of each chosen clip: a clip's frames are not independent
  samples, its clips are) of sizes from max(25, M / 10) to all M clips, FAD against all of REF is
  computed for each, a line is fitted to FAD against 1 / N, and its intercept (1 / N = 0) is FAD-inf.
  The subsets are drawn without replacement: their statistics are then unbiased for the whole set's,
  so the line extrapolates past the whole set to an infinite one (with replacement, as fadtk samples,
  the intercept is the whole set's own FAD, bias included). fadtk samples 25 sizes from 500 rows;
  here 20 sizes of a seeded generator (seed 0: the same number on every run). Computed only when
  both sets have at least `FAD_INF_MIN_CLIPS` (50) clips.
- Farthest clips: each GEN clip's mean squared Mahalanobis distance of its rows from REF's Gaussian,
  divided by the width D (about 1 for a row drawn from REF's own distribution; larger = farther). REF's
  covariance is shrunk towards its mean variance, S' = (1 - a) S + a tr(S)/D I with a = D / (D + count),
  so that it can be inverted when REF has no more rows than dimensions (then a >= 1/2) and is nearly the
  plain covariance for large sets.

Sets with fewer than 2 clips or 2 rows, rows of different widths or with NaN / infinite values, and
stats of different embeddings are refused with a MagnetError naming the fix.
"""
from __future__ import annotations

import math
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import MagnetError, first_line

EPS = 1e-6
"""Added to both covariances' diagonals when the square root fails (pytorch-fid's and fadtk's offset)."""
FAD_INF_MIN_CLIPS = 50
FAD_INF_STEPS = 20
FAD_INF_SMALLEST = 25
STATS_FORMAT = "magnet-fad-stats"
STATS_VERSION = 1


# ---------------------------------------------------------------------- the distance
def frechet_distance(a, b) -> float:
    """Frechet distance between two sets of embeddings a [N1, D] and b [N2, D] (numpy arrays or torch
    tensors; each needs at least 2 rows), from their means and unbiased covariances (see the module)."""
    a, b = _rows(a, "the first set"), _rows(b, "the second set")
    if a.shape[1] != b.shape[1]:
        raise MagnetError(f"the two sets have embeddings of different widths ({a.shape[1]} and {b.shape[1]}): "
                          f"compute both with the same embedding model.")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_stats(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)) for means [D] and covariances [D, D] (float64)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(_numpy(s), dtype=np.float64)) for s in (s1, s2))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise MagnetError(f"means {mu1.shape}, {mu2.shape} and covariances {s1.shape}, {s2.shape} do not fit "
                          f"together: give two means of one width D and two D x D covariances.")
    for name, x in (("mean", mu1), ("mean", mu2), ("covariance", s1), ("covariance", s2)):
        if not np.isfinite(x).all():
            raise MagnetError(f"a {name} holds NaN or infinite values: the embeddings it came from are damaged; "
                              f"compute them again.")
    diff = mu1 - mu2
    tr = trace_sqrt_product(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, eps: float = EPS) -> float:
    """tr sqrtm(s1 s2) for symmetric positive semi-definite s1, s2 (float64), as tr sqrtm(R s2 R) with
    R = sqrtm(s1); retried with `eps` on both diagonals when a decomposition fails or is not finite."""
    try:
        value = _trace_sqrt(s1, s2)
        if math.isfinite(value):
            return value
    except np.linalg.LinAlgError:
        pass
    offset = np.eye(s1.shape[0]) * eps
    try:
        value = _trace_sqrt(s1 + offset, s2 + offset)
    except np.linalg.LinAlgError:
        value = float("nan")
    if not math.isfinite(value):
        raise MagnetError("the covariances are too ill-conditioned for the Frechet distance even with a "
                          f"{eps:g} diagonal offset: use more clips (or check the embeddings for huge values).")
    return value


def _trace_sqrt(s1: np.ndarray, s2: np.ndarray) -> float:
    r = psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below zero,
    from round-off, taken as zero)."""
    w, v = np.linalg.eigh((s + s.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


# ---------------------------------------------------------------------- set statistics
@dataclass(frozen=True)
class SetStats:
    """A set's embedding statistics: `mean` [D], `cov` [D, D] (float64, divisor count - 1), `count`
    (embedding rows), `clips` (clips they came from) and `embedding` (the identity of what made them)."""
    mean: np.ndarray
    cov: np.ndarray
    count: int
    embedding: str
    clips: int = 0

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])


def set_stats(clips: Sequence, embedding: str, what: str = "the set") -> SetStats:
    """Statistics of a set given as one [n_i, D] array per clip (numpy or torch): the mean and the
    unbiased covariance of all rows of all clips, in float64 (two passes: mean, then centred products)."""
    clips = check_clips(clips, what)
    count = sum(c.shape[0] for c in clips)
    mean = sum(c.sum(0, dtype=np.float64) for c in clips) / count
    d = mean.shape[0]
    cov = np.zeros((d, d))
    for c in clips:
        x = c.astype(np.float64) - mean
        cov += x.T @ x
    cov /= count - 1
    return SetStats(mean, (cov + cov.T) * 0.5, count, str(embedding), len(clips))


def fad(ref: SetStats, gen: SetStats) -> float:
    """The Frechet distance between two sets' statistics, refused when their embeddings differ."""
    check_same_embedding(ref, gen)
    return frechet_distance_from_stats(ref.mean, ref.cov, gen.mean, gen.cov)


def check_same_embedding(ref: SetStats, gen: SetStats, ref_name: str = "REF", gen_name: str = "GEN") -> None:
    if ref.embedding != gen.embedding:
        raise MagnetError(f"{ref_name} and {gen_name} were embedded differently ({ref.embedding} and "
                          f"{gen.embedding}): a distance between them means nothing. Compute both with the same "
                          f"embedding model and loudness (make the statistics file again).")
    if ref.width != gen.width:
        raise MagnetError(f"{ref_name} and {gen_name} have embeddings of different widths ({ref.width} and "
                          f"{gen.width}): compute both with the same embedding model.")


def check_clips(clips: Sequence, what: str = "the set") -> list[np.ndarray]:
    """One [n_i, D] float array per clip, at least 2 clips and 2 rows, one width, all finite -> the arrays
    (numpy, original float dtype); else a MagnetError naming `what` and the fix."""
    if isinstance(clips, np.ndarray) or not isinstance(clips, (list, tuple)):
        raise MagnetError(f"{what} must be a list with one [rows, width] array of embeddings per clip.")
    if len(clips) < 2:
        raise MagnetError(f"{what} has {len(clips)} clip{'s' * (len(clips) != 1)}: a distance between sets needs "
                          f"at least 2 clips in each (a few hundred for a stable number). Add clips.")
    out = []
    for i, c in enumerate(clips):
        c = np.asarray(_numpy(c))
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1 or not np.issubdtype(c.dtype, np.floating):
            raise MagnetError(f"clip {i} of {what} has embeddings of shape {c.shape} ({c.dtype}); each clip's "
                              f"embeddings must be a float array [rows >= 1, width].")
        if out and c.shape[1] != out[0].shape[1]:
            raise MagnetError(f"clip {i} of {what} has embeddings of width {c.shape[1]} but clip 0 has "
                              f"{out[0].shape[1]}: compute every clip's embeddings with the same model.")
        if not np.isfinite(c).all():
            raise MagnetError(f"clip {i} of {what} has NaN or infinite embeddings: its audio is damaged or the "
                              f"embedding model misbehaved (e.g. in float16). Check that file, or compute the "
                              f"embeddings in float32.")
        out.append(c)
    if sum(c.shape[0] for c in out) < 2:
        raise MagnetError(f"{what} has fewer than 2 embedding rows: a covariance needs at least 2. Add clips.")
    return out


def _rows(x, what: str) -> np.ndarray:
    x = np.asarray(_numpy(x))
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise MagnetError(f"{what} must be a float array of embeddings [rows, width], got shape {x.shape} "
                          f"({x.dtype}).")
    if x.shape[0] < 2:
        raise MagnetError(f"{what} has {x.shape[0]} embedding row{'s' * (x.shape[0] != 1)}: a covariance needs at "
                          f"least 2. Add clips.")
    if not np.isfinite(x).all():
        raise MagnetError(f"{what} holds NaN or infinite embeddings: check the audio they came from, or compute "
                          f"them in float32.")
    return x.astype(np.float64)


def _numpy(x):
    """A torch tensor -> a numpy array (float16 / bfloat16 as float32); anything else as it is."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.numpy()
    return x


# ---------------------------------------------------------------------- stats files
def save_stats(path: str | Path, stats: SetStats) -> Path:
    """Write `stats` to a .npz file (plain arrays; written under a temporary name, then renamed)."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise MagnetError(f"statistics file {path}: give a name ending in .npz (e.g. {path.with_suffix('.npz').name}).")
    if path.is_dir():
        raise MagnetError(f"statistics file {path} is a folder: give a file name ending in .npz.")
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, format=np.array(STATS_FORMAT), version=np.array(STATS_VERSION),
                     mean=np.asarray(stats.mean, np.float64), cov=np.asarray(stats.cov, np.float64),
                     count=np.array(int(stats.count)), clips=np.array(int(stats.clips)),
                     embedding=np.array(str(stats.embedding)))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MagnetError(f"cannot write statistics file {path} ({first_line(e)}): choose a folder you can write "
                          f"to, with free space.") from None
    return path


def load_stats(path: str | Path, embedding: str | None = None) -> SetStats:
    """Read a statistics file written by `save_stats`; with `embedding`, refuse one made by another
    embedding. A damaged or foreign file is a MagnetError naming it."""
    path = Path(path)
    again = "make it again (evaluate --fad REF GEN --save-stats FILE, or metrics.save_stats)"
    if not path.is_file():
        raise MagnetError(f"statistics file not found: {path}. Check the path, or {again}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise MagnetError(f"{path} is not a readable statistics file ({first_line(e)}): it is damaged or not a "
                          f".npz; {again}.") from None
    need = ("format", "version", "mean", "cov", "count", "clips", "embedding")
    missing = [k for k in need if k not in arrays]
    if missing or str(arrays["format"]) != STATS_FORMAT:
        raise MagnetError(f"{path} is not a statistics file of this package (missing {', '.join(missing) or 'format'}"
                          f"): {again}.")
    if int(arrays["version"]) > STATS_VERSION:
        raise MagnetError(f"{path} was written by a newer version of this package (format {int(arrays['version'])}): "
                          f"update it, or {again}.")
    mean, cov = arrays["mean"], arrays["cov"]
    try:
        count, clips, ident = int(arrays["count"]), int(arrays["clips"]), str(arrays["embedding"])
    except (TypeError, ValueError):
        count = clips = -1
        ident = ""
    d = mean.shape[0] if mean.ndim == 1 else -1
    if (d < 1 or cov.shape != (d, d) or not np.issubdtype(mean.dtype, np.floating)
            or not np.issubdtype(cov.dtype, np.floating) or count < 2 or clips < 2 or not ident):
        raise MagnetError(f"{path} is damaged (mean {mean.shape}, covariance {cov.shape}, {count} rows, {clips} clips): "
                          f"{again}.")
    if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        raise MagnetError(f"{path} holds NaN or infinite statistics: {again}.")
    stats = SetStats(mean.astype(np.float64), cov.astype(np.float64), count, ident, clips)
    if embedding is not None and ident != embedding:
        raise MagnetError(f"{path} holds statistics of another embedding ({ident}, not {embedding}): use the "
                          f"same embedding model and loudness as when it was made, or {again}.")
    return stats


# ---------------------------------------------------------------------- FAD-inf
@dataclass(frozen=True)
class FadInf:
    """FAD-inf: `score` (the intercept), `slope` and `r2` of the line FAD = score + slope / N, and the
    subset sizes N (clips) with their FADs."""
    score: float
    slope: float
    r2: float
    sizes: list
    fads: list


def fad_inf(ref: SetStats, clips: Sequence, *, embedding: str | None = None, steps: int = FAD_INF_STEPS,
            seed: int = 0, what: str = "GEN") -> FadInf:
    """FAD-inf of GEN (one [n_i, D] array per clip) against REF's statistics (see the module). Needs at
    least FAD_INF_MIN_CLIPS clips in both sets."""
    clips = check_clips(clips, what)
    m = len(clips)
    if m < FAD_INF_MIN_CLIPS or ref.clips < FAD_INF_MIN_CLIPS:
        raise MagnetError(f"FAD-inf needs at least {FAD_INF_MIN_CLIPS} clips in each set (REF has {ref.clips}, "
                          f"{what} {m}): its line through FAD against 1/N needs subsets of many sizes. Use more "
                          f"clips, or read the plain FAD.")
    if clips[0].shape[1] != ref.width:
        raise MagnetError(f"{what} has embeddings of width {clips[0].shape[1]} but REF {ref.width}: compute both "
                          f"with the same embedding model.")
    smallest = min(m, max(FAD_INF_SMALLEST, m // 10))
    sizes = [int(n) for n in np.unique(np.linspace(smallest, m, steps).round().astype(int))]
    rng = np.random.default_rng(seed)
    ident = embedding if embedding is not None else ref.embedding
    fads = []
    for n in sizes:
        pick = np.sort(rng.choice(m, size=n, replace=False))
        fads.append(fad(ref, set_stats([clips[i] for i in pick], ident, what)))
    x = 1.0 / np.asarray(sizes, dtype=np.float64)
    y = np.asarray(fads)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / spread if spread > 0 else 1.0
    return FadInf(float(intercept), float(slope), r2, sizes, [float(v) for v in fads])


# ---------------------------------------------------------------------- farthest clips
def farthest_clips(ref: SetStats, clips: Sequence, names: Sequence[str], k: int = 5,
                   what: str = "GEN") -> list[tuple[str, float]]:
    """The `k` clips farthest from REF's distribution: [(name, distance)], farthest first (ties: the
    earlier clip first). distance = the clip's mean squared Mahalanobis distance from REF's (shrunk)
    Gaussian per dimension (see the module)."""
    clips = check_clips(clips, what)
    if len(names) != len(clips):
        raise MagnetError(f"{len(clips)} clips but {len(names)} names: give one name per clip.")
    d = ref.width
    if clips[0].shape[1] != d:
        raise MagnetError(f"{what} has embeddings of width {clips[0].shape[1]} but REF {d}: compute both with the "
                          f"same embedding model.")
    a = d / (d + ref.count)
    scale = float(np.trace(ref.cov)) / d
    shrunk = (1.0 - a) * ref.cov + a * max(scale, np.finfo(np.float64).tiny) * np.eye(d)
    try:
        chol = np.linalg.cholesky(shrunk)
    except np.linalg.LinAlgError:
        chol = np.linalg.cholesky(shrunk + EPS * max(scale, 1.0) * np.eye(d))
    whiten = np.linalg.inv(chol)            # z = L^-1 (x - mu): |z|^2 = (x - mu)^T S'^-1 (x - mu)
    dist = []
    for c in clips:
        z = (c.astype(np.float64) - ref.mean) @ whiten.T
        dist.append(float((z * z).sum(1).mean()) / d)
    order = sorted(range(len(clips)), key=lambda i: (-dist[i], i))
    return [(str(names[i]), dist[i]) for i in order[:max(0, int(k))]]
