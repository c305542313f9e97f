"""The command line on a fresh machine: `python -m magnet generate "prompt"` with no --model takes
magnet-small-10secs from the models folder, downloading what is missing (against a fake hub serving the
reference fixtures); the models folder's resolution; --no-download. And what the CLI shares: the one number
check, `sampling.parse_steps`, help texts quoting the one defaults table."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import soundfile as sf

from test_download import FakeHub, visible

from magnet import defaults, hub
from magnet.cli import build_parser, common, main

ROOT = Path(__file__).resolve().parents[1]
ENV = ("MAGNET_MODELS_DIR", "MAGNET_TEXT_ENCODERS_DIR", "MAGNET_CLAP_DIR", "MAGNET_CODEC_DIR",
       "MAGNET_TEXT_ENCODER_DIR")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A home of its own, so nothing reaches the real per-user cache; no models folder variable set."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HOME", "USERPROFILE"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("LOCALAPPDATA", str(home / "AppData" / "Local"))
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def fake_hub(ref, monkeypatch):
    import huggingface_hub
    fake = FakeHub(ref)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda api, *a, **k: fake.model_info(*a, **k))
    return fake


@pytest.fixture
def models(tmp_path, monkeypatch):
    """$MAGNET_MODELS_DIR pointing at an empty models/magnet folder in tmp_path."""
    root = tmp_path / "models"
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(root / "magnet"))
    return root


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and errors[0] == lines[-1], err
    for w in words:
        assert w in errors[0], (w, errors[0])


QUICK = ("--seconds", "0.5", "--steps", "2,1,1,1", "--device", "cpu")


# -- no --model: the default release, fetched once into the models folder -------------------------------

def test_generate_with_no_model_downloads_into_the_models_folder_once(models, fake_hub, tmp_path, capsys, home):
    out = tmp_path / "pad.wav"
    rc, stdout, err = run(capsys, "generate", "warm analog pad", *QUICK, "-o", out)
    assert rc == 0, err
    assert sf.info(str(out)).samplerate == 32000
    assert visible(models / "magnet") == ["encodec_32khz", "magnet-small-10secs"]   # the codec it points to, too
    assert visible(models / "text_encoders") == ["t5-base"]                         # and its own T5
    for name, folder in (("magnet-small-10secs", "magnet"), ("encodec_32khz", "magnet"), ("t5-base", "text_encoders")):
        assert f"downloaded {name} into {models / folder / name}" in err               # what and where
    assert "downloading magnet-small-10secs from https://huggingface.co/facebook/magnet-small-10secs" in err
    assert f"wrote {out}" in stdout
    fetched, infos = len(fake_hub.fetched), fake_hub.info_calls
    rc, _, err = run(capsys, "generate", "warm analog pad", *QUICK, "-o", out)
    assert rc == 0, err
    assert (len(fake_hub.fetched), fake_hub.info_calls) == (fetched, infos) and "download" not in err
    assert not (home / ".cache").exists()                                  # the per-user folder was not used


def test_no_download_on_an_empty_folder_names_the_folder_and_the_command(models, fake_hub, tmp_path, capsys):
    sf.write(tmp_path / "in.wav", [0.0] * 3200, 16000)
    for cmd in (["generate", "warm analog pad"], ["vary", tmp_path / "in.wav", "jazz"]):
        rc, _, err = run(capsys, *cmd, "--no-download", "--device", "cpu", "-o", tmp_path / "o.wav")
        one_line_error(rc, err, f"magnet-small-10secs is not in {models / 'magnet'}", "$MAGNET_MODELS_DIR",
                       "--no-download", "`python -m magnet download magnet-small-10secs --dir "
                       f"{models / 'magnet' / 'magnet-small-10secs'}`")
    assert fake_hub.fetched == [] and fake_hub.info_calls == 0 and not models.exists()


def test_no_download_with_the_release_present_names_the_missing_t5(models, fake_hub, ref, tmp_path, capsys):
    (models / "magnet").mkdir(parents=True)
    shutil.copytree(ref / "magnet-music", models / "magnet" / "magnet-small-10secs")     # full codec weights
    rc, _, err = run(capsys, "generate", "x", "--no-download", *QUICK, "-o", tmp_path / "o.wav")
    one_line_error(rc, err, f"t5-base is not in {models / 'text_encoders'}", "python -m magnet download t5-base")
    assert fake_hub.fetched == []


def test_models_dir_option_wins_and_the_same_folder_serves_the_download_command(models, fake_hub, tmp_path, capsys):
    other = tmp_path / "ComfyUI" / "models"
    rc, out, err = run(capsys, "download", "t5-base", "--models-dir", other)
    assert rc == 0, err
    assert f"downloaded into {other / 'text_encoders' / 't5-base'}" in out
    rc, out, err = run(capsys, "download", "magnet-small-10secs")            # default: the models folder
    assert rc == 0 and f"downloaded into {models / 'magnet' / 'magnet-small-10secs'}" in out, err
    rc, _, err = run(capsys, "generate", "x", "--models-dir", other, "--no-download", "--device", "cpu")
    one_line_error(rc, err, f"not in {other / 'magnet'}", "from --models-dir")


def test_a_release_folder_is_used_as_it_is_and_its_t5_fetched_into_the_models_folder(models, fake_hub, ref,
                                                                                       tmp_path, capsys):
    mine = tmp_path / "mine" / "magnet-small-10secs"                     # an official name, in a folder of mine
    shutil.copytree(ref / "magnet-music", mine)
    rc, _, err = run(capsys, "generate", "x", "--model", mine, *QUICK, "-o", tmp_path / "o.wav")
    assert rc == 0, err
    assert f"loading {mine} ..." in err
    assert visible(mine.parent) == ["magnet-small-10secs"]             # nothing written beside it
    assert visible(models / "text_encoders") == ["t5-base"] and not (models / "magnet").exists()
    assert {r for r, _ in fake_hub.fetched} == {"google-t5/t5-base"}


def test_a_folder_that_is_not_an_official_release_is_never_looked_up(fake_hub, models, tmp_path, capsys):
    rc, _, err = run(capsys, "generate", "x", "--model", tmp_path / "nowhere", "--device", "cpu")
    one_line_error(rc, err, "release not found")
    assert fake_hub.fetched == [] and fake_hub.info_calls == 0


def test_a_musicgen_name_is_refused_before_any_download(fake_hub, models, capsys):
    rc, _, err = run(capsys, "generate", "x", "--model", "musicgen-small", "--device", "cpu")
    one_line_error(rc, err, "MusicGen", "magnet-small-10secs")
    assert fake_hub.info_calls == 0


def test_download_and_no_download_together_are_refused(capsys):
    rc, _, err = run(capsys, "generate", "x", "--download", "--no-download")
    one_line_error(rc, err, "--no-download", "not allowed with")


# -- where the models folder is -----------------------------------------------------------------------

@pytest.mark.parametrize("platform, env, want", [
    ("linux", {}, "home/.cache/magnet/models"),
    ("linux", {"XDG_CACHE_HOME": "xdg"}, "xdg/magnet/models"),
    ("darwin", {"XDG_CACHE_HOME": "xdg"}, "home/Library/Caches/magnet/models"),
    ("win32", {"LOCALAPPDATA": "local"}, "local/magnet/models"),
])
def test_the_per_user_models_folder(monkeypatch, tmp_path, home, platform, env, want):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("LOCALAPPDATA")
    for k, v in env.items():
        monkeypatch.setenv(k, str(tmp_path / v))
    assert hub.user_models_dir() == tmp_path / want
    assert hub.models_dirs("release") == [tmp_path / want / "magnet"]
    assert hub.models_dirs("text_encoder") == [tmp_path / want / "text_encoders"]


def test_the_models_folder_follows_the_nodes_variables(monkeypatch, tmp_path):
    import os
    comfy = tmp_path / "ComfyUI" / "models"
    monkeypatch.setenv("MAGNET_MODELS_DIR", os.pathsep.join([str(comfy / "magnet"), str(tmp_path / "more")]))
    assert hub.models_dirs("release") == [comfy / "magnet", tmp_path / "more"]      # searched in order
    assert hub.models_dirs("text_encoder") == [comfy / "text_encoders"]             # ComfyUI's layout
    monkeypatch.setenv("MAGNET_TEXT_ENCODERS_DIR", str(tmp_path / "t5s"))
    assert hub.models_dirs("text_encoder") == [tmp_path / "t5s"]
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(tmp_path / "all"))                 # not named magnet: one folder
    assert hub.models_dirs("clap") == [tmp_path / "all"]
    assert hub.models_dirs("clap", tmp_path / "m") == [tmp_path / "m" / "clap"]    # --models-dir wins


# -- what the subcommands share ---------------------------------------------------------------------------

def test_the_one_number_check():
    n = common.number
    assert n("2.5", "--x", "fix.") == 2.5 and n(" 7 ", "--x", "fix.", whole=True) == 7
    for value, kw, message in (
            ("abc", {}, "--x 'abc' is not a number: fix."),
            ("nan", {}, "--x 'nan' is not a number: fix."),
            ("1.5", {"whole": True}, "--x '1.5' is not a whole number: fix."),
            ("0", {"lo": 0, "lo_open": True}, "--x '0': fix."),
            ("-1", {"whole": True, "lo": 0}, "--x '-1': fix."),
            ("3", {"hi": 2}, "--x '3': fix.")):
        with pytest.raises(Exception, match=re.escape(message)):
            n(value, "--x", "fix.", **kw)


def test_steps_are_parsed_by_the_engine(monkeypatch):
    from magnet import sampling
    seen = []
    real = sampling.parse_steps
    monkeypatch.setattr(sampling, "parse_steps", lambda text: seen.append(text) or real(text))
    assert common.steps("3, 2,2,2") == [3, 2, 2, 2] and common.steps("auto") is None
    assert seen == ["3, 2,2,2", "auto"]


def test_max_steps_is_defined_once():
    found = [f"{p.relative_to(ROOT)}" for p in (ROOT / "magnet").rglob("*.py")
             if re.search(r"^MAX_STEPS\s*=", p.read_text(encoding="utf-8"), re.M)]
    assert found == ["magnet/defaults.py"]
    from magnet import sampling
    assert sampling.MAX_STEPS is defaults.MAX_STEPS and sampling.MUSIC_DEFAULTS is defaults.MUSIC_DEFAULTS


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], ["--steps '0'", "at least 1"]),
    (["--rank", "two"], ["--rank 'two' is not a whole number"]),
    (["--lr", "inf"], ["--lr"]),
])
def test_bad_train_options_are_one_line_errors_before_loading(tmp_path, capsys, args, words):
    rc, _, err = run(capsys, "train", tmp_path, "--model", tmp_path, "--out", tmp_path / "l.safetensors", *args)
    one_line_error(rc, err, *words)


# -- one table of published defaults: the help texts and tooltips quote it ---------------------------------

def _help(*cmd) -> str:
    sub = build_parser()._subparsers._group_actions[0].choices[cmd[0]]
    return " ".join(sub.format_help().split())


def test_help_texts_and_tooltips_are_made_from_the_defaults_table(pack):
    text = _help("generate")
    phrases = {"temperature": defaults.per_release("temperature"), "top_p": defaults.per_release("top_p"),
               "steps": defaults.per_release("decoding_steps"),
               "cfg": defaults.per_release("max_cfg_coef", "min_cfg_coef")}
    for phrase in phrases.values():
        assert phrase in text, phrase
    assert "3.5 for audio-magnet" in phrases["temperature"] and "60,10,10,10 for the 30 s music" in phrases["steps"]
    widgets = pack.nodes.common.SAMPLING_WIDGETS
    for name in ("temperature", "top_p", "top_k", "max_cfg_coef", "min_cfg_coef", "span_arrangement"):
        assert defaults.per_release(name) in widgets[name][1]["tooltip"], name
    assert phrases["steps"] in widgets["decoding_steps"][1]["tooltip"]


def test_the_table_is_what_the_fixtures_store_and_what_the_readme_says(ref):
    import torch
    from magnet.checkpoints import parse_xp_cfg
    from magnet.sampling import RELEASE_KEYS
    for folder, kind in (("magnet-audio", "sound"), ("magnet-music", "music-30s")):
        lm = parse_xp_cfg(torch.load(ref / folder / "state_dict.bin", weights_only=True)["xp.cfg"], folder)
        stored = lm["generate"]["lm"]
        want = defaults.KINDS[kind].settings
        assert {k: stored[RELEASE_KEYS.get(k, k)] for k in want} == {**want, "decoding_steps": list(want["decoding_steps"])}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for kind in defaults.KINDS.values():
        s = kind.settings
        row = (f"| {', '.join(f'`{r}`' for r in kind.releases)} | {s['temperature']:.1f} | {s['top_p']:g} | "
               f"{s['top_k']} | {s['max_cfg_coef']:g} -> {s['min_cfg_coef']:g} | "
               f"{','.join(map(str, s['decoding_steps']))} | `{s['span_arrangement']}`, scored `{s['span_scoring']}` |")
        assert row in readme, row


def test_the_checkpointing_help_quotes_the_readmes_measurement():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    plain = float(re.search(r"^\| training step \| ([\d.]+) \|", readme, re.M).group(1))
    ckpt = float(re.search(r"^\| training step, gradient checkpointing \| ([\d.]+) \|", readme, re.M).group(1))
    assert f"about {ckpt / plain:.2f}x the step time" in _help("train")
