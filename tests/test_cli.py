"""The command line: `python -m magnet generate|convert`."""
import subprocess
import sys

import soundfile as sf

from magnet.__main__ import main


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


def test_user_errors_print_the_message_and_exit_2(ref, tmp_path):
    r = subprocess.run([sys.executable, "-m", "magnet", "generate", "x", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "release not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "magnet", "generate", "x", "--model", str(ref / "magnet-music"),
                        "--steps", "20,10", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "one step count per codebook" in r.stderr


def test_download_offline_names_the_folder_to_fill(tmp_path):
    import os
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "magnet", "download", "t5-base", "--models-dir", str(tmp_path)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert str(tmp_path / "text_encoders" / "t5-base") in r.stderr and "spiece.model" in r.stderr
    r = subprocess.run([sys.executable, "-m", "magnet", "download", "magnet-huge"], capture_output=True, text=True)
    assert r.returncode == 2 and "magnet-small-10secs" in r.stderr
