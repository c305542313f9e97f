"""The example workflows: UI-format JSON that ComfyUI loads by drag and drop, checked against the node
interfaces (ours from the classes, core/VideoHelperSuite ones from the table below), and text_to_music
executed node by node without ComfyUI."""
import json
import re
from pathlib import Path

import pytest
import torch

from pack import ROOT, WIDGET_TYPES, load_pack, widget_inputs

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# ComfyUI's template browser lists every pack's workflows by file name (the name is also the title): a pack
# prefix keeps ours apart from other packs', a two-digit number keeps them in a sensible order.
PREFIX = "magnet_"
NAME = r"^magnet_\d\d_[a-z0-9_]+$"
REQUIRED = {"text_to_music", "text_to_sound_effect", "continue_an_audio_clip", "soundtrack_for_a_video"}

# core ComfyUI and VideoHelperSuite nodes the workflows use: inputs in INPUT_TYPES order (name, type), outputs.
# Widgets the frontend adds after the real ones (audio player, upload button) are listed as extra slots.
EXTERNAL = {
    "PrimitiveStringMultiline": dict(inputs=[("value", "STRING")], outputs=["STRING"], run=lambda value: (value,)),
    "LoadAudio": dict(inputs=[("audio", "COMBO")], outputs=["AUDIO"], extra_widgets=2),
    "SaveAudio": dict(inputs=[("audio", "AUDIO"), ("filename_prefix", "STRING")], outputs=[], extra_widgets=1),
    "PreviewAudio": dict(inputs=[("audio", "AUDIO")], outputs=[], extra_widgets=1),
    # comfy_extras/nodes_preview_any.py (ComfyUI >= 0.3.3x): any input, text shown on the node; the frontend adds
    # its preview widgets (not serialised in newer frontends)
    "PreviewAny": dict(inputs=[("source", "*")], outputs=[], extra_widgets=3),
    "LoadVideo": dict(inputs=[("file", "COMBO")], outputs=["VIDEO"], extra_widgets=1),
    "GetVideoComponents": dict(inputs=[("video", "VIDEO")], outputs=["IMAGE", "AUDIO", "FLOAT"]),
    "CreateVideo": dict(inputs=[("images", "IMAGE"), ("fps", "FLOAT"), ("audio", "AUDIO")], outputs=["VIDEO"]),
    "SaveVideo": dict(inputs=[("video", "VIDEO"), ("filename_prefix", "STRING"), ("format", "COMBO"),
                              ("codec", "COMBO")], outputs=[]),
    "VHS_LoadVideo": dict(inputs=[("video", "COMBO"), ("force_rate", "FLOAT"), ("custom_width", "INT"),
                                  ("custom_height", "INT"), ("frame_load_cap", "INT"), ("skip_first_frames", "INT"),
                                  ("select_every_nth", "INT"), ("meta_batch", "VHS_BatchManager"), ("vae", "VAE"),
                                  ("format", "COMBO")],
                          outputs=["IMAGE", "INT", "AUDIO", "VHS_VIDEOINFO"]),
    "VHS_VideoInfo": dict(inputs=[("video_info", "VHS_VIDEOINFO")],
                          outputs=["FLOAT", "INT", "FLOAT", "INT", "INT", "FLOAT", "INT", "FLOAT", "INT", "INT"]),
    "VHS_VideoCombine": dict(inputs=[("images", "IMAGE"), ("frame_rate", "FLOAT"), ("loop_count", "INT"),
                                     ("filename_prefix", "STRING"), ("format", "COMBO"), ("pingpong", "BOOLEAN"),
                                     ("save_output", "BOOLEAN"), ("audio", "AUDIO"), ("meta_batch", "VHS_BatchManager"),
                                     ("vae", "VAE")], outputs=["VHS_FILENAMES"]),
    # the frontend's own Markdown note (a virtual node: never sent to the server); one widget, its text
    "MarkdownNote": dict(inputs=[], outputs=[], extra_widgets=1, virtual=True),
}
WIDGETS = WIDGET_TYPES | {"COMBO"}


@pytest.fixture(scope="module")
def ours():
    return load_pack().NODE_CLASS_MAPPINGS


def interface(ours, node_type):
    """(inputs [(name, type)], outputs [type]) of a node type."""
    if node_type in ours:
        cls = ours[node_type]
        spec = cls.INPUT_TYPES()
        ins = [(n, "COMBO" if isinstance(e[0], list) else e[0])
               for s in ("required", "optional") for n, e in spec.get(s, {}).items()]
        return ins, list(cls.RETURN_TYPES)
    e = EXTERNAL[node_type]
    return e["inputs"], e["outputs"]


def load(path):
    return json.loads(Path(path).read_text())


def workflow(stem: str) -> Path:
    """The workflow file whose name, without the pack prefix and number, is `stem`."""
    found = [p for p in WORKFLOWS if re.sub(r"^magnet_\d\d_", "", p.stem) == stem]
    assert len(found) == 1, (stem, found)
    return found[0]


def test_the_promised_workflows_exist():
    assert REQUIRED <= {re.sub(r"^magnet_\d\d_", "", p.stem) for p in WORKFLOWS}
    for stem in REQUIRED:                        # each is a graph that runs the pack's sampler
        types = {n["type"] for n in load(workflow(stem))["nodes"]}
        assert "MagnetSampler" in types and "MagnetDecodeAudio" in types, (stem, types)


def test_every_template_name_carries_the_pack_prefix_and_a_unique_number():
    assert WORKFLOWS
    for p in WORKFLOWS:
        assert p.stem.startswith(PREFIX) and re.match(NAME, p.stem), p.name
    numbers = [p.stem.split("_")[1] for p in WORKFLOWS]
    assert len(set(numbers)) == len(numbers), numbers
    assert sorted(numbers) == [f"{i:02d}" for i in range(1, len(numbers) + 1)], numbers
    # nothing else in the folder the template browser would trip over
    assert {p.suffix for p in (ROOT / "workflows").iterdir()} <= {".json", ".jpg"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_template_has_a_same_name_jpg_thumbnail(path):
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"missing thumbnail {thumb.name} for the template browser"
    assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"


def test_no_jpg_without_its_workflow():
    for thumb in (ROOT / "workflows").glob("*.jpg"):
        assert thumb.with_suffix(".json").is_file(), thumb.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid_ui_format_with_known_nodes_and_matching_links(ours, path):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert not wf["links"] or wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for n in wf["nodes"]:
        assert n["type"] in ours or n["type"] in EXTERNAL, f"unknown node type {n['type']}"
        for key in ("pos", "size", "flags", "order", "mode", "properties"):
            assert key in n, (n["type"], key)
        ins, outs = interface(ours, n["type"])
        names = dict(ins)
        for i in n.get("inputs", []):
            assert i["name"] in names, (n["type"], i["name"])
        assert [o["type"] for o in n.get("outputs", [])] == outs, n["type"]
    for link_id, a, a_slot, b, b_slot, typ in wf["links"]:
        src, dst = nodes[a], nodes[b]
        out = src["outputs"][a_slot]
        inp = dst["inputs"][b_slot]
        assert out["type"] == typ and link_id in out["links"], (src["type"], out)
        assert inp["link"] == link_id
        want = dict(interface(ours, dst["type"])[0])[inp["name"]]
        assert want in (typ, "*"), f"{src['type']}.{out['name']} ({typ}) -> {dst['type']}.{inp['name']} ({want})"
    # every socket-only input of our nodes that is required is connected
    for n in wf["nodes"]:
        if n["type"] in ours:
            required = ours[n["type"]].INPUT_TYPES()["required"]
            linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
            for name, entry in required.items():
                if not isinstance(entry[0], list) and entry[0] not in WIDGETS:
                    assert name in linked, f"{n['type']}.{name} is not connected"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_fit_the_inputs(ours, path):
    for n in load(path)["nodes"]:
        values = n.get("widgets_values")
        if n["type"] not in ours:
            if isinstance(values, list):
                e = EXTERNAL[n["type"]]
                widgets = [x for x in e["inputs"] if x[1] in WIDGETS]
                # the frontend may or may not save values for the widgets it adds (player, upload button)
                assert len(widgets) <= len(values) <= len(widgets) + e.get("extra_widgets", 0), n["type"]
            continue
        cls = ours[n["type"]]
        values = list(values)
        for name, typ, opts in widget_inputs(cls):
            if not values and "default" in opts:   # a trailing widget added later: the frontend gives it its default
                continue
            assert values, f"{n['type']}: no value for {name}"
            v = values.pop(0)
            if isinstance(typ, list):
                assert isinstance(v, str) and (v in typ or name in ("release", "text_encoder", "clap")), (n["type"], name, v)
            elif typ == "INT":
                assert isinstance(v, int) and opts.get("min", v) <= v <= opts.get("max", v), (n["type"], name, v)
            elif typ == "FLOAT":
                assert isinstance(v, (int, float)) and opts.get("min", v) <= v <= opts.get("max", v), (n["type"], name, v)
            elif typ == "STRING":
                assert isinstance(v, str)
            elif typ == "BOOLEAN":
                assert isinstance(v, bool)
            if opts.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{n['type']}: extra widget values {values}"


def run_graph(wf, ours, overrides, externals=None):
    """Execute a workflow's nodes in dependency order with plain Python; core output nodes just receive
    their inputs, frontend-only nodes (notes) are left out. `externals` {node type: function(**inputs) ->
    outputs} stands in for core/other-pack nodes (e.g. a LoadAudio). Returns {node id: (type, inputs)} of the
    nodes whose outputs nothing here runs (the output nodes)."""
    externals = externals or {}
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    results, sinks = {}, {}

    def run(nid):
        if nid in results:
            return results[nid]
        n = nodes[nid]
        kwargs = {}
        if n["type"] in externals:
            values = n.get("widgets_values")
            names = [name for name, t in EXTERNAL[n["type"]]["inputs"] if t in WIDGETS]
            if isinstance(values, list):
                kwargs.update(zip(names, values))
            elif isinstance(values, dict):
                kwargs.update({k: v for k, v in values.items() if k in names})
        elif n["type"] in ours or "run" in EXTERNAL.get(n["type"], {}):
            values = list(n["widgets_values"])
            specs = widget_inputs(ours[n["type"]]) if n["type"] in ours else \
                [(name, t, {}) for name, t in EXTERNAL[n["type"]]["inputs"]]
            for name, typ, opts in specs:
                if not values and "default" in opts:    # a trailing widget the file predates: its default
                    kwargs[name] = opts["default"]
                    continue
                kwargs[name] = values.pop(0)
                if opts.get("control_after_generate"):
                    values.pop(0)
        for i in n.get("inputs", []):
            if i.get("link") is not None:
                _, a, a_slot, _, _, _ = links[i["link"]]
                kwargs[i["name"]] = run(a)[a_slot]
        kwargs.update(overrides.get(n["type"], {}))
        if n["type"] in ours:
            cls = ours[n["type"]]
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
            results[nid] = out["result"] if isinstance(out, dict) else out
        elif n["type"] in externals:
            results[nid] = externals[n["type"]](**kwargs)
        elif "run" in EXTERNAL[n["type"]]:
            results[nid] = EXTERNAL[n["type"]]["run"](**kwargs)
        else:
            sinks[nid] = (n["type"], kwargs)
            results[nid] = ()
        return results[nid]
    for nid, n in nodes.items():
        if not EXTERNAL.get(n["type"], {}).get("virtual"):
            run(nid)
    return sinks


def test_text_to_music_runs_node_by_node_and_gives_valid_audio(ref, ours, monkeypatch):
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(ref))
    monkeypatch.setenv("MAGNET_TEXT_ENCODERS_DIR", str(ref))
    wf = load(workflow("text_to_music"))
    sinks = run_graph(wf, ours, {"MagnetModelLoader": {"release": "magnet-music"},
                                 "MagnetTextEncoderLoader": {"text_encoder": "t5-base"}})
    (typ, kwargs), = sinks.values()
    assert typ == "SaveAudio"
    audio = kwargs["audio"]
    assert type(audio) is dict and set(audio) == {"waveform", "sample_rate"}
    wav = audio["waveform"]
    assert wav.dtype == torch.float32 and wav.dim() == 3 and wav.shape[:2] == (1, 1) and wav.shape[-1] > 0
    assert audio["sample_rate"] == 32000 and torch.isfinite(wav).all() and wav.abs().max() <= 1.0


def test_best_of_four_runs_node_by_node_and_keeps_the_best_clip(ref, ours, monkeypatch, tmp_path):
    from tiny_clap import tiny_clap
    tiny_clap(tmp_path / "clap" / "larger_clap_music")
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(ref))
    monkeypatch.setenv("MAGNET_TEXT_ENCODERS_DIR", str(ref))
    monkeypatch.setenv("MAGNET_CLAP_DIR", str(tmp_path / "clap"))
    wf = load(workflow("best_of_four"))
    sinks = run_graph(wf, ours, {"MagnetModelLoader": {"release": "magnet-music"},
                                 "MagnetSampler": {"decoding_steps": "3,2,2,2"}})
    by_type = {typ: kwargs for typ, kwargs in sinks.values()}
    assert set(by_type) == {"SaveAudio", "PreviewAny"}
    assert by_type["SaveAudio"]["audio"]["waveform"].shape[:2] == (1, 1)
    scores = by_type["PreviewAny"]["source"]             # the scores show on the canvas
    assert isinstance(scores, str) and scores.count("CLAP") == 4 and scores.count("(kept)") == 1


def test_the_templates_sample_with_the_releases_own_settings(ours):
    """The examples leave every sampling setting at the release's own ('auto', -1, 'release'), so a 30 s release
    gets its 60,10,10,10 and the sound-effect template audio-magnet's temperature 3.5, top_p 0.8, guidance 20."""
    widgets = load_pack().nodes.common.SAMPLING_WIDGETS
    own = {name: opts["default"] for name, (_, opts) in widgets.items() if name != "fast"}
    assert set(own.values()) == {"auto", -1, "release"}
    checked = 0
    for path in WORKFLOWS:
        for n in load(path)["nodes"]:
            if n["type"] in ours and "decoding_steps" in ours[n["type"]].INPUT_TYPES().get("optional", {}):
                names = [name for name, _, opts in widget_inputs(ours[n["type"]])
                         for name in ([name, "control"] if opts.get("control_after_generate") else [name])]
                values = dict(zip(names, n["widgets_values"]))
                assert {k: values[k] for k in own} == own, (path.name, n["type"])
                checked += 1
    assert checked >= len(WORKFLOWS)
