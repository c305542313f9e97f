"""Fetching the official models on first use, against a fake hub (no network): `hf_hub_download` and
`HfApi.model_info` replaced by stand-ins that copy the reference fixtures, an empty models folder, and the
text-to-music template's graph run through the nodes; an interrupted download, offline, `never`."""
import types
from pathlib import Path

import pytest

from pack import load_pack
from test_workflows import load, run_graph, workflow

from magnet import hub
from magnet.errors import MagnetError

NodeError = load_pack().magnet.errors.MagnetError       # what the nodes raise (the pack's own copy of the engine)


@pytest.fixture(scope="module")
def ours():
    return load_pack().NODE_CLASS_MAPPINGS


class EntryNotFoundError(Exception):
    """What huggingface_hub raises for a file the repository does not have (matched by name)."""


class FakeHub:
    """The hub's files: repo id -> {file name: fixture path}. Records every file fetched (and the keyword
    arguments of each call in `calls`); `fail` makes a file's download raise (after writing part of it as
    huggingface_hub's .incomplete file); `damage` {file: ["short" | "altered", ...]} makes its next downloads
    arrive cut to half or with one byte changed (one entry used per download); `gate`, when set, is an Event
    each download waits for. `model_info` announces every file's size and, for the large (LFS) files, its
    sha256, as the hub does."""

    def __init__(self, ref: Path):
        self.repos = {
            "facebook/magnet-small-10secs": {"state_dict.bin": ref / "magnet-music" / "state_dict.bin",
                                             # the official release's codec file: a pointer to encodec_32khz
                                             "compression_state_dict.bin": ref / "pointer" / "compression_state_dict.bin",
                                             "README.md": ref / "README.md"},
            "facebook/encodec_32khz": {f.name: f for f in (ref / "encodec_32khz").iterdir()},
            "google-t5/t5-base": {f.name: f for f in (ref / "t5-base").iterdir()},
        }
        self.fetched: list[tuple[str, str]] = []
        self.fail: dict[str, BaseException] = {}
        self.damage: dict[str, list[str]] = {}
        self.gate = None
        self.calls: list[tuple[str, dict]] = []
        self.info_calls = 0

    def hf_hub_download(self, repo_id, filename, *, revision=None, local_dir=None, **kw):
        assert repo_id in self.repos and local_dir, (repo_id, local_dir)
        if filename not in self.repos[repo_id]:
            raise EntryNotFoundError(f"404: {filename}")
        src = self.repos[repo_id][filename]
        if filename in self.fail:
            part = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.etag.incomplete"
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
            raise self.fail.pop(filename)
        if self.gate is not None:
            assert self.gate.wait(10), "the other download never waited"
        self.fetched.append((repo_id, filename))
        self.calls.append((filename, kw))
        out = Path(local_dir) / filename
        data = src.read_bytes()
        how = self.damage.get(filename, []) and self.damage[filename].pop(0)
        if how == "short":
            data = data[: len(data) // 2]
        elif how == "altered":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        out.write_bytes(data)
        return str(out)

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        self.info_calls += 1
        files = self.repos[repo_id]
        return types.SimpleNamespace(siblings=[
            types.SimpleNamespace(rfilename=n, size=p.stat().st_size,
                                  lfs=types.SimpleNamespace(size=p.stat().st_size, sha256=sha256(p))
                                  if p.suffix in (".bin", ".safetensors", ".model") else None)
            for n, p in files.items()])


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_hub(ref, monkeypatch):
    import huggingface_hub
    fake = FakeHub(ref)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda api, *a, **k: fake.model_info(*a, **k))
    return fake


@pytest.fixture
def models(tmp_path, monkeypatch):
    """An empty models folder, as a fresh install has (the loaders' folders point into it)."""
    root = tmp_path / "models"
    for kind, env in (("magnet", "MAGNET_MODELS_DIR"), ("text_encoders", "MAGNET_TEXT_ENCODERS_DIR"),
                      ("clap", "MAGNET_CLAP_DIR")):
        (root / kind).mkdir(parents=True)
        monkeypatch.setenv(env, str(root / kind))
    monkeypatch.delenv("MAGNET_CODEC_DIR", raising=False)
    monkeypatch.delenv("MAGNET_TEXT_ENCODER_DIR", raising=False)
    return root


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_fresh_install_lists_the_official_models_the_templates_name(ours, models):
    from magnet_node_pack.nodes.loaders import list_releases
    assert list_releases("magnet") == []
    for node, widget, names in (("MagnetModelLoader", "release", ["magnet-small-10secs", "audio-magnet-medium"]),
                                ("MagnetMusicGenLoader", "release", ["musicgen-small", "musicgen-medium"]),
                                ("MagnetTextEncoderLoader", "text_encoder", ["t5-base", "t5-large"]),
                                ("MagnetClapLoader", "clap", ["larger_clap_music"])):
        spec = ours[node].INPUT_TYPES()
        assert set(names) <= set(spec["required"][widget][0]), node
        # the download choice is the last widget and optional, so workflows saved without it keep their values
        choices, opts = spec["optional"]["download"]
        assert choices == ["if missing", "never"] and opts["default"] == "if missing"
        assert list(spec.get("optional")) == ["download"]


def test_template_01_on_an_empty_models_folder_downloads_what_it_needs_and_generates(ours, models, fake_hub,
                                                                                    caplog, monkeypatch):
    from magnet_node_pack.nodes import comfy
    bars = []
    monkeypatch.setattr(comfy, "Progress", lambda total=0: lambda done, total: bars.append((done, total)))
    caplog.set_level("INFO")
    sinks = run_graph(load(workflow("text_to_music")), ours, {})
    (typ, kwargs), = sinks.values()
    wav = kwargs["audio"]["waveform"]
    assert typ == "SaveAudio" and wav.shape[:2] == (1, 1) and wav.shape[-1] > 0 and wav.isfinite().all()
    # the files arrived in ComfyUI's folders, nothing hidden left behind
    assert visible(models / "magnet") == ["encodec_32khz", "magnet-small-10secs"]
    assert visible(models / "text_encoders") == ["t5-base"]
    assert [p.name for p in (models / "magnet").iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in (models / "magnet" / "magnet-small-10secs").iterdir()) == \
        ["compression_state_dict.bin", "state_dict.bin"]                    # what a release needs, no README
    assert {r for r, _ in fake_hub.fetched} == {"facebook/magnet-small-10secs", "facebook/encodec_32khz",
                                                "google-t5/t5-base"}
    # the size is logged first, and the node's bar ends full
    release_bytes = sum(fake_hub.repos["facebook/magnet-small-10secs"][f].stat().st_size
                        for f in ("state_dict.bin", "compression_state_dict.bin"))
    assert f"({release_bytes / 1e6:.1f} MB: state_dict.bin, compression_state_dict.bin)" in caplog.text
    assert (release_bytes, release_bytes) in bars
    # the second run finds everything on disk: no hub call at all
    fetched, infos = len(fake_hub.fetched), fake_hub.info_calls
    run_graph(load(workflow("text_to_music")), ours, {})
    assert (len(fake_hub.fetched), fake_hub.info_calls) == (fetched, infos)


def test_an_interrupted_download_is_never_listed_and_the_next_run_completes_it(ours, models, fake_hub):
    from magnet_node_pack.nodes.loaders import list_releases
    loader = ours["MagnetModelLoader"]()
    fake_hub.fail["compression_state_dict.bin"] = ConnectionError("connection reset")   # after state_dict.bin
    with pytest.raises(NodeError, match=r"python -m magnet download magnet-small-10secs --dir .*magnet-small-10secs"):
        loader.load("magnet-small-10secs", "cpu", "fp32", "if missing")
    assert list_releases("magnet") == [] and visible(models / "magnet") == []
    partial = models / "magnet" / ".magnet-small-10secs.partial"
    assert (partial / "state_dict.bin").is_file()                          # kept for the next attempt
    model, codec = loader.load("magnet-small-10secs", "cpu", "fp32", "if missing")
    assert model.obj.cfg.n_q == codec.obj.n_q
    assert list_releases("magnet") == ["magnet-small-10secs"] and not partial.exists()
    release_files = [f for r, f in fake_hub.fetched if r == "facebook/magnet-small-10secs"]
    assert release_files == ["state_dict.bin", "compression_state_dict.bin"]   # the complete file not again


@pytest.mark.parametrize("info_fails", ["offline", "http"])
def test_offline_the_message_names_the_files_the_folder_and_the_command(ours, models, monkeypatch, info_fails):
    """Unreachable at the size query (fails at once), or at the files' download (after the size query failed
    another way: the download goes ahead without sizes)."""
    import huggingface_hub

    class HTTPError(Exception):
        pass

    def offline(*a, local_dir=None, **k):
        if local_dir:                      # huggingface_hub leaves its lock and notes before it fails
            (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / ".cache" / "huggingface" / ".gitignore").write_text("*")
            (Path(local_dir) / ".cache" / "huggingface" / "config.json.lock").write_text("")
        raise ConnectionError("Failed to resolve 'huggingface.co'")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda *a, **k: offline() if info_fails == "offline" else (_ for _ in ()).throw(HTTPError()))
    dest = models / "text_encoders" / "t5-base"
    with pytest.raises(NodeError) as info:
        ours["MagnetTextEncoderLoader"]().load("t5-base", "cpu")
    text = str(info.value)
    assert text.startswith("MAGNeT Text Encoder Loader: ") and text.count("MAGNeT Text Encoder Loader") == 1
    assert f"`python -m magnet download t5-base --dir {dest}`" in text
    assert "spiece.model" in text and "cannot be reached" in text and "google-t5/t5-base" in text
    assert "what arrived is kept" not in text
    assert list((models / "text_encoders").iterdir()) == []            # nothing arrived: no partial folder either


def test_never_does_not_contact_the_hub_and_names_the_command(ours, models, fake_hub):
    with pytest.raises(NodeError, match=r"`never`.*python -m magnet download magnet-small-10secs --dir") as info:
        ours["MagnetModelLoader"]().load("magnet-small-10secs", "cpu", "fp32", "never")
    assert "state_dict.bin" in str(info.value)
    assert fake_hub.fetched == [] and fake_hub.info_calls == 0


def test_without_huggingface_hub_the_message_names_the_command(ours, models, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(NodeError, match=r"huggingface_hub.*python -m magnet download larger_clap_music --dir"):
        ours["MagnetClapLoader"]().load("larger_clap_music", "cpu")


def test_only_official_names_are_fetched(ours, models, fake_hub):
    """A name from a workflow that is not an official model is never looked up on the hub."""
    for name in ("someone/magnet-small-10secs-but-not", "https://example.com/x", "../magnet-small-10secs"):
        with pytest.raises(NodeError, match="was not found"):
            ours["MagnetModelLoader"]().load(name, "cpu", "fp32", "if missing")
    assert fake_hub.fetched == [] and fake_hub.info_calls == 0


def test_a_bad_download_choice_is_a_clear_error(ours, models):
    with pytest.raises(NodeError, match=r"`download` 'always' is not one of if missing, never"):
        ours["MagnetTextEncoderLoader"]().load("t5-base", "cpu", "always")


def test_the_size_is_optional_when_the_hub_does_not_tell_it(models, fake_hub, monkeypatch):
    monkeypatch.setattr(hub, "_expected", lambda *a: None)
    lines = []
    path = hub.download("t5-base", models / "text_encoders" / "t5-base", echo=lines.append)
    assert "(size unknown)" in lines[0] and (path / "spiece.model").is_file() and (path / "tokenizer.json").is_file()


def test_the_api_downloads_only_when_asked_and_the_cli_unless_told_not_to(ref, models, fake_hub, tmp_path,
                                                                          monkeypatch, capsys):
    from magnet import __main__ as cli
    from magnet.model import MagnetModel
    monkeypatch.chdir(tmp_path)            # the bare name goes to ./models/magnet/<name>
    with pytest.raises(MagnetError):
        MagnetModel.from_pretrained("magnet-small-10secs", device="cpu")
    args = ["generate", "a riff", "--model", "magnet-small-10secs", "--seconds", "0.5", "--steps", "2,1,1,1",
            "--device", "cpu", "-o", str(tmp_path / "out.wav")]
    assert cli.main([*args, "--no-download"]) == 2                  # told not to: no download
    assert fake_hub.fetched == [] and fake_hub.info_calls == 0
    rc = cli.main([*args, "--download"])                            # the older flag: accepted, the default
    assert rc == 0 and (tmp_path / "out.wav").is_file()
    assert visible(models / "magnet") == ["encodec_32khz", "magnet-small-10secs"]
    assert visible(models / "text_encoders") == ["t5-base"]
    err = capsys.readouterr().err
    assert "downloading magnet-small-10secs from https://huggingface.co/facebook/magnet-small-10secs" in err
    fetched = len(fake_hub.fetched)
    m = MagnetModel.from_pretrained("magnet-small-10secs", device="cpu", download=True)     # all on disk now
    assert m.text_encoder is not None and len(fake_hub.fetched) == fetched
