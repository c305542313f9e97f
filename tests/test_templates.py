"""The templates as a newcomer meets them in ComfyUI: each explains itself in a Markdown note, opens with its
whole graph in view, shows its prompt where it is used, and has a thumbnail of its own output that no other
template's thumbnail looks like."""
import itertools
import re

import numpy as np
import pytest

from jpeg_dc import luma_blocks
from pack import widget_inputs
from test_workflows import WORKFLOWS, load

TITLE_H = 30                      # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above pos[1]
CANVAS = (0, 80, 1600, 900)       # the canvas a 1600 x 900 window leaves below ComfyUI's menu bar and tabs
MIN_SCALE = 0.6                   # below this the widgets' text is too small to read
# loader widget -> the models folder its choice lives in
MODEL_FOLDERS = {("MagnetModelLoader", 0): "magnet", ("MagnetMusicGenLoader", 0): "magnet",
                 ("MagnetTextEncoderLoader", 0): "text_encoders", ("MagnetClapLoader", 0): "clap"}


@pytest.fixture(scope="module")
def ours():
    from pack import load_pack
    return load_pack().NODE_CLASS_MAPPINGS


def boxes(wf):
    """Each node's box in graph units, title bar included: (x0, y0, x1, y1)."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in wf["nodes"]}


def note_of(wf):
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1, f"{len(notes)} Markdown notes (want one)"
    text, = notes[0]["widgets_values"]
    return text


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_template_has_a_note_naming_its_models_their_folders_and_the_download_command(path):
    wf = load(path)
    text = note_of(wf)
    assert text.startswith("## "), "the note opens with the workflow's title as a heading"
    named = 0
    for n in wf["nodes"]:
        for (typ, slot), folder in MODEL_FOLDERS.items():
            if n["type"] == typ:
                name = n["widgets_values"][slot]
                assert f"`{folder}/{name}/`" in text, f"the note does not say where {name} goes"
                assert f"python -m magnet download {name}" in text, f"the note lacks the command for {name}"
                named += 1
    assert named >= 2
    assert "`download`" in text and "`if missing`" in text      # the loaders fetch them on first use
    assert "**Worth changing**" in text


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_download_command_in_a_note_is_one_the_cli_takes_and_fills_the_folder_named(path):
    from magnet import hub
    from magnet.__main__ import _parser
    rows = re.findall(r"^- `([^`]+)/`: `python -m magnet (download .+?)`$", note_of(load(path)), re.M)
    assert rows, "no download command in the note"
    for folder, args in rows:
        a = _parser().parse_args(args.split())
        _, kind, short = hub.resolve_name(a.name)            # an unknown name raises MagnetError
        assert a.models_dir == "ComfyUI/models" and a.dir is None, args
        assert hub.default_folder(kind, short, a.models_dir).as_posix() == f"ComfyUI/models/{folder}", (folder, args)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_template_opens_with_its_whole_graph_in_view_at_a_readable_scale(path):
    """The saved view (extra.ds): canvas = (graph + offset) * scale must hold every node, title included."""
    wf = load(path)
    ds = wf["extra"]["ds"]
    s, (ox, oy) = ds["scale"], ds["offset"]
    assert MIN_SCALE <= s <= 1.5, s
    cx0, cy0, cx1, cy1 = CANVAS
    for nid, (x0, y0, x1, y1) in boxes(wf).items():
        a, b = ((x0 + ox) * s, (y0 + oy) * s), ((x1 + ox) * s, (y1 + oy) * s)
        assert cx0 <= a[0] and b[0] <= cx1 and cy0 <= a[1] and b[1] <= cy1, \
            f"node {nid} spans canvas {a}..{b}, outside {CANVAS}"


def frontend_height(cls) -> int:
    """The least height ComfyUI's frontend (1.2x, ComfyUI 0.3.64) gives one of our nodes on load: 20 per row of
    sockets (inputs beside outputs), 24 per widget (a seed's control counts), 14 of margin; it grows a node
    saved smaller. Nodes with a multiline text box size it by the box (0 here)."""
    widgets = widget_inputs(cls)
    if any(opts.get("multiline") for _, _, opts in widgets):
        return 0
    names = {name for name, _, _ in widgets}
    spec = cls.INPUT_TYPES()
    sockets = [n for section in ("required", "optional") for n in spec.get(section, {}) if n not in names]
    rows = sum(2 if opts.get("control_after_generate") else 1 for _, _, opts in widgets)
    return max(len(sockets), len(cls.RETURN_TYPES)) * 20 + rows * 24 + 14


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_is_saved_at_least_as_tall_as_the_frontend_draws_it(ours, path):
    """Otherwise the frontend grows it on load, over the node below it and out of the saved view."""
    for n in load(path)["nodes"]:
        if n["type"] in ours:
            assert n["size"][1] >= frontend_height(ours[n["type"]]), (n["id"], n["type"], n["size"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_two_nodes_of_a_template_overlap(path):
    gap = 10                                           # and none touches the next
    for (i, a), (j, b) in itertools.combinations(boxes(load(path)).items(), 2):
        apart = a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
        assert apart, f"nodes {i} and {j} overlap: {a} {b}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_a_shared_text_node_is_titled_as_the_prompt_and_sits_beside_its_first_user(path):
    """A text widget fed by a link shows greyed and empty on its node: the node feeding it must say it is the
    prompt, show the text, and sit next to where the text is used."""
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    box = boxes(wf)
    for link_id, a, _, b, slot, typ in wf["links"]:
        if typ == "STRING" and nodes[b]["inputs"][slot].get("widget"):
            src = nodes[a]
            if src["type"] == "PrimitiveStringMultiline":
                assert "prompt" in src.get("title", "").lower(), "the shared text node's title names the prompt"
                assert src["widgets_values"][0].strip(), "the shared prompt is empty"
    users = {}
    for link_id, a, _, b, slot, typ in wf["links"]:
        if nodes[a]["type"] == "PrimitiveStringMultiline":
            users.setdefault(a, []).append(b)
    for a, bs in users.items():
        near = min(max(box[b][0] - box[a][2], box[a][0] - box[b][2], box[b][1] - box[a][3], box[a][1] - box[b][3])
                   for b in bs)
        assert near <= 80, f"the prompt node is {near} units from the nearest node that reads it"


def test_best_of_four_prompt_feeds_both_the_encoder_and_the_ranker():
    wf = load(next(p for p in WORKFLOWS if p.stem.endswith("best_of_four")))
    nodes = {n["id"]: n for n in wf["nodes"]}
    fed = {nodes[b]["type"] for _, a, _, b, _, _ in wf["links"] if nodes[a]["type"] == "PrimitiveStringMultiline"}
    assert fed == {"MagnetTextEncode", "MagnetClapRank"}


def _thumb(path):
    """A template's thumbnail as 16 x 16 mean luma (0..255) from the JPEG's 8x8 block means."""
    g = luma_blocks(path.with_suffix(".jpg"))
    rows, cols = (g.shape[0] // 16) * 16, (g.shape[1] // 16) * 16
    g = g[:rows, :cols]
    return g.reshape(16, rows // 16, 16, cols // 16).mean(axis=(1, 3))


def test_the_luma_reader_sees_a_picture_not_noise():
    """The reader the thumbnail test relies on: the title band at the top is brighter text on a dark
    background and the picture differs from a flat grey."""
    g = luma_blocks(WORKFLOWS[0].with_suffix(".jpg"))
    assert g.shape[0] >= 16 and g.shape[1] >= 16 and g.std() > 10


def test_no_two_thumbnails_look_alike():
    """The template browser's cards must be told apart: every pair differs by a mean of >= 12 grey levels
    at 16 x 16."""
    small = {p.stem: _thumb(p) for p in WORKFLOWS}
    for (a, x), (b, y) in itertools.combinations(small.items(), 2):
        diff = float(np.abs(x - y).mean())
        assert diff >= 12, f"{a}.jpg and {b}.jpg look alike (mean difference {diff:.1f} grey levels)"


def test_thumbnails_keep_the_browser_size():
    for p in WORKFLOWS:
        g = luma_blocks(p.with_suffix(".jpg"))
        assert g.shape == (80, 80), (p.stem, g.shape)              # 640 x 640, like every card


def test_thumbnails_leave_the_corner_under_the_newer_browsers_badge_empty():
    """The template browser of newer frontends (1.49, ComfyUI 0.33) draws a "Node graph" badge over a card's
    top-left corner: up to 372 x 112 of the 640 px thumbnail on its smallest card, hover zoom included
    (scripts/make_thumbnails.py BADGE). The title must not be drawn there: the corner is plain background."""
    for p in WORKFLOWS:
        corner = luma_blocks(p.with_suffix(".jpg"))[:112 // 8, :372 // 8]
        assert float(corner.max() - corner.min()) < 3, f"{p.stem}.jpg draws under the badge"
