"""The command line: `python -m magnet generate|convert|download|evaluate`, run in-process (one smoke test
runs it as a subprocess). A user's mistake ends with exit status != 0 and one line on stderr naming the
option or problem and the fix, never a traceback."""
import errno
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from magnet.__main__ import main
from magnet.errors import MagnetError


@pytest.fixture(autouse=True)
def _no_user_models_folder(tmp_path, monkeypatch):
    """The models folder an official name would be looked for in: inside tmp_path, never the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(tmp_path / "models" / "magnet"))


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *words):
    assert rc != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]      # on a line of its own ...
    assert len(errors) == 1 and errors[0] == lines[-1], err               # ... the last one
    assert not any("Error:" in line or "Exception" in line for line in lines[:-1]), err   # no raw exception
    for w in words:
        assert w in errors[0], (w, errors[0])


def gen(ref, tmp_path, *extra):
    return ["generate", "rain on a tin roof", "--model", ref / "magnet-music", "--text-encoder", ref / "t5-base",
            "-o", tmp_path / "out.wav", "--device", "cpu", *extra]


def test_help_runs_as_a_program():
    r = subprocess.run([sys.executable, "-m", "magnet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "convert" in r.stdout and not r.stderr


def test_generate_writes_one_wav_per_prompt_with_the_requested_length(ref, tmp_path, capsys):
    out = tmp_path / "song.wav"
    rc = main(["generate", "80s thrash metal intro riff", "lovely piano sonata", "--model", str(ref / "magnet-music"),
               "--text-encoder", str(ref / "t5-base"), "-o", str(out), "--seconds", "1.2", "--seed", "3",
               "--steps", "3,2,2,2", "--loudness", "-14", "--device", "cpu"])
    assert rc == 0
    for name in ("song_1.wav", "song_2.wav"):
        data, sr = sf.read(tmp_path / name)
        assert sr == 32000 and len(data) == 60 * 640     # 1.2 s = 60 frames (a multiple of 3)
    assert "seed 3" in capsys.readouterr().err


def test_convert_then_generate_from_the_single_file(ref, tmp_path):
    st = tmp_path / "m.safetensors"
    assert main(["convert", str(ref / "magnet-audio"), str(st)]) == 0
    rc = main(["generate", "rain", "--model", str(st), "--text-encoder", str(ref / "t5-large"), "-o",
               str(tmp_path / "a.wav"), "--steps", "2,1,1,1", "--greedy", "--device", "cpu"])
    assert rc == 0
    data, sr = sf.read(tmp_path / "a.wav")
    assert sr == 16000 and len(data) == 99 * 320


def test_user_errors_print_the_message_and_exit_2(ref, tmp_path, capsys):
    rc, _, err = run(capsys, "generate", "x", "--model", tmp_path / "missing", "--device", "cpu")
    assert rc == 2
    assert_one_line_error(rc, err, "release not found")
    rc, _, err = run(capsys, "generate", "x", "--model", ref / "magnet-music", "--steps", "20,10", "--device", "cpu")
    assert rc == 2
    assert_one_line_error(rc, err, "one step count per codebook")


@pytest.mark.parametrize("args, words", [
    (["--seconds", "1e9"], ["--seconds", "at most"]),
    (["--seconds", "nan"], ["--seconds"]),
    (["--seconds", "inf"], ["--seconds"]),
    (["--seconds", "-1"], ["--seconds", "more than 0"]),
    (["--seconds", "ten"], ["--seconds"]),
    (["--steps", "2.5"], ["--steps", "whole number"]),
    (["--steps", "10000"], ["--steps", "1000"]),
    (["--steps", "20,0,10,10"], ["--steps"]),
    (["--device", "gpu-zero"], ["--device", "not a device name"]),
    (["--device", "tpu"], ["--device"]),
    (["--device", "gpu\u00b2"], ["--device 'gpu\u00b2'", "not a device name"]),
    (["--device", "cpu:\u00b2"], ["--device 'cpu:\u00b2'", "not a device name"]),
    (["--device", "cuda:99999999999999999999"], ["--device 'cuda:99999999999999999999'", "auto"]),
    (["--device", "cuda:-1"], ["--device 'cuda:-1'", "not a device name"]),
    (["--dtype", "quarter"], ["--dtype", "fp16"]),
    (["--loudness", "nan"], ["--loudness", "LUFS"]),
    (["--loudness", "5"], ["--loudness", "-70 to 0"]),
    (["--loudness", "-inf"], ["--loudness"]),
    (["--seed", "abc"], ["--seed", "whole number"]),
    (["--seed", "1.5"], ["--seed"]),
    (["--overlap", "-1"], ["--overlap"]),
    (["--overlap", "nan"], ["--overlap"]),
    (["--top-k", "x"], ["--top-k"]),
    (["--top-p", "2"], ["--top-p"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--cfg", "nan,1"], ["--cfg"]),
    (["--span-scoring", "min"], ["--span-scoring", "-h"]),
    (["--no-such-option"], ["--no-such-option"]),
])
def test_bad_generate_options_are_one_line_errors_naming_the_option(ref, tmp_path, capsys, args, words):
    rc, _, err = run(capsys, *gen(ref, tmp_path, *args))
    assert rc == 2
    assert_one_line_error(rc, err, *words)
    assert "loading" not in err                 # refused before any model loads


@pytest.mark.parametrize("name", ["cuda", "gpu0", "cuda:1"])
def test_device_names_a_missing_gpu_or_works(ref, tmp_path, capsys, name):
    rc, _, err = run(capsys, *gen(ref, tmp_path, "--device", name, "--seconds", "0.12", "--steps", "1,1,1,1"))
    if rc == 0:
        assert (tmp_path / "out.wav").is_file()
    elif not torch.cuda.is_available():
        assert_one_line_error(rc, err, "--device", "no CUDA")
    else:
        assert_one_line_error(rc, err, "--device")


def test_dtype_half_is_accepted(ref, tmp_path, capsys):
    rc, _, err = run(capsys, *gen(ref, tmp_path, "--dtype", "half", "--seconds", "0.12", "--steps", "1,1,1,1"))
    assert rc == 0, err
    assert sf.info(str(tmp_path / "out.wav")).samplerate == 32000


def test_fast_mode_generates(ref, tmp_path, capsys):
    rc, _, err = run(capsys, *gen(ref, tmp_path, "--fast", "--seconds", "0.6", "--steps", "2,1,1,1", "--seed", "1"))
    assert rc == 0, err
    assert len(sf.read(tmp_path / "out.wav")[0]) == 30 * 640


def test_fast_mode_with_half_weights_on_the_cpu_runs_without_int8(ref, tmp_path, capsys):
    rc, _, err = run(capsys, *gen(ref, tmp_path, "--fast", "--dtype", "fp16"))
    assert rc == 0, err
    assert "Traceback" not in err


def test_overlap_slides_the_window_beyond_the_release_length(ref, tmp_path, capsys):
    rc, _, err = run(capsys, *gen(ref, tmp_path, "--seconds", "3", "--overlap", "0.5", "--steps", "1,1,1,1",
                                  "--greedy"))
    assert rc == 0, err
    assert len(sf.read(tmp_path / "out.wav")[0]) == 3 * 32000


def test_overlap_longer_than_the_window_is_a_clear_error(ref, tmp_path, capsys):
    rc, _, err = run(capsys, *gen(ref, tmp_path, "--seconds", "3", "--overlap", "100"))
    assert_one_line_error(rc, err, "overlap", "at most")
    assert not (tmp_path / "out.wav").exists()


def test_output_under_a_regular_file_fails_before_loading(ref, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    rc, _, err = run(capsys, "generate", "x", "--model", ref / "magnet-music", "--device", "cpu",
                     "-o", tmp_path / "file.txt" / "out.wav")
    assert_one_line_error(rc, err, "cannot write", "file.txt", "writable folder")
    assert "loading" not in err


class _FailingModel:
    """Stands in for a loaded model: runs two progress steps, then fails as `fail` says."""
    sample_rate = 32000
    last_seed = 0

    def __init__(self, fail):
        self.fail = fail

    def generate(self, prompts, progress=None, **kw):
        progress(1, 40)
        progress(2, 40)
        raise self.fail


@pytest.mark.parametrize("fail, words, code", [
    (MagnetError("duration 99 s is too long: ask for at most 60 s."), ["too long"], 2),
    (MemoryError(), ["ran out of memory", "shorter duration", "smaller batch"], 1),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), ["ran out of memory"], 1),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
     ["ran out of memory"], 1),
])
def test_an_error_during_decoding_prints_on_a_fresh_line_after_the_progress_bar(tmp_path, capsys, monkeypatch,
                                                                                 fail, words, code):
    from magnet import model
    monkeypatch.setattr(model.MagnetModel, "from_pretrained", classmethod(lambda cls, *a, **k: _FailingModel(fail)))
    rc, _, err = run(capsys, "generate", "x", "--model", tmp_path, "--device", "cpu", "-o", tmp_path / "o.wav")
    assert rc == code
    assert "decoding" in err and "2/40" in err       # the bar was drawn ...
    assert_one_line_error(rc, err, *words)           # ... and closed: the error has its own line
    assert err.endswith("\n") and "\r" not in err.splitlines()[-1]


def test_an_unexpected_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    from magnet import model
    monkeypatch.setattr(model.MagnetModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: _FailingModel(RuntimeError("shape mismatch"))))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["generate", "x", "--model", str(tmp_path), "--device", "cpu", "-o", str(tmp_path / "o.wav")])


# --- convert: a failed write is one line and leaves nothing behind --------------------------------

def test_convert_into_a_path_under_a_regular_file_is_a_clear_error(ref, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out.safetensors"
    rc, _, err = run(capsys, "convert", ref / "magnet-audio", out)
    assert_one_line_error(rc, err, f"cannot write {out}", "Choose a writable folder with enough free space.")


def _full_disk(kind):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:          # half a file, as a full disk leaves it
            f.write(b"\0" * 100)
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        from safetensors import SafetensorError
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) "
                              f"at path \"{filename}\"")
    return save_file


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_convert_on_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(ref, tmp_path, capsys, monkeypatch,
                                                                           kind):
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk(kind))
    out = tmp_path / "m.safetensors"
    rc, _, err = run(capsys, "convert", ref / "magnet-audio", out)
    assert_one_line_error(rc, err, f"cannot write {out}: No space left on device",
                          "Choose a writable folder with enough free space.")
    assert list(tmp_path.iterdir()) == []


def test_convert_output_must_be_safetensors(ref, tmp_path, capsys):
    rc, _, err = run(capsys, "convert", ref / "magnet-audio", tmp_path / "m.bin")
    assert_one_line_error(rc, err, ".safetensors")


# --- download, evaluate ---------------------------------------------------------------------------

def test_download_offline_names_the_folder_to_fill(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: offline())
    rc, _, err = run(capsys, "download", "t5-base", "--models-dir", tmp_path)
    assert rc == 2
    assert_one_line_error(rc, err, str(tmp_path / "text_encoders" / "t5-base"), "spiece.model")
    rc, _, err = run(capsys, "download", "magnet-huge")
    assert_one_line_error(rc, err, "magnet-small-10secs")


@pytest.mark.parametrize("args, words", [
    (["--loudness", "nan"], ["--loudness", "'off'"]),
    (["--loudness", "3"], ["--loudness"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--batch-size", "many"], ["--batch-size"]),
    (["--device", "gpu-zero"], ["--device"]),
])
def test_bad_evaluate_options_are_one_line_errors(tmp_path, capsys, args, words):
    rc, _, err = run(capsys, "evaluate", tmp_path / "a.wav", "--clap", tmp_path, "--prompt", "rain", *args)
    assert_one_line_error(rc, err, *words)


def test_help_in_process_returns_0(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--fast" in capsys.readouterr().out


# --- vary (audio to audio) -------------------------------------------------------------------------

def _vary_input(tmp_path, seconds=1.3, sr=44100):
    import numpy as np
    t = np.arange(int(seconds * sr)) / sr
    path = tmp_path / "in.wav"
    sf.write(path, np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], -1) * 0.3, sr)
    return path


def vary_args(ref, tmp_path, *extra):
    return ["vary", _vary_input(tmp_path), "jazz trio", "--model", ref / "magnet-music", "--text-encoder",
            ref / "t5-base", "-o", tmp_path / "out.wav", "--device", "cpu", "--steps", "3,2,2,2", *extra]


def test_vary_writes_the_input_length_and_is_repeatable_with_a_seed(ref, tmp_path, capsys):
    rc, out, err = run(capsys, *vary_args(ref, tmp_path, "--strength", "0.4", "--keep-codebooks", "1", "--seed", "5"))
    assert rc == 0, err
    data, sr = sf.read(tmp_path / "out.wav")
    assert sr == 32000 and len(data) == round(1.3 * 32000)
    assert "seed 5" in err
    first = data.copy()
    rc, _, _ = run(capsys, *vary_args(ref, tmp_path, "--strength", "0.4", "--keep-codebooks", "1", "--seed", "5"))
    assert rc == 0 and (sf.read(tmp_path / "out.wav")[0] == first).all()


def test_vary_strength_zero_gives_the_codec_round_trip(ref, tmp_path, capsys):
    from magnet import MagnetModel
    rc, _, err = run(capsys, *vary_args(ref, tmp_path, "--strength", "0"))
    assert rc == 0, err
    m = MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=False, device="cpu")
    wav, sr = sf.read(tmp_path / "in.wav", dtype="float32")
    want = m.decode(m.encode(torch.from_numpy(wav.T), sr), duration=1.3)[0, 0].clamp(-1, 1)
    got = torch.from_numpy(sf.read(tmp_path / "out.wav", dtype="float32")[0])
    assert torch.allclose(got, want, atol=2 / 32768)


@pytest.mark.parametrize("args, words", [
    (["--strength", "1.5"], ["--strength", "0 (unchanged) to 1"]),
    (["--strength", "nan"], ["--strength"]),
    (["--keep-codebooks", "-1"], ["--keep-codebooks"]),
    (["--keep-codebooks", "4"], ["--keep-codebooks 4", "at most 3"]),
    (["--seed", "x"], ["--seed", "whole number"]),
    (["--steps", "3,2"], ["one step count per codebook"]),
])
def test_bad_vary_options_are_one_line_errors(ref, tmp_path, capsys, args, words):
    rc, _, err = run(capsys, *vary_args(ref, tmp_path, *args))
    assert rc == 2
    assert_one_line_error(rc, err, *words)


def test_vary_names_a_missing_input_file(ref, tmp_path, capsys):
    args = vary_args(ref, tmp_path)
    args[1] = tmp_path / "missing.wav"
    rc, _, err = run(capsys, *args)
    assert_one_line_error(rc, err, "not found")


class _Recorder:
    """A stand-in MagnetModel that records what `generate` is asked and returns codes with a seed."""

    sample_rate, last_seed = 16000, "never read"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, **kw):
        from magnet.model import Generated
        self.calls.append(kw)
        assert kw.get("return_seed") is True           # the CLI takes the seed from the result
        return Generated(torch.zeros(len(prompts), 4, 3, dtype=torch.long), 8675309)

    def decode(self, codes):
        return torch.zeros(codes.shape[0], 1, 160)


def _recorded(monkeypatch, capsys, tmp_path, *args):
    from magnet.model import MagnetModel
    fake = _Recorder()
    monkeypatch.setattr(MagnetModel, "from_pretrained", classmethod(lambda cls, *a, **k: fake))
    rc, _, err = run(capsys, "generate", "rain", "--model", tmp_path, "-o", tmp_path / "o.wav", "--device", "cpu",
                     *args)
    assert rc == 0, err
    assert "seed 8675309" in err                       # the seed of the result, not model.last_seed
    return fake.calls[0]


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "max_cfg_coef", "min_cfg_coef", "span_arrangement",
                   "span_scoring")


def test_generate_without_sampling_options_asks_for_the_releases_own(monkeypatch, capsys, tmp_path):
    kw = _recorded(monkeypatch, capsys, tmp_path)
    assert {k: kw.get(k, "missing") for k in SAMPLING_FIELDS} == dict.fromkeys(SAMPLING_FIELDS)
    assert kw["decoding_steps"] is None and kw["use_sampling"] is True


def test_explicit_sampling_options_win(monkeypatch, capsys, tmp_path):
    kw = _recorded(monkeypatch, capsys, tmp_path, "--temperature", "2.5", "--top-k", "7", "--top-p", "0.5",
                   "--cfg", "4,2", "--span-arrangement", "stride1", "--span-scoring", "prod", "--steps", "3,2,2,2")
    assert {k: kw[k] for k in SAMPLING_FIELDS} == dict(temperature=2.5, top_k=7, top_p=0.5, max_cfg_coef=4.0,
                                                       min_cfg_coef=2.0, span_arrangement="stride1",
                                                       span_scoring="prod")
    assert kw["decoding_steps"] == [3, 2, 2, 2]


def test_generate_help_says_sampling_options_default_to_the_releases_own(capsys):
    assert main(["generate", "-h"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--temperature", "--top-k", "--top-p", "--cfg", "--span-arrangement", "--span-scoring",
                   "--steps"):
        after = text.split(option, 2)[-1][:400]          # its help text (after the usage line's mention)
        assert "the release's own" in after, option
