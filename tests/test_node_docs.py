"""Every node documents itself (DESCRIPTION, a tooltip on every input, OUTPUT_TOOLTIPS, a help page that ComfyUI's
node help panel shows), loaders list only what they load, device choices exist on this machine, and names in
ComfyUI's log and error dialogs are the node's and the model's."""
import re
import shutil
import sys

import pytest
import torch

from pack import ROOT, load_pack

DOCS = ROOT / "nodes" / "web" / "docs"


def inputs(cls):
    spec = cls.INPUT_TYPES()
    return [(name, entry) for section in ("required", "optional") for name, entry in spec.get(section, {}).items()]


def test_every_node_has_a_short_description(N):
    for name, cls in N.items():
        d = getattr(cls, "DESCRIPTION", None)
        assert isinstance(d, str) and d.strip(), name
        assert 20 <= len(d) <= 300 and len(re.findall(r"[.!?](\s|$)", d)) <= 2, (name, d)


def test_every_input_has_a_tooltip_sockets_included(N):
    for name, cls in N.items():
        for inp, entry in inputs(cls):
            opts = entry[1] if len(entry) > 1 else {}
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) >= 10, (name, inp)


def test_output_tooltips_match_the_outputs(N):
    for name, cls in N.items():
        tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        assert isinstance(tips, tuple) and len(tips) == len(cls.RETURN_TYPES), name
        assert all(isinstance(t, str) and t.strip() for t in tips), name


def test_display_names_come_from_the_classes(pack, N):
    for name, cls in N.items():
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[name] == cls.DISPLAY_NAME
        assert cls.DISPLAY_NAME.startswith("MAGNeT ")
    assert len(set(pack.NODE_DISPLAY_NAME_MAPPINGS.values())) == len(N)


def test_web_directory_is_exported_and_holds_a_help_page_per_node(pack, N):
    # ComfyUI: os.path.join(module_dir, WEB_DIRECTORY), served as /extensions/<folder>/; the frontend's help
    # panel fetches /extensions/<folder>/docs/<NodeClassName>.md (after docs/<NodeClassName>/<locale>.md)
    web = (ROOT / pack.WEB_DIRECTORY).resolve()
    assert web == (ROOT / "nodes" / "web").resolve() and web.is_dir()
    assert "WEB_DIRECTORY" in pack.__all__
    # the frontend loads every .js under WEB_DIRECTORY as an extension: only ours, each one registered extension
    scripts = sorted(web.rglob("*.js"))
    assert [p.name for p in scripts] == ["magnet_previews.js"]
    for p in scripts:
        text = p.read_text(encoding="utf-8")
        assert text.count("app.registerExtension(") == 1 and 'from "../../scripts/app.js"' in text
    assert {p.stem for p in DOCS.glob("*.md")} == set(N)


@pytest.mark.parametrize("node", sorted(load_pack().NODE_CLASS_MAPPINGS))
def test_help_page_names_the_node_every_input_and_every_output(N, node):
    cls = N[node]
    text = (DOCS / f"{node}.md").read_text(encoding="utf-8")
    assert text.startswith(f"# {cls.DISPLAY_NAME}\n"), node
    for section in ("## Inputs", "## Outputs", "## Tips"):
        assert section in text, (node, section)
    for inp, _ in inputs(cls):
        assert f"`{inp}`" in text, (node, inp)
    for out in getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES):
        assert f"`{out}`" in text, (node, out)


@pytest.mark.parametrize("node", sorted(load_pack().NODE_CLASS_MAPPINGS))
def test_help_page_fits_a_narrow_side_panel(N, node):
    """ComfyUI shows the page in a side panel a few hundred pixels wide: a Markdown table runs off its edge, so
    the inputs are a list: each item opens with the name of the input it explains (or of several alike)."""
    text = (DOCS / f"{node}.md").read_text(encoding="utf-8")
    assert not [line for line in text.splitlines() if line.lstrip().startswith("|")], f"{node}: a table"
    section = text.split("## Inputs", 1)[1].split("\n## ", 1)[0]
    heads = re.findall(r"^- ((?:`[^`]+`(?:, |,\n  )?)+)", section, re.M)
    named = [name for head in heads for name in re.findall(r"`([^`]+)`", head)]
    assert sorted(named) == sorted(inp for inp, _ in inputs(N[node])), (node, named)
    # inline code breaks only at spaces: a longer word runs past the panel's edge (a path: name its last part)
    long = [w for span in re.findall(r"`([^`\n]+)`", text) for w in span.split() if len(w) > 26]
    assert not long, (node, long)


def test_sampling_tooltips_state_the_releases_own_settings(N):
    """Every MAGNeT sampling node offers the release's own settings (auto, -1, release) as the defaults, and its
    tooltips say what the releases use."""
    for node in ("MagnetSampler", "MagnetRegenerateRegion", "MagnetAudioToAudio", "MagnetSeamlessLoop"):
        spec = N[node].INPUT_TYPES()["optional"]
        steps = spec["decoding_steps"]
        assert steps[0] == "STRING" and steps[1]["default"] == "auto"
        assert "60,10,10,10" in steps[1]["tooltip"] and "20,10,10,10" in steps[1]["tooltip"]
        for name, values in (("temperature", ("3.0", "3.5")), ("top_p", ("0.9", "0.8")),
                             ("max_cfg_coef", ("10", "20")), ("top_k", ("0",)), ("min_cfg_coef", ("1",))):
            typ, opts = spec[name]
            assert typ in ("INT", "FLOAT") and opts["default"] == opts["min"] == -1, (node, name)
            assert "-1 = the release's own" in opts["tooltip"], (node, name)
            assert all(v in opts["tooltip"] for v in values), (node, name)
        for name, value in (("span_arrangement", "nonoverlap"), ("span_scoring", "max")):
            choices, opts = spec[name]
            assert choices[0] == opts["default"] == "release" and value in choices[1:], (node, name)
            assert "the release's own" in opts["tooltip"] and value in opts["tooltip"], (node, name)


def test_the_help_pages_state_each_releases_settings():
    text = (DOCS / "MagnetSampler.md").read_text(encoding="utf-8")
    for phrase in ("`-1`", "`release`", "temperature 3.0, top_p 0.9, top_k 0, guidance 10 -> 1",
                   "temperature 3.5, top_p 0.8, top_k 0, guidance 20 -> 1"):
        assert phrase in text, phrase
    for node in ("MagnetRegenerateRegion", "MagnetAudioToAudio", "MagnetSeamlessLoop"):
        assert "release's own" in (DOCS / f"{node}.md").read_text(encoding="utf-8"), node


@pytest.fixture()
def one_models_folder(ref, tmp_path, monkeypatch):
    """Everything in ONE folder, as a careless user would have it: both kinds of release (folder and converted
    .safetensors), a T5, a non-T5 transformers folder, a CLAP and junk; every env var points at it."""
    from tiny_clap import tiny_clap
    from magnet.checkpoints import convert_release
    d = tmp_path / "models"
    d.mkdir()
    for name in ("magnet-music", "musicgen", "t5-base", "encodec_32khz", "pointer"):
        (d / name).symlink_to(ref / name, target_is_directory=True)
    convert_release(ref / "magnet-music", d / "magnet-converted.safetensors")
    convert_release(ref / "musicgen", d / "musicgen-converted.safetensors")
    tiny_clap(d / "larger_clap_music")
    (d / "notes.txt").write_text("not a model")
    (d / "empty").mkdir()
    (d / "broken.safetensors").write_bytes(b"\x00" * 16)
    for var in ("MAGNET_MODELS_DIR", "MAGNET_TEXT_ENCODERS_DIR", "MAGNET_CLAP_DIR"):
        monkeypatch.setenv(var, str(d))
    return d


def choices(cls, name):
    return cls.INPUT_TYPES()["required"][name][0]


def test_loaders_list_only_what_they_load(N, one_models_folder):
    """What is on disk, then the official models not on disk (downloaded when chosen), never a duplicate."""
    official = ["magnet-small-10secs", "magnet-medium-10secs", "magnet-small-30secs", "magnet-medium-30secs",
                "audio-magnet-small", "audio-magnet-medium"]
    assert choices(N["MagnetModelLoader"], "release") == ["magnet-converted.safetensors", "magnet-music", *official]
    assert choices(N["MagnetMusicGenLoader"], "release") == ["musicgen", "musicgen-converted.safetensors",
                                                             "musicgen-small", "musicgen-medium"]
    assert choices(N["MagnetTextEncoderLoader"], "text_encoder") == ["t5-base", "t5-large"]
    assert choices(N["MagnetClapLoader"], "clap") == ["larger_clap_music"]


def test_listing_releases_reads_no_weights(N, one_models_folder, monkeypatch):
    from magnet import checkpoints
    monkeypatch.setattr(checkpoints, "_KIND_CACHE", {})      # list from scratch
    real_load = torch.load

    def load(*args, **kwargs):
        assert kwargs.get("mmap"), "listing must memory-map, not read, state_dict.bin"
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    assert choices(N["MagnetModelLoader"], "release")


def test_a_converted_release_loads_from_the_list(N, one_models_folder):
    model, codec = N["MagnetModelLoader"]().load("magnet-converted.safetensors", "cpu", "fp32")
    assert model.obj.cfg.n_q == codec.obj.n_q


def test_device_choices_are_auto_and_what_this_machine_has(N, monkeypatch):
    loaders = ("MagnetModelLoader", "MagnetTextEncoderLoader", "MagnetMusicGenLoader", "MagnetClapLoader")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for node in loaders:
        devs = choices(N[node], "device")
        assert devs[0] == "auto" and "cpu" in devs and not any(d.startswith("cuda") for d in devs), (node, devs)
        assert N[node].INPUT_TYPES()["required"]["device"][1]["default"] == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert {"cuda", "cuda:0", "cuda:1"} <= set(choices(N["MagnetModelLoader"], "device"))
    for node in ("MagnetModelLoader", "MagnetMusicGenLoader"):
        assert choices(N[node], "dtype") == ["auto", "fp32", "fp16", "bf16"]


def test_missing_package_message_names_the_node_once(pack, N, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyloudnorm", None)      # import fails as if not installed
    with pytest.raises(pack.magnet.errors.MagnetError) as info:
        N["MagnetLoudness"]().normalize({"waveform": torch.zeros(1, 1, 32000), "sample_rate": 32000}, -14.0)
    msg = str(info.value)
    assert msg.startswith("MAGNeT Loudness Normalize: pyloudnorm is not installed: run `pip install -r "
                          "requirements.txt`"), msg
    assert msg.count("MAGNeT Loudness Normalize") == 1


def test_comfyui_log_names_each_model(pack, N, one_models_folder, monkeypatch, tmp_path):
    """ComfyUI logs `Requested to load <class name of the patched module>`: the class name is the model's."""
    comfy = pack.nodes.comfy
    made = comfy.managed_class("MAGNeT LM (magnet-small-10secs)")(torch.nn.Linear(1, 1))
    assert made.__class__.__name__ == "MAGNeT LM (magnet-small-10secs)" and isinstance(made, comfy._Managed)
    assert comfy.managed_class("T5 (t5-base)") is comfy.managed_class("T5 (t5-base)")
    labels = []
    monkeypatch.setattr(comfy, "manage", lambda module, dev=None, label="": labels.append(label))
    fresh = tmp_path / "fresh"            # not in the shared cache yet: the loaders build (and label) it
    fresh.mkdir()
    shutil.copytree(one_models_folder / "magnet-music", fresh / "magnet-small-10secs")
    shutil.copytree(one_models_folder / "musicgen", fresh / "musicgen-small")
    shutil.copytree(one_models_folder / "t5-base", fresh / "t5-base")
    shutil.copytree(one_models_folder / "larger_clap_music", fresh / "larger_clap_music")
    for var in ("MAGNET_MODELS_DIR", "MAGNET_TEXT_ENCODERS_DIR", "MAGNET_CLAP_DIR"):
        monkeypatch.setenv(var, str(fresh))
    N["MagnetModelLoader"]().load("magnet-small-10secs", "cpu", "fp32")
    N["MagnetMusicGenLoader"]().load("musicgen-small", "cpu", "fp32")
    N["MagnetTextEncoderLoader"]().load("t5-base", "cpu")
    N["MagnetClapLoader"]().load("larger_clap_music", "cpu")
    assert labels == ["MAGNeT LM (magnet-small-10secs)", "EnCodec (magnet-small-10secs)",
                      "MusicGen LM (musicgen-small)", "T5 (t5-base)", "CLAP (larger_clap_music)"]
