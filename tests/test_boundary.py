"""The generation boundary: every entry checks its inputs once and returns the seed it used, the release's
own sampling settings by default, the span arrangement in one place, no import cycle in the engine, and
the refusals of bad inputs (through the public API)."""
from __future__ import annotations

import ast
import math
import re
import time
from pathlib import Path

import pytest
import torch

import magnet.arguments as arguments
import magnet.model as model_mod
import magnet.sampling as sampling_mod
from magnet import edit
from magnet.errors import MagnetError
from magnet.model import Generated, MagnetModel
from magnet.sampling import MUSIC_DEFAULTS, RELEASE_KEYS, SamplingParams, SpanArrangement

STEPS = (3, 2, 2, 2)
MAGNET = Path(__file__).resolve().parents[1] / "magnet"


@pytest.fixture(scope="module")
def clip(music_model):
    return music_model.generate(["x"], seed=0, decoding_steps=STEPS, duration=1.6)      # 80 frames


# -- no import cycle --------------------------------------------------------------------------------

def _engine_imports() -> dict[str, set[str]]:
    """{module: the magnet modules it imports}, from every import statement of magnet/**/*.py, at module level
    and inside functions (`from . import x`, `from .x import y`, `from ..x import y`, `import magnet.x`,
    `from magnet.x import y`). Modules of subpackages are named by their dotted path (`doctor.checks`; a
    package's `__init__` by the package's name)."""
    def name(path: Path) -> str:
        parts = list(path.relative_to(MAGNET).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
    paths = {name(p): p for p in MAGNET.rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        package = mod.split(".") if path.name == "__init__.py" and mod != "__init__" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                elif (node.module or "").split(".")[0] == "magnet":
                    base = []
                else:
                    continue
                parts = base + [p for p in (node.module or "").split(".")[(0 if node.level else 1):] if p]
                for a in node.names:             # `from . import edit`: the module edit; `from .x import y`: x
                    sub = ".".join(parts + [a.name])
                    deps.add(sub if sub in paths else ".".join(parts))
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("magnet.")}
        graph[mod] = {d for d in deps if d in paths and d != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = 2
        return None
    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_engine_has_no_import_cycle_at_module_or_function_level():
    graph = _engine_imports()
    assert "edit" in graph["model"] and "arguments" in graph["edit"]     # the parse sees the imports
    assert "model" not in graph["edit"]       # the model's editing methods delegate down to edit, never up
    assert "cli.common" in graph["cli.generate"] and "cli" in graph["__main__"]       # and the subpackages'
    assert {"doctor.checks", "stage_forward"} <= graph["doctor"] | graph["doctor.checks"]
    assert "model" in graph["doctor.checks"]                              # `from ..model import` inside a function
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_decoding_forward_depends_one_way():
    """The LM (the specification) imports nothing of the forward that decoding runs on it; the linear layers and
    the CUDA graphs know nothing of the stage forward that uses them."""
    graph = _engine_imports()
    assert not graph["transformer"] & {"stage_forward", "linears", "cuda_graphs", "sampling"}
    assert "stage_forward" not in graph["linears"] | graph["cuda_graphs"] | graph["lowp"]
    assert {"linears", "cuda_graphs", "transformer"} <= graph["stage_forward"]


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"model": {"edit"}, "edit": {"longform"}, "longform": {"model"}}) is not None
    assert _cycle({"model": {"longform"}, "edit": {"model", "longform"}, "longform": set()}) is None


# -- the seed comes back ---------------------------------------------------------------------------

def _entries(m, clip):
    """(name, public call, *_from_condition call) of every generation, each taking a seed."""
    cond = m.encode_text(["x"])
    p = m.sampling_params(decoding_steps=STEPS)
    return [
        ("generate", lambda s, **k: m.generate(["x"], duration=2.6, seed=s, decoding_steps=STEPS, **k),
         lambda s: m.generate_from_condition(cond, frames=130, params=p, seed=s)),
        ("regenerate", lambda s, **k: m.regenerate(clip, 0.4, 0.8, "x", seed=s, decoding_steps=STEPS, **k),
         lambda s: m.regenerate_from_condition(cond, clip, 0.4, 0.8, params=p, seed=s)),
        ("vary", lambda s, **k: m.vary(clip, "x", strength=0.5, seed=s, decoding_steps=STEPS, **k),
         lambda s: edit.vary_from_condition(m, cond, clip, strength=0.5, params=p, seed=s)),
        ("loopify", lambda s, **k: m.loopify(clip, "x", seed=s, decoding_steps=STEPS, **k),
         lambda s: edit.loopify_from_condition(m, cond, clip, params=p, seed=s)),
        ("generate_loop", lambda s, **k: m.generate_loop("x", duration=1.2, seed=s, decoding_steps=STEPS, **k),
         lambda s: edit.generate_loop_from_condition(m, cond, frames=60, params=p, seed=s)),
        ("generate_timeline", lambda s, **k: m.generate_timeline("0:00 x\n0:01 y", duration=2.6, seed=s,
                                                                  decoding_steps=STEPS, **k),
         lambda s: edit.generate_timeline_from_condition(m, edit.encode_timeline(m, "0:00 x\n0:01 y"), frames=130,
                                                         params=p, seed=s)),
    ]


def test_every_generation_returns_the_seed_it_used(music_model, clip):
    m = music_model
    for name, public, from_condition in _entries(m, clip):
        out = from_condition(None)
        assert isinstance(out, Generated) and isinstance(out.seed, int), name
        again = public(out.seed)
        assert isinstance(again, torch.Tensor) and torch.equal(again, out.codes), name
        assert m.last_seed == out.seed, name                # kept for compatibility
        both = public(out.seed, return_seed=True)
        assert isinstance(both, Generated) and both.seed == out.seed and torch.equal(both.codes, out.codes), name


def test_the_seed_is_made_and_recorded_in_one_place(music_model):
    source = "\n".join(p.read_text() for p in MAGNET.rglob("*.py"))
    assert len(re.findall(r"(?<!def )make_generator\(seed", source)) == 1 and source.count(".last_seed = ") == 1


# -- each check once -------------------------------------------------------------------------------

class Counts:
    """How often each check runs (on what), with the generator count, while installed."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, list] = {}
        for owner, name in [(model_mod, "codes_arg"), (model_mod.CodecLM, "prompt_list"),
                            (model_mod.CodecLM, "check_condition"), (model_mod.CodecLM, "check_prompt_codes"),
                            (model_mod.CodecLM, "seeded"), (MagnetModel, "overlap_frames"),
                            (MagnetModel, "_region_frames"), (MagnetModel, "check_frames")]:
            self._wrap(monkeypatch, owner, name)
        real_replace = sampling_mod.replace       # a full SamplingParams check ends in one replace(...)
        monkeypatch.setattr(sampling_mod, "replace", lambda obj, **kw: (
            self.calls.setdefault("SamplingParams.check", []).append(id(obj)), real_replace(obj, **kw))[1])

    def _wrap(self, monkeypatch, owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            subject = args[1] if isinstance(owner, type) and len(args) > 1 else args[0] if args else None
            self.calls.setdefault(name, []).append(id(subject))
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    def repeated(self) -> dict:
        """The checks that ran more than once on the same input."""
        return {k: v for k, v in self.calls.items() if len(v) != len(set(v)) or (k == "seeded" and len(v) > 1)}


def test_every_entry_checks_each_input_once(music_model, clip, monkeypatch):
    m = music_model
    for name, public, from_condition in _entries(m, clip):
        for form, call in (("public", public), ("from_condition", from_condition)):
            counts = Counts(monkeypatch)
            call(1)
            monkeypatch.undo()
            assert counts.calls.get("seeded") == counts.calls["seeded"][:1], f"{name} {form}: one generator"
            assert not counts.repeated(), f"{name} {form} checked again: {counts.repeated()}"
            assert len(counts.calls.get("SamplingParams.check", [])) <= 1, f"{name} {form}"


def test_a_checked_object_passes_the_inner_layers_unchecked(music_model, clip, monkeypatch):
    m = music_model
    p = m.sampling_params(decoding_steps=STEPS)
    counts = Counts(monkeypatch)
    edit.vary_from_condition(m, m.encode_text(["x"]), clip, strength=0.5, params=p, seed=0)
    m.regenerate_from_condition(m.encode_text(["x"]), clip, 0.2, 0.6, params=p, seed=0)
    monkeypatch.undo()
    assert "SamplingParams.check" not in counts.calls and len(counts.calls["codes_arg"]) == 2


# -- the release's own sampling settings -----------------------------------------------------------

def _stored(model) -> dict:
    d = model.generation_defaults
    return {name: d[RELEASE_KEYS.get(name, name)] for name in MUSIC_DEFAULTS}


def test_generate_runs_the_releases_stored_sampling_values(audio_model):
    m = audio_model
    stored = _stored(m)
    differ = {k for k in MUSIC_DEFAULTS if stored[k] != MUSIC_DEFAULTS[k]}
    assert differ, "the audio fixture stores the music values: the test could not tell them apart"
    kw = dict(duration=1.0, seed=3, decoding_steps=STEPS)
    own = m.generate(["dog barking"], **kw)
    assert torch.equal(own, m.generate(["dog barking"], **kw, **stored))
    assert not torch.equal(own, m.generate(["dog barking"], **kw, **MUSIC_DEFAULTS))
    checked = SamplingParams().check(m.cfg.n_q, m.generation_defaults)
    assert {k: getattr(checked, k) for k in MUSIC_DEFAULTS} == stored
    assert checked.decoding_steps == tuple(m.generation_defaults["decoding_steps"])


def test_explicit_values_win_and_missing_or_unusable_stored_values_fall_back_to_the_music_ones():
    stored = {"temp": 3.5, "top_p": 0.8, "max_cfg_coef": 20.0, "span_arrangement": "diagonal", "top_k": True}
    p = SamplingParams(temperature=1.0).check(4, stored)
    assert (p.temperature, p.top_p, p.max_cfg_coef) == (1.0, 0.8, 20.0)
    assert (p.span_arrangement, p.top_k, p.min_cfg_coef, p.span_scoring) == ("nonoverlap", 0, 1.0, "max")
    q = SamplingParams().check(4)
    assert {k: getattr(q, k) for k in MUSIC_DEFAULTS} == MUSIC_DEFAULTS and q.decoding_steps == (20, 10, 10, 10)


def test_the_release_steps_default_serves_the_hybrid_path(music_model):
    p = SamplingParams(decoding_steps=None).check(music_model.cfg.n_q, music_model.generation_defaults)
    assert p.decoding_steps == tuple(music_model.generation_defaults["decoding_steps"])
    assert music_model.sampling_params(SamplingParams(decoding_steps=None)).temperature == 3.0


# -- the span arrangement ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,span_len,unit", [("nonoverlap", 3, 3), ("stride1", 3, 1), ("nonoverlap", 1, 1)])
def test_a_span_arrangement_owns_its_unit_trimming_and_window(name, span_len, unit):
    a = SpanArrangement(name, span_len)
    assert a.unit == unit and a.trim(101) == 101 - 101 % unit and a.usable_window(100) == 100 - 100 % unit
    assert a.room(100) == a.usable_window(100) - span_len
    assert a.whole_spans == (unit > 1) and a.stride1 == (name == "stride1" and span_len > 1)


def test_nonoverlap_decodings_are_trimmed_to_whole_spans_and_stride1_ones_not(music_model):
    m = music_model
    assert m.generate(["x"], duration=1.0, seed=0, decoding_steps=STEPS).shape[-1] == 48
    assert m.generate(["x"], duration=1.0, seed=0, decoding_steps=STEPS, span_arrangement="stride1").shape[-1] == 50


# -- bad inputs, refused with a MagnetError --------------------------------------------------------

@pytest.mark.parametrize("prompts", [None, [], 5, {"a": 1}])
def test_every_public_entry_refuses_missing_or_odd_prompts(music_model, clip, prompts):
    m = music_model
    calls = [lambda: m.generate(prompts, duration=1.0), lambda: m.regenerate(clip, 0.2, 0.6, prompts),
             lambda: m.vary(clip, prompts, strength=0.5), lambda: m.generate_loop(prompts, duration=1.2),
             lambda: m.loopify(clip, prompts), lambda: m.generate_timeline(prompts, duration=1.0)]
    for call in calls:
        with pytest.raises(MagnetError):
            call()


@pytest.mark.parametrize("bad", [None, "x", torch.zeros(1, 4, 0, dtype=torch.long),
                                 torch.zeros(0, 4, 20, dtype=torch.long), torch.zeros(1, 4, 20)])
def test_every_codes_entry_refuses_missing_empty_or_odd_codes(music_model, bad):
    m = music_model
    cond = m.encode_text(["x"])
    calls = [lambda: m.regenerate(bad, 0.0, 0.2, "x"), lambda: m.vary(bad, "x", strength=0.5),
             lambda: m.loopify(bad, "x"), lambda: m.decode_loop(bad), lambda: edit.decode_loop(m.codec, bad),
             lambda: m.regenerate_from_condition(cond, bad, 0.0, 0.2),
             lambda: edit.vary_from_condition(m, cond, bad, strength=0.5),
             lambda: edit.loopify_from_condition(m, cond, bad)]
    for call in calls:
        with pytest.raises(MagnetError):
            call()


@pytest.mark.parametrize("cond,frames", [(None, 50), ("x", 50), ("text", None), ("text", 1), ("text", 2.5),
                                         ("text", True)])
def test_from_condition_forms_refuse_odd_conditioning_and_frames(music_model, cond, frames):
    m = music_model
    cond = m.encode_text(["x"]) if cond == "text" else cond
    with pytest.raises(MagnetError):
        m.generate_from_condition(cond, frames=frames, params=None)
    with pytest.raises(MagnetError):
        edit.generate_loop_from_condition(m, cond, frames=frames)


def test_decode_loop_refuses_empty_codes(music_model):
    for bad in (torch.zeros(0, 4, 60, dtype=torch.long), torch.zeros(1, 4, 0, dtype=torch.long)):
        with pytest.raises(MagnetError, match="codes have shape"):
            music_model.decode_loop(bad)


def test_decode_loop_estimates_huge_repeats_before_decoding(music_model, clip, monkeypatch):
    m = music_model

    def never(*a, **k):
        raise AssertionError("decoded before the size was checked")
    monkeypatch.setattr(m.codec, "decode", never)
    with pytest.raises(MagnetError, match="repeats"):
        m.decode_loop(clip, repeats=10 ** 7)
    monkeypatch.setattr(arguments, "available_bytes", lambda device: 2 ** 20)     # 1 MiB free
    with pytest.raises(MagnetError, match="GiB"):
        m.decode_loop(clip, repeats=100)


@pytest.mark.parametrize("line", ["1:30,5 drums", "0:01:30:12 drums", "1:75 drums", "12.5thunder", "1:5 drums",
                                  "1:30: drums", "1. drums", "1:02:03:04"])
def test_timeline_times_parse_strictly_and_errors_name_the_line(line):
    with pytest.raises(MagnetError, match="timeline line " + repr(line).replace(".", r"\.")):
        edit.parse_timeline("0:00 intro\n" + line)


def test_timeline_times_with_a_decimal_dot_parse():
    assert edit.parse_timeline("0:00 a\n1:30.5 b\n1:02:03.25 | c\n4000.5 - d") == [
        (0.0, "a"), (90.5, "b"), (3723.25, "c"), (4000.5, "d")]


def test_five_thousand_one_frame_sections_are_refused_before_any_work(music_model, monkeypatch):
    m = music_model
    timeline = [(i / m.frame_rate, "p") for i in range(5000)]            # one frame each, 100 s

    def no_work(*a, **k):
        raise AssertionError("work started before the timeline's cost was checked")
    started = time.perf_counter()
    monkeypatch.setattr(m.text_encoder, "encode", no_work)
    monkeypatch.setattr(m.lm, "forward", no_work)
    with pytest.raises(MagnetError, match="must last at least"):
        m.generate_timeline(timeline, duration=100.0, decoding_steps=STEPS)
    monkeypatch.undo()
    cond = edit.encode_timeline(m, timeline)                               # one prompt: encoded once
    monkeypatch.setattr(m.lm, "forward", no_work)
    with pytest.raises(MagnetError, match="must last at least"):
        edit.generate_timeline_from_condition(m, cond, frames=5000, params=m.sampling_params(decoding_steps=STEPS))
    assert time.perf_counter() - started < 10


def test_a_timeline_costs_at_most_a_stated_multiple_of_a_plain_generation(music_model):
    m = music_model
    seconds = m.max_frames / m.frame_rate                  # within the first window: each section one decoding
    step = seconds / (edit.MAX_COST + 1)
    many = "\n".join(f"{i * step:.2f} p{i}" for i in range(edit.MAX_COST + 1))
    with pytest.raises(MagnetError, match=f"at most {edit.MAX_COST} times"):
        m.generate_timeline(many, duration=seconds, decoding_steps=STEPS)
    params = m.sampling_params(decoding_steps=STEPS)
    plan = edit.timeline_plan(m, edit.parse_timeline("0:00 a\n0:01 b\n0:02 c"), 145, params)
    assert plan.decodings == 3 and len(plan.runs) == 3
    assert len(edit.timeline_plan(m, edit.parse_timeline("0:00 a\n2.8 b"), 145, params).runs) == 2   # a short end
    with pytest.raises(MagnetError, match="section at 2.2 s .* but the last must last at least"):
        edit.timeline_plan(m, edit.parse_timeline("0:00 a\n2.2 b\n2.4 c"), 145, params)


def test_the_nan_guard_names_the_codebook_being_decoded(music_model, clip, monkeypatch):
    m = music_model
    real = m.lm.forward
    monkeypatch.setattr(m.lm, "forward", lambda *a, **k: real(*a, **k) * math.nan)
    with pytest.raises(MagnetError, match="decoding codebook 2:"):
        m.vary(clip, "x", strength=1.0, keep_codebooks=2, seed=0, decoding_steps=STEPS)
    with pytest.raises(MagnetError, match="decoding codebook 0:"):
        m.vary(clip, "x", strength=1.0, keep_codebooks=0, seed=0, decoding_steps=STEPS)


def test_the_editing_methods_are_the_models_own_with_the_edit_functions_signatures():
    import inspect
    from magnet import edit
    for name in ("vary", "generate_loop", "loopify", "decode_loop", "generate_timeline"):
        method = MagnetModel.__dict__[name]            # defined in the class body, not bound on from outside
        own = list(inspect.signature(method).parameters.values())[1:]
        theirs = list(inspect.signature(getattr(edit, name)).parameters.values())[1:]
        assert [(p.name, p.kind, p.default) for p in own] == [(p.name, p.kind, p.default) for p in theirs], name


def test_nothing_outside_model_py_assigns_onto_the_model_classes():
    import re
    pattern = re.compile(r"setattr\(\s*(MagnetModel|CodecLM|MusicGenModel)\b|\b(MagnetModel|CodecLM)\.\w+\s*=[^=]")
    for path in [*MAGNET.rglob("*.py"), *(MAGNET.parent / "nodes").rglob("*.py")]:
        if path.name != "model.py":
            assert not pattern.search(path.read_text()), path
