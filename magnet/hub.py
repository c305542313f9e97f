"""Downloads of the official models from the Hugging Face hub, and the models folder the command line keeps
them in. What downloads: the CLI's `download` command, its `generate`/`vary`/`train` for an official model that
is missing (unless `--no-download`), `from_pretrained(..., download=True)`, and the ComfyUI loaders' `download`
widget (`if missing`). Only the official repositories below are ever contacted, never a name or URL from
elsewhere.

The command line's models folder (`models_dirs`): `--models-dir DIR` (DIR/magnet, DIR/text_encoders,
DIR/clap, as in ComfyUI/models), else $MAGNET_MODELS_DIR (the releases folder, the one the nodes read outside
ComfyUI; T5s and CLAPs go to $MAGNET_TEXT_ENCODERS_DIR / $MAGNET_CLAP_DIR, else beside it), else the per-user
cache folder (`user_models_dir`).

A download goes into a hidden `.<name>.partial` folder beside its target and is renamed to the target only
when every file is there and matches the size and sha256 the hub announces (`model_info(files_metadata=True)`;
where the hub tells no sizes, loading the model is the check), so an interrupted or damaged download never
leaves a folder that looks like a model; the next attempt keeps the files already complete (and matching) and
resumes the one that was interrupted (huggingface_hub resumes its `.incomplete` files in a local folder). A
file that does not match is deleted and downloaded once more, then refused. Processes and threads downloading
the same folder take turns on a lock file (`.<name>.lock` beside it): the one that waited uses what the other
brought. Offline, or without huggingface_hub, it fails with the files, the
folder to put them in and the command that fetches them."""
from __future__ import annotations

import contextvars
import errno
import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable, NamedTuple

from .checkpoints import CODEC_FILE, OFFICIAL
from .errors import MagnetError, first_line

log = logging.getLogger(__name__)

RELEASES = ["facebook/magnet-small-10secs", "facebook/magnet-medium-10secs", "facebook/magnet-small-30secs",
            "facebook/magnet-medium-30secs", "facebook/audio-magnet-small", "facebook/audio-magnet-medium",
            "facebook/musicgen-small", "facebook/musicgen-medium"]
TEXT_ENCODERS = {"t5-base": "google-t5/t5-base", "t5-large": "google-t5/t5-large"}
CODECS = ["facebook/encodec_32khz"]
CLAPS = {"larger_clap_music": "laion/larger_clap_music"}
# the hub branch to read: larger_clap_music's main branch has only pickled weights; refs/pr/1 adds model.safetensors
REVISIONS = {"laion/larger_clap_music": "refs/pr/1"}
# what each kind needs, then what it uses when the repository has it (no TensorFlow/Flax/pickle duplicates)
FILES = {
    "release": (tuple(OFFICIAL.files), ()),             # releases come in the official format
    "text_encoder": (("config.json", "model.safetensors", "spiece.model"),
                     ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
    "codec": (("config.json", "model.safetensors"), ("preprocessor_config.json",)),
    "clap": (("config.json", "model.safetensors"),
             ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt")),
}
PATTERNS = {kind: [*required, *optional] for kind, (required, optional) in FILES.items()}
# the models/ subfolder each kind lives in (the loaders' lists and ComfyUI's folder names)
FOLDERS = {"release": "magnet", "codec": "magnet", "text_encoder": "text_encoders", "clap": "clap"}
DOWNLOAD_CHOICES = ["if missing", "never"]
PARTIAL = ".{}.partial"
LOCK = ".{}.lock"
Progress = Callable[[int, int], None]


def _short(repo: str) -> str:
    return repo.split("/")[-1]


def resolve_name(name: str) -> tuple[str, str, str]:
    """A short name ('magnet-small-10secs', 't5-base') or a repo id -> (repo id, kind, folder name)."""
    short = str(name).rstrip("/").split("/")[-1]
    if short in TEXT_ENCODERS:
        return TEXT_ENCODERS[short], "text_encoder", short
    if short in CLAPS:
        return CLAPS[short], "clap", short
    for repo in CODECS:
        if short == _short(repo):
            return repo, "codec", short
    for repo in RELEASES:
        if short == _short(repo):
            return repo, "release", short
    known = [_short(r) for r in RELEASES] + list(TEXT_ENCODERS) + [_short(c) for c in CODECS] + list(CLAPS)
    raise MagnetError(f"unknown model {name!r}: choose one of {', '.join(known)}.")


def is_official(name: str, kind: str | None = None) -> bool:
    try:
        found = resolve_name(name)[1]
    except MagnetError:
        return False
    return kind is None or found == kind


def official_names(folder: str, release_kind: str | None = None) -> list[str]:
    """The official models a loader lists for models/<folder>: the releases of `release_kind` ('magnet' or
    'musicgen') for 'magnet', the T5s for 'text_encoders', the CLAP for 'clap'."""
    if folder == "magnet":
        names = [_short(r) for r in RELEASES]
        return [n for n in names if n.startswith("musicgen-") == (release_kind == "musicgen")]
    if folder == "text_encoders":
        return list(TEXT_ENCODERS)
    if folder == "clap":
        return list(CLAPS)
    return []


def release_text_encoder(name: str) -> str | None:
    """The T5 an official release is conditioned on (t5-large for audio-magnet, else t5-base); None if unknown."""
    if not is_official(name, "release"):
        return None
    return "t5-large" if Path(name).name.startswith("audio-magnet") else "t5-base"


def default_folder(kind: str, short: str, models_dir: str | Path = "models") -> Path:
    return Path(models_dir) / FOLDERS[kind] / short


DEFAULT_RELEASE = "magnet-small-10secs"          # what the command line generates with when given no --model
MODELS_DIR_ENV = "MAGNET_MODELS_DIR"
KIND_ENV = {"release": MODELS_DIR_ENV, "codec": MODELS_DIR_ENV, "text_encoder": "MAGNET_TEXT_ENCODERS_DIR",
            "clap": "MAGNET_CLAP_DIR"}


def user_models_dir() -> Path:
    """The per-user models folder: $XDG_CACHE_HOME/magnet/models (default ~/.cache/magnet/models) on Linux and
    other Unix systems, ~/Library/Caches/magnet/models on macOS, %LOCALAPPDATA%\\magnet\\models on Windows."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "magnet" / "models"


def _env_dirs(var: str) -> list[Path]:
    return [Path(p) for p in os.environ.get(var, "").split(os.pathsep) if p.strip()]


def models_dirs(kind: str, models_dir: str | Path | None = None) -> list[Path]:
    """The folders the command line looks for models of `kind` in, the first the one it downloads into:
    `models_dir`/magnet (text_encoders, clap) when given; else the kind's variable ($MAGNET_MODELS_DIR for
    releases and codecs, $MAGNET_TEXT_ENCODERS_DIR, $MAGNET_CLAP_DIR: os.pathsep-separated lists, as the
    nodes read them); else, when $MAGNET_MODELS_DIR is set, ../text_encoders (../clap) beside it if it is
    named `magnet` (ComfyUI's layout), else that folder itself; else `user_models_dir()`/magnet (...)."""
    return _models_dirs(kind, models_dir)[0]


def models_dir_source(kind: str, models_dir: str | Path | None = None) -> str:
    """How `models_dirs(kind, models_dir)` was chosen, for messages: '--models-dir', '$MAGNET_MODELS_DIR', ...
    or 'the per-user models folder'."""
    return _models_dirs(kind, models_dir)[1]


def _models_dirs(kind: str, models_dir) -> tuple[list[Path], str]:
    if models_dir is not None:
        return [Path(models_dir) / FOLDERS[kind]], "--models-dir"
    own = _env_dirs(KIND_ENV[kind])
    if own:
        return own, f"${KIND_ENV[kind]}"
    releases = _env_dirs(MODELS_DIR_ENV)
    if releases:
        first = releases[0]
        return [first.parent / FOLDERS[kind] if first.name == FOLDERS["release"] else first], f"${MODELS_DIR_ENV}"
    return [user_models_dir() / FOLDERS[kind]], "the per-user models folder"


def command(name: str, dest: str | Path) -> str:
    return f"python -m magnet download {name} --dir {dest}"


def by_hand(name: str, dest: str | Path) -> str:
    """How to get a model without this process downloading it: the CLI command, or the files by hand."""
    repo, kind, _ = resolve_name(name)
    required, _ = FILES[kind]
    rev = f" (branch {REVISIONS[repo]})" if repo in REVISIONS else ""
    return (f"Get it with `{command(name, dest)}` on a machine with internet, or put the files of "
            f"https://huggingface.co/{repo}{rev} ({', '.join(required)}) in {dest}.")


def missing(name: str, dest: str | Path, reason: str) -> MagnetError:
    """The error for an official model that is not on disk and was not downloaded (offline, or `never`)."""
    return MagnetError(f"{name} is not in {Path(dest).parent} {reason}. {by_hand(name, dest)}")


def _is_connection_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "Timeout", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                         "TimeoutError", "ConnectError", "ProxyError"})


def _is_absent(e: BaseException) -> bool:
    """The hub says the file is not in the repository (an optional file some repositories lack)."""
    return type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError")


class Expected(NamedTuple):
    """What the hub announces for one file: its size in bytes and, for a large (LFS) file, its sha256; either is
    None when the hub does not tell it."""
    size: int | None
    sha256: str | None


def _expected(hf, repo: str, revision: str | None) -> dict[str, Expected] | None:
    """{file: Expected} of the repository, or None when the hub does not tell the files (an older
    huggingface_hub, an HTTP error: the download then goes ahead unchecked and loading the model is the check).
    An unreachable hub raises at once (one wait for the user, not one per file)."""
    try:
        info = hf.HfApi().model_info(repo, revision=revision, files_metadata=True)
        out = {}
        for s in info.siblings or []:
            lfs = getattr(s, "lfs", None)
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            size = getattr(s, "size", None)
            out[s.rfilename] = Expected(int(size) if size is not None else None,
                                        str(sha).lower() if sha else None)
        return out
    except Exception as e:
        if _is_connection_error(e):
            raise
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(path: Path, want: Expected) -> str | None:
    """How the file differs from what the hub announces ('... bytes where the hub announces ...'), or None
    when it matches (or the hub announced nothing to compare with)."""
    got = path.stat().st_size
    if want.size is not None and got != want.size:
        return f"{got:,} bytes where the hub announces {want.size:,}"
    if want.sha256 is not None:
        digest = _sha256(path)
        if digest != want.sha256:
            return f"sha256 {digest} where the hub announces {want.sha256}"
    return None


def _discard(partial: Path, f: str) -> None:
    """Delete a file that failed its check, with huggingface_hub's notes about it (so it is fetched anew)."""
    notes = partial / ".cache" / "huggingface" / "download"
    for p in (partial / f, notes / f"{f}.metadata"):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _old_hub_kwargs(hf) -> dict:
    """huggingface_hub before 0.23 (as old transformers releases bring): real files in the local folder rather
    than links into its cache, and resuming switched on (both are how later releases always work)."""
    import inspect
    try:
        params = inspect.signature(hf.hf_hub_download).parameters
    except (TypeError, ValueError):
        return {}
    out = {}
    if "local_dir_use_symlinks" in params:
        out["local_dir_use_symlinks"] = False
    if "resume_download" in params and params["resume_download"].default is False:
        out["resume_download"] = True
    return out


def _megabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class _Watch:
    """Reports the bytes of the file being downloaded (huggingface_hub's `.incomplete` file in the partial
    folder) every half second, from a thread; a failing `progress` is ignored there."""

    def __init__(self, folder: Path, progress: Progress | None, done: int, total: int):
        self.folder, self.progress, self.done, self.total = folder, progress, done, total
        self.stop = threading.Event()
        # run in a copy of the caller's context (ComfyUI keeps the executing node there, for its progress bar)
        self.thread = (threading.Thread(target=contextvars.copy_context().run, args=(self._run,), daemon=True)
                       if progress is not None and total else None)

    def _run(self):
        while not self.stop.wait(0.5):
            try:
                now = sum(p.stat().st_size for p in self.folder.rglob("*.incomplete"))
                self.progress(min(self.done + now, self.total), self.total)
            except Exception:
                pass

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


class _FolderLock:
    """An exclusive lock that processes and threads downloading the same model share: a hidden `.<name>.lock`
    file beside the model folder, locked with flock (Unix) or msvcrt.locking (Windows); the kernel lets go of it
    when its holder dies. The holder deletes the file when done; a waiter that then wakes holding the deleted
    file opens the path again, so two never hold it at once. Where the file system cannot lock (some network
    shares) the download goes ahead alone, with a log line."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def acquire(self, blocking: bool = True) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not _lock_fd(fd, blocking):
                    os.close(fd)
                    return False
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                log.warning("cannot lock %s (%s): downloading without waiting for other downloads of it",
                            self.path, e.strerror or e)
                self.fd = fd
                return True
            except BaseException:
                os.close(fd)
                raise
            if same:
                self.fd = fd
                return True
            os.close(fd)                                    # the holder deleted it meanwhile: lock the new one

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)            # before unlocking, so a waiter that wakes finds it gone
        except OSError:
            pass                            # Windows: a waiter has it open; it stays, empty and hidden
        try:
            _unlock_fd(fd)
        except OSError:
            pass
        os.close(fd)


if sys.platform == "win32":
    import msvcrt
    import time

    def _lock_fd(fd: int, blocking: bool) -> bool:
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except PermissionError:                  # held by another
                if not blocking:
                    return False
                time.sleep(0.2)

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock_fd(fd: int, blocking: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def download(name: str, dest: str | Path | None = None, models_dir: str | Path = "models", *,
             progress: Progress | None = None, echo: Callable[[str], None] | None = None) -> Path:
    """Download an official release, T5, codec or CLAP into `dest` (default models/magnet/<name>,
    models/text_encoders/<name> or models/clap/<name>, the folders ComfyUI and the loaders look in).

    The files go into `.<name>.partial` beside `dest` first, each checked against the size and sha256 the hub
    announces, and move to `dest` when all are there and pass; a download interrupted before keeps that folder
    and the next call resumes it. Another process or thread downloading the same folder is waited for (the lock
    file `.<name>.lock` beside it), and what it brought is used. `progress(done_bytes, total_bytes)` is called
    as the bytes arrive (when the hub tells the sizes); `echo` receives the lines to show the user (default: the
    log)."""
    echo = echo or log.info
    repo, kind, short = resolve_name(name)
    dest = Path(dest) if dest is not None else default_folder(kind, short, models_dir)
    try:
        import huggingface_hub as hf
    except ImportError:
        raise missing(short, dest, "and downloading needs huggingface_hub (`pip install huggingface_hub`)") from None
    existed = dest.exists()
    lock = _FolderLock(dest.parent / LOCK.format(dest.name))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not lock.acquire(blocking=False):
            echo(f"waiting for another download of {short} into {dest} to finish")
            lock.acquire()
    except OSError as e:
        raise _unwritable(dest, e) from None
    try:
        if dest.exists() and not existed:
            echo(f"{short} arrived in {dest} from another download")
            return dest
        return _download(hf, repo, kind, short, dest, progress, echo)
    finally:
        lock.release()


def _unwritable(dest: Path, e: OSError) -> MagnetError:
    return MagnetError(f"cannot write into {dest.parent} ({e.strerror or e}): choose a folder you can write "
                       f"to (--dir / --models-dir, or the models folder's permissions).")


def _download(hf, repo: str, kind: str, short: str, dest: Path, progress: Progress | None,
              echo: Callable[[str], None]) -> Path:
    """`download` once it holds the lock."""
    partial = dest.parent / PARTIAL.format(dest.name)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        probe = partial / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise _unwritable(dest, e) from None
    revision = REVISIONS.get(repo)
    required, optional = FILES[kind]
    try:
        expected = _expected(hf, repo, revision)
    except Exception as e:
        raise _download_error(e, short, repo, dest) from None
    if expected is not None:
        lacking = [f for f in required if f not in expected]
        if lacking:
            raise MagnetError(f"{repo} on the hub lacks {', '.join(lacking)}, which {short} needs. "
                              f"{by_hand(short, dest)}")
        files = [f for f in (*required, *optional) if f in expected]
        total = sum(expected[f].size or 0 for f in files)
        echo(f"downloading {short} from https://huggingface.co/{repo} ({_megabytes(total)}: {', '.join(files)}) "
             f"into {dest}")
        unsized = [f for f in files if expected[f].size is None]
        if unsized:
            echo(f"  the hub does not tell the size of {', '.join(unsized)}: loading the model checks "
                 f"{'it' if len(unsized) == 1 else 'them'}")
    else:
        files, total = [*required, *optional], 0
        echo(f"downloading {short} from https://huggingface.co/{repo} (size unknown) into {dest}")
        echo("  the hub does not tell the files' sizes: they are not checked here, loading the model checks them")
    done = 0
    for f in files:
        want = expected.get(f) if expected is not None else None
        if (partial / f).is_file():              # from an earlier, interrupted attempt: kept if it matches
            bad = _mismatch(partial / f, want) if want is not None else None
            if bad is None:
                done += (partial / f).stat().st_size
                echo(f"  {f}: already downloaded")
                continue
            echo(f"  {f}: the copy kept from an earlier attempt has {bad}: downloading it again")
            _discard(partial, f)
        for again in (False, True):
            try:
                with _Watch(partial, progress, done, total):
                    hf.hf_hub_download(repo, f, revision=revision, local_dir=str(partial),
                                       **({"force_download": True} if again else {}), **_old_hub_kwargs(hf))
            except Exception as e:
                if f in optional and expected is None and _is_absent(e):
                    break
                raise _download_error(e, short, repo, dest) from None
            bad = _mismatch(partial / f, want) if want is not None and (partial / f).is_file() else None
            if bad is None:
                break
            _discard(partial, f)
            if not again:
                echo(f"  {f}: the download has {bad}: downloading it again")
                continue
            raise MagnetError(
                f"{f} of {short} from https://huggingface.co/{repo} came twice with {bad}, so it was deleted and "
                f"{short} was not put in {dest}. Something between here and the hub alters or cuts the file (a "
                f"proxy, a full disk, a flaky connection): try again later or on another network; the files that "
                f"passed are kept in {partial} for the next attempt. Or {_lower(by_hand(short, dest))}")
        done += (partial / f).stat().st_size if (partial / f).is_file() else 0
        if progress is not None:
            progress(done, max(total, done))
    shutil.rmtree(partial / ".cache", ignore_errors=True)          # huggingface_hub's resume bookkeeping
    _move_into_place(partial, dest)
    echo(f"downloaded {short} into {dest}")
    return dest


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _download_error(e: BaseException, short: str, repo: str, dest: Path) -> MagnetError:
    if isinstance(e, OSError) and getattr(e, "errno", None) in (errno.ENOSPC, errno.EACCES, errno.EROFS,
                                                                 errno.EDQUOT):
        return MagnetError(f"could not write {repo} into {dest.parent} ({e.strerror or e}): check free space "
                           f"and permissions, or choose another folder. What arrived is kept and the next "
                           f"attempt continues from there.")
    partial = dest.parent / PARTIAL.format(dest.name)
    arrived = [p for p in partial.rglob("*") if p.is_file() and p.stat().st_size
               and (".cache" not in p.relative_to(partial).parts or p.name.endswith(".incomplete"))]
    if arrived:                                  # not huggingface_hub's empty locks and notes alone
        kept = f"; what arrived is kept in {partial} and the next attempt continues from there"
    else:
        shutil.rmtree(partial, ignore_errors=True)
        kept = ""
    why = (f"the hub cannot be reached: offline? ({type(e).__name__})" if _is_connection_error(e)
           else f"{type(e).__name__}: {first_line(e)}")
    return missing(short, dest, f"and could not be downloaded ({why}){kept}")


def _move_into_place(partial: Path, dest: Path) -> None:
    """The complete partial folder becomes `dest` in one rename; into an existing `dest` (a folder the user
    started filling) the files move one by one."""
    if not dest.exists():
        os.replace(partial, dest)
        return
    for p in sorted(partial.iterdir()):
        os.replace(p, dest / p.name)
    partial.rmdir()


def ensure(name: str, roots, *, download_missing: bool, progress: Progress | None = None,
           echo: Callable[[str], None] | None = None) -> Path | None:
    """`name` under one of `roots` (the folders a loader lists), downloaded into the first when it is an
    official model that is missing and `download_missing`; None for a missing name that is not official.
    Missing with `download_missing` False, or no folder to download into: a MagnetError naming the command."""
    roots = [Path(r) for r in roots]
    for root in roots:
        if name and (root / name).exists():
            return root / name
    if "/" in str(name) or "\\" in str(name) or not is_official(name):    # only a bare official name
        return None
    _, kind, short = resolve_name(name)
    if not roots:
        raise missing(short, default_folder(kind, short), f"(no models/{FOLDERS[kind]} folder is set)")
    dest = roots[0] / short
    if not download_missing:
        raise missing(short, dest, "and the loader's `download` is `never`: set it to `if missing` to fetch it")
    return download(short, dest, progress=progress, echo=echo)


def codec_pointer(release: Path) -> str | None:
    """The codec repository an official release folder's compression file points to ('facebook/encodec_32khz'),
    read only when the file is a small pointer (full codec weights: None)."""
    from .compat import load_torch_file
    f = Path(release) / CODEC_FILE
    try:
        if not f.is_file() or f.stat().st_size > 64 * 1024:
            return None
        obj = load_torch_file(f, CODEC_FILE)
    except (OSError, MagnetError):
        return None
    pointer = obj.get("pretrained") if isinstance(obj, dict) else None
    return pointer if isinstance(pointer, str) else None


def ensure_codec(release: Path, search_dirs=(), *, download_missing: bool, progress: Progress | None = None,
                 echo: Callable[[str], None] | None = None) -> Path | None:
    """For a release whose codec file points to an official codec (encodec_32khz) that is in none of the
    places the loader looks (the release folder, beside it, `search_dirs`, $MAGNET_CODEC_DIR): download it
    beside the release when `download_missing`. Else nothing (loading then says what is missing)."""
    pointer = codec_pointer(release)
    if pointer is None or not is_official(pointer, "codec") or os.environ.get("MAGNET_CODEC_DIR"):
        return None
    name = _short(pointer)
    release = Path(os.path.abspath(release))
    for place in (release, release.parent, *(Path(d) for d in search_dirs)):
        if (place / name).is_dir():
            return place / name
    if not download_missing:
        return None
    return download(name, release.parent / name, progress=progress, echo=echo)


def prepare(release, text_encoder=None, codec=None, search_dirs=(), models_dir: str | Path = "models",
            echo: Callable[[str], None] | None = None, find_text_encoder: Callable | None = None):
    """What `from_pretrained(..., download=True)` and the CLI's `--download` do before loading: an official
    release name that is not on disk (a bare name goes to models/magnet/<name>, a path to that path) is
    downloaded, with the codec it points to and, when `text_encoder` is None, its T5 (models/text_encoders/
    <t5> beside models/magnet, else beside the release) unless `find_text_encoder(name, release, search_dirs)`
    (model.find_text_encoder) finds it. Returns (release path, text_encoder)."""
    if echo is None:
        import sys
        echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  (asked for: shown, not logged)
    path = Path(release)
    if not path.exists() and is_official(path.name, "release"):
        bare = str(release) == path.name
        dest = default_folder("release", path.name, models_dir) if bare else path
        path = dest if dest.exists() else download(path.name, dest, echo=echo)
    if codec is None and path.is_dir():
        ensure_codec(path, search_dirs, download_missing=True, echo=echo)
    t5 = release_text_encoder(path.name)
    if text_encoder is None and t5 is not None:
        if find_text_encoder is None or find_text_encoder(t5, path, search_dirs) is None:
            parent = Path(os.path.abspath(path)).parent
            home = parent.parent / "text_encoders" / t5 if parent.name == "magnet" else parent / t5
            text_encoder = home if home.is_dir() else download(t5, home, echo=echo)
    return path, text_encoder
