"""The LoRA nodes: MAGNeT LoRA Loader (ComfyUI's weight patches on a ModelPatcher clone; the engine's with_lora
outside ComfyUI) and MAGNeT Train LoRA, run as plain Python on the reference models.

ComfyUI is not installed here, so its side is played by `FakePatcher` / `FakeMM` / `FakeComfyLora` below:
our reading of comfy/model_patcher.py, comfy/model_management.py and comfy/lora.py, restricted to what a LoRA
touches and following their rules (a patch is accepted only for a key of the module's state_dict(); weights
are patched module by module as `<module name>.<parameter>` for modules holding parameters of their own and
none in their children; a LoRA patch adds strength * alpha / rank * up @ down in float32 and is cast back;
the original tensors are kept as a backup shared by all clones and put back when another clone of the same
module is loaded)."""
from __future__ import annotations

import io
import math
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pack import widget_inputs

LORA_RANK = 4


# -- ComfyUI, as far as a LoRA goes ---------------------------------------------------------------------------

def get_attr(obj, key):
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_param(obj, key, value):
    *path, last = key.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, torch.nn.Parameter(value, requires_grad=False))


def calculate_weight(patches, weight, key):
    """comfy.lora.calculate_weight for LoRA patches: weight += ((strength * alpha / rank) * up @ down), cast to
    the weight's dtype, patch after patch."""
    for strength, value, strength_model, offset, function in patches:
        kind, (up, down, alpha, mid, dora_scale, reshape) = value
        assert kind == "lora" and mid is None and dora_scale is None and reshape is None and offset is None
        if strength_model != 1.0:
            weight *= strength_model
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.to(weight.device, torch.float32).flatten(start_dim=1),
                        down.to(weight.device, torch.float32).flatten(start_dim=1)).reshape(weight.shape)
        weight += ((strength * scale) * diff).type(weight.dtype)
    return weight


class FakeComfyLora:
    """comfy.lora.load_lora for the regular LoRA naming: {x}.lora_up.weight, {x}.lora_down.weight, {x}.alpha."""

    @staticmethod
    def load_lora(lora, to_load, log_missing=True):
        out = {}
        for x, key in to_load.items():
            up = lora.get(f"{x}.lora_up.weight")
            if up is None:
                continue
            alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
            out[key] = ("lora", (up, lora[f"{x}.lora_down.weight"], alpha, None, None, None))
        return out


class FakePatcher:
    """comfy.model_patcher.ModelPatcher: clone / add_patches / partially_load / unpatch_model / detach."""

    def __init__(self, model, load_device="cpu", offload_device="cpu"):
        self.model, self.load_device, self.offload_device = model, torch.device(load_device), torch.device(offload_device)
        self.patches, self.backup, self.patches_uuid, self.parent = {}, {}, uuid.uuid4(), None
        for attr, value in (("current_weight_patches_uuid", None), ("model_loaded_weight_memory", 0)):
            if not hasattr(model, attr):
                setattr(model, attr, value)

    def clone(self):
        n = FakePatcher(self.model, self.load_device, self.offload_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid, n.backup, n.parent = self.patches_uuid, self.backup, self
        return n

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_sd = self.model.state_dict()
        accepted = []
        for k in patches:
            if k in model_sd:
                accepted.append(k)
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model, None, None))
        self.patches_uuid = uuid.uuid4()
        return accepted

    def patch_weight_to_device(self, key, device_to=None):
        if key not in self.patches:
            return
        weight = get_attr(self.model, key)
        if key not in self.backup:
            self.backup[key] = weight.to(device=self.offload_device)
        out = calculate_weight(self.patches[key], weight.to(torch.float32, copy=True), key)
        set_attr_param(self.model, key, out.to(weight.dtype))

    def load(self, device_to):
        for n, m in self.model.named_modules():            # ModelPatcher._load_list
            own = [name for name, _ in m.named_parameters(recurse=False)]
            if not own or any(name not in own for name, _ in m.named_parameters()):
                continue
            for param in own:
                self.patch_weight_to_device(f"{n}.{param}" if n else param, device_to)
        self.model.to(device_to)
        self.model.current_weight_patches_uuid = self.patches_uuid
        self.model.model_loaded_weight_memory = 1

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for k, w in list(self.backup.items()):
                set_attr_param(self.model, k, w)
            self.backup.clear()
            self.model.current_weight_patches_uuid = None
            self.model.model_loaded_weight_memory = 0

    def partially_load(self, device_to):
        current = self.model.current_weight_patches_uuid
        self.unpatch_model(unpatch_weights=current is not None and current != self.patches_uuid)
        if self.model.model_loaded_weight_memory > 0:
            return
        self.load(device_to)

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=True)


class FakeMM:
    """comfy.model_management: load_models_gpu drops loaded clones of the same module (without unpatching,
    as ComfyUI does) and loads each patcher; Cancel through processing_interrupted / throw_..."""

    class InterruptProcessingException(Exception):
        pass

    def __init__(self):
        self.loaded, self.interrupted, self.stop_after = [], False, None

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        for p in models:
            for q in [q for q in self.loaded if q is not p and p.is_clone(q)]:
                self.loaded.remove(q)
                q.detach(unpatch_all=False)
            p.partially_load(p.load_device)
            if p not in self.loaded:
                self.loaded.insert(0, p)

    def get_torch_device(self):
        return torch.device("cpu")

    def unet_offload_device(self):
        return torch.device("cpu")

    def intermediate_device(self):
        return torch.device("cpu")

    def processing_interrupted(self):
        return self.interrupted

    def throw_exception_if_processing_interrupted(self):
        if self.interrupted:
            self.interrupted = False
            raise self.InterruptProcessingException()


class FakeBar:
    def __init__(self, total):
        self.updates = []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total))


@pytest.fixture()
def in_comfy(pack, monkeypatch):
    """nodes.comfy as inside ComfyUI (the fakes above)."""
    comfy = pack.nodes.comfy
    fake = FakeMM()
    monkeypatch.setattr(comfy, "mm", fake)
    monkeypatch.setattr(comfy, "comfy_lora", FakeComfyLora)
    monkeypatch.setattr(comfy, "comfy", SimpleNamespace(utils=SimpleNamespace(ProgressBar=FakeBar)), raising=False)
    return fake


# -- models, LoRA files -----------------------------------------------------------------------------------------

def music(pack, ref):
    return pack.magnet.model.MagnetModel.from_pretrained(ref / "magnet-music", text_encoder=False, device="cpu",
                                                         dtype=torch.float32)


@pytest.fixture(scope="module")
def base(pack, ref):
    """The music fixture in float32 on the CPU, as the engine object a MAGNET_MODEL handle carries outside
    ComfyUI (never patched)."""
    return music(pack, ref)


def plain(pack, m):
    """A MAGNET_MODEL handle as the Model Loader makes it outside ComfyUI (no patcher)."""
    return pack.nodes.common.Handle(m, "magnet-music", [None])


@pytest.fixture(scope="module")
def comfy_model(pack, ref):
    """Another copy, and the ONE handle the Model Loader makes for it inside ComfyUI (cached: every LoRA clone
    is a clone of its patcher), with its pristine weights."""
    m = music(pack, ref)
    wrapped = pack.nodes.comfy.managed_class("MAGNeT LM (test)")(m.lm)
    return pack.nodes.common.Handle(m, "magnet-music", [FakePatcher(wrapped)]), weights(m)


@pytest.fixture()
def managed(pack, comfy_model, in_comfy):
    """The ComfyUI handle; afterwards, loading it again must give back the pristine weights."""
    handle, pristine = comfy_model
    yield handle
    used(pack, handle)
    assert same(weights(handle.obj), pristine)


def lora_file(pack, path, model, seed, *, rank=LORA_RANK, alpha=8.0, targets=None, scale=0.05):
    """A LoRA file with random factors (B not zero, so it changes the model) on `targets` of `model`'s LM."""
    lora = pack.magnet.lora
    targets = list(targets or lora.DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.lm.named_parameters())
    tensors = {}
    for name in lora.target_names(model.lm, targets):
        out_dim, in_dim = params[name + ".weight"].shape
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g) * scale
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * scale
    meta = lora.lora_meta(model, rank=rank, alpha=alpha, targets=targets, steps=3, train_loss=1.0)
    return lora.save_lora(path, tensors, meta)


@pytest.fixture()
def loras_dir(tmp_path, monkeypatch):
    d = tmp_path / "loras"
    d.mkdir()
    monkeypatch.setenv("MAGNET_LORAS_DIR", str(d))
    return d


def logits(m, seed=0):
    """The LM's logits for every stage (0: full attention, 1: the band) on fixed codes and text memory."""
    lm = m.lm
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.cfg.card, (2, lm.cfg.n_q, 23), generator=g)
    hidden = torch.randn(2, 5, lm.cfg.text_dim, generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    with torch.inference_mode():
        mem = lm.memory(hidden, mask)
        return torch.stack([lm(codes, mem, stage) for stage in (0, 1)])


def weights(m):
    return {k: v.detach().clone() for k, v in m.lm.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load(N, handle, lora, strength=1.0, **kw):
    return N["MagnetLoraLoader"]().load(handle, lora, strength, **kw)[0]


def used(pack, handle):
    """What a node that runs the model sees: the handle readied (ComfyUI loads its patcher), then its object."""
    return pack.nodes.common.ready(handle)[0]


# -- ComfyUI sees the weights by the names it patches ---------------------------------------------------------

def test_comfyui_sees_each_weight_under_the_module_that_holds_it(pack, base):
    wrapped = pack.nodes.comfy.managed_class("MAGNeT LM (test)")(base.lm)
    sd = wrapped.state_dict()
    held = {f"{n}.{p}" if n else p for n, m in wrapped.named_modules() for p, _ in m.named_parameters(recurse=False)}
    assert held <= set(sd)                                   # every parameter, as ComfyUI's loader addresses it
    assert "inner.transformer.layers.0.self_attn.in_proj.weight" in sd
    assert not any(k.endswith("in_proj_weight") for k in sd)
    # the LM's own state dict keeps the checkpoints' names (saving and loading releases is unchanged)
    assert "transformer.layers.0.self_attn.in_proj_weight" in base.lm.state_dict()


def test_every_lora_pair_maps_to_a_key_comfyui_patches(pack, base, loras_dir, managed):
    lora = pack.magnet.lora
    path = lora_file(pack, loras_dir / "every.safetensors", base, 1, targets=list(lora.TARGETS))
    patcher, prefix = pack.nodes.comfy.patcher_of(managed.patchers, managed.obj.lm)
    assert prefix == "inner."
    pairs = lora.load_lora(path).pairs()
    assert any("in_proj" in k for k in pairs) and any(k.startswith("linears.") for k in pairs)
    sd = patcher.model.state_dict()
    assert all(prefix + k in sd for k in pairs)


# -- the loader ---------------------------------------------------------------------------------------------

def test_loader_lists_none_first_then_the_files(N, loras_dir):
    (loras_dir / "b.safetensors").write_bytes(b"x")
    (loras_dir / "sub").mkdir()
    (loras_dir / "sub" / "a.safetensors").write_bytes(b"x")
    (loras_dir / "notes.txt").write_text("x")
    assert N["MagnetLoraLoader"].INPUT_TYPES()["required"]["lora"][0] == ["none", "b.safetensors", "sub/a.safetensors"]


def test_strength_zero_is_the_base_bit_for_bit(pack, N, base, loras_dir, managed):
    lora_file(pack, loras_dir / "style.safetensors", base, 1)
    for handle in (managed, plain(pack, base)):
        expected = logits(used(pack, handle))
        out = load(N, handle, "style.safetensors", 0.0)
        assert torch.equal(logits(used(pack, out)), expected)
    # ComfyUI's own math at strength 0 adds exact zeros too
    m = managed.obj
    patcher, prefix = pack.nodes.comfy.patcher_of(managed.patchers, m.lm)
    lora = pack.magnet.lora.load_lora(loras_dir / "style.safetensors")
    clone = pack.nodes.comfy.lora_clone(patcher, prefix, lora.pairs(), lora.alpha, 0.0)
    before, expected = weights(m), logits(m)
    used(pack, pack.nodes.common.Handle(m, "x", [clone]))
    assert len(clone.backup) == len(lora.pairs()) and same(weights(m), before)
    assert torch.equal(logits(m), expected)


def test_comfyui_patch_and_unpatch_leave_the_base_bit_identical(pack, N, base, loras_dir, managed):
    lora_file(pack, loras_dir / "style.safetensors", base, 2)
    m = managed.obj
    expected = logits(used(pack, managed))
    before = weights(m)
    out = load(N, managed, "style.safetensors", 1.0)
    assert same(weights(m), before)                         # the loader itself changes nothing
    assert out.obj is m and out.patchers[0] is not managed.patchers[0]
    assert managed.patchers[0].patches == {}                # nor the base handle's patcher
    patched = logits(used(pack, out))                        # ComfyUI loads the clone: patched weights
    assert not torch.allclose(patched, expected, atol=1e-3)
    assert not same(weights(m), before)
    assert torch.equal(logits(used(pack, managed)), expected)  # loading the base puts the weights back
    assert same(weights(m), before)
    assert torch.equal(logits(used(pack, out)), patched)     # and the LoRA clone again
    out.patchers[0].detach(unpatch_all=True)                 # ComfyUI unloading it
    assert same(weights(m), before) and torch.equal(logits(m), expected)


def test_a_comfyui_patch_after_fast_mode_is_made_from_the_exact_weights(pack, N, ref, loras_dir, in_comfy):
    """Fast mode holds the weights it copies as float16 records (magnet.lowp); ComfyUI computes a patch in the
    weight's own dtype, so the records are made exact again before it patches."""
    m = music(pack, ref)
    with torch.no_grad():                                   # float16 values, as a published release loads
        for p in m.lm.parameters():
            p.copy_(p.half().float())
    handle = pack.nodes.common.Handle(m, "magnet-music", [FakePatcher(pack.nodes.comfy.managed_class("LM")(m.lm))])
    lora_file(pack, loras_dir / "style.safetensors", m, 2)
    out = load(N, handle, "style.safetensors", 1.0)
    patched = logits(used(pack, out))
    expected = logits(used(pack, handle))                   # the base again (ComfyUI unpatches)
    pack.magnet.linears.fast_copy(m.lm, "bf16")            # fast mode ran on the base
    assert sum(pack.magnet.lowp.is_record(p) for p in m.lm.parameters()) >= 5 * m.lm.cfg.num_layers
    used(pack, out)                                         # ComfyUI patches the LoRA clone
    assert all(p.dtype == torch.float32 for p in m.lm.parameters())
    assert torch.equal(logits(m), patched)
    assert torch.equal(logits(used(pack, handle)), expected)


def test_engine_path_and_comfyui_patch_path_agree(pack, N, base, loras_dir, managed):
    lora_file(pack, loras_dir / "style.safetensors", base, 3, targets=list(pack.magnet.lora.TARGETS))
    base_logits = logits(base)
    for strength in (1.0, 0.6, -0.5):
        engine = logits(load(N, plain(pack, base), "style.safetensors", strength).obj)
        comfy = logits(used(pack, load(N, managed, "style.safetensors", strength)))
        assert (engine - comfy).abs().max() <= 1e-5, strength
        assert (engine - base_logits).abs().max() > 1e-2, strength
    assert torch.equal(logits(base), base_logits)


def test_two_loaders_stack_in_both_paths(pack, N, base, loras_dir, managed):
    lora_file(pack, loras_dir / "a.safetensors", base, 4)
    lora_file(pack, loras_dir / "b.safetensors", base, 5, targets=["linear1", "linear2", "self_attn.in_proj"])
    a = logits(used(pack, load(N, managed, "a.safetensors", 1.0)))
    stacked_handle = load(N, load(N, managed, "a.safetensors", 1.0), "b.safetensors", 0.7)
    assert len(stacked_handle.patchers) == 1
    stacked = logits(used(pack, stacked_handle))
    engine = logits(load(N, load(N, plain(pack, base), "a.safetensors", 1.0), "b.safetensors", 0.7).obj)
    assert (stacked - engine).abs().max() <= 1e-5
    assert (stacked - a).abs().max() > 1e-2
    # the other order gives the same model (the patches add up)
    other = logits(used(pack, load(N, load(N, managed, "b.safetensors", 0.7), "a.safetensors", 1.0)))
    assert (other - stacked).abs().max() <= 1e-5


def test_lora_name_input_wins_over_the_list_and_none_passes_through(pack, N, base, loras_dir):
    lora_file(pack, loras_dir / "trained.safetensors", base, 6)
    handle = plain(pack, base)
    assert load(N, handle, "none", 1.0) is handle
    by_name = load(N, handle, "none", 1.0, lora_name="trained.safetensors")
    by_stem = load(N, handle, "none", 1.0, lora_name="trained")
    assert torch.equal(logits(by_name.obj), logits(by_stem.obj))
    assert not torch.equal(logits(by_name.obj), logits(base))


def test_a_lora_trained_again_under_its_name_is_read_again(pack, N, base, loras_dir):
    cls = N["MagnetLoraLoader"]
    path = lora_file(pack, loras_dir / "style.safetensors", base, 7)
    first = cls.IS_CHANGED(lora="style.safetensors", strength=1.0)
    assert first and first == cls.IS_CHANGED(lora="none", strength=1.0, lora_name="style.safetensors")
    lora_file(pack, path, base, 8, rank=2)
    assert cls.IS_CHANGED(lora="style.safetensors", strength=1.0) != first


@pytest.fixture()
def refusal(pack, N, managed):
    def run(lora, strength=1.0, **kw):
        with pytest.raises(pack.magnet.errors.MagnetError) as info:
            load(N, managed, lora, strength, **kw)
        msg = str(info.value)
        assert msg.startswith("MAGNeT LoRA Loader: ") and msg.count("MAGNeT LoRA Loader") == 1, msg
        return msg
    return run


def test_a_lora_for_another_architecture_is_refused_naming_both(pack, ref, loras_dir, refusal):
    audio = pack.magnet.model.MagnetModel.from_pretrained(ref / "magnet-audio", text_encoder=False, device="cpu",
                                                          dtype=torch.float32)
    lora_file(pack, loras_dir / "sfx.safetensors", audio, 9)
    msg = refusal("sfx.safetensors")
    fp_audio = pack.magnet.lora.describe(pack.magnet.lora.fingerprint(audio.lm))
    assert fp_audio in msg and f"text width {audio.lm.cfg.text_dim}" in msg


def test_nan_tensors_no_metadata_bad_strength_and_missing_files_are_refused(pack, base, loras_dir, refusal):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    good = lora_file(pack, loras_dir / "good.safetensors", base, 10)
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    bad = dict(tensors)
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(loras_dir / "nan.safetensors"), metadata=meta)
    assert "NaN" in refusal("nan.safetensors")
    save_file(tensors, str(loras_dir / "image_lora.safetensors"))      # an image-model LoRA: no metadata of ours
    assert "not a MAGNeT LoRA" in refusal("image_lora.safetensors")
    for strength in (float("nan"), float("inf"), -float("inf")):
        assert "finite" in refusal("good.safetensors", strength)
    assert "was not found" in refusal("none", lora_name="missing.safetensors")
    for outside in ("../good.safetensors", str(good), "sub/../../good.safetensors"):   # only inside the folders
        assert "was not found" in refusal("none", lora_name=outside)


def test_a_lora_file_may_be_a_link_to_one_kept_elsewhere(pack, N, base, loras_dir, tmp_path):
    elsewhere = lora_file(pack, tmp_path / "kept" / "style.safetensors", base, 12)
    (loras_dir / "linked.safetensors").symlink_to(elsewhere)
    assert "linked.safetensors" in N["MagnetLoraLoader"].INPUT_TYPES()["required"]["lora"][0]
    assert not torch.equal(logits(load(N, plain(pack, base), "linked.safetensors").obj), logits(base))


# -- the trainer --------------------------------------------------------------------------------------------

def pack_train_settings(cls):
    import sys
    return sys.modules[cls.__module__].TrainSettings()       # the engine's defaults, as the node's module sees them


def test_trainer_interface(N):
    cls = N["MagnetTrainLora"]
    names = [n for n, _, _ in widget_inputs(cls)]
    assert names == ["dataset", "path", "trigger", "steps", "rank", "learning_rate", "batch", "training_seed",
                     "save_name", "previews", "preview_prompts", "save_every", "resume_from"]
    assert cls.RETURN_TYPES == ("STRING", "IMAGE", "AUDIO") and cls.OUTPUT_NODE is True
    defaults = dict((n, o.get("default")) for n, _, o in widget_inputs(cls))
    d = pack_train_settings(cls)
    assert (defaults["steps"], defaults["batch"], defaults["learning_rate"]) == (d.steps, d.batch, d.lr)
    # no control_after_generate (the frontend adds one to any INT named seed): a new seed per queue would train
    # again every time
    assert not dict((n, o) for n, _, o in widget_inputs(cls))["training_seed"].get("control_after_generate")


def test_dataset_list_and_path_resolution(pack, N, tmp_path, monkeypatch):
    train = pack.nodes.paths
    inp = tmp_path / "input"
    (inp / "clips" / "more").mkdir(parents=True)
    (inp / ".hidden").mkdir()
    monkeypatch.setenv("MAGNET_INPUT_DIR", str(inp))
    assert N["MagnetTrainLora"].INPUT_TYPES()["required"]["dataset"][0] == ["none", "clips", "clips/more"]
    assert train.resolve_dataset("clips", "") == inp / "clips"
    assert train.resolve_dataset("none", "clips/more") == inp / "clips" / "more"
    assert train.resolve_dataset("none", str(inp / "clips")) == inp / "clips"      # absolute, inside input/
    MagnetError = pack.magnet.errors.MagnetError
    with pytest.raises(MagnetError, match="no dataset"):
        train.resolve_dataset("none", " ")
    with pytest.raises(MagnetError, match="is not a folder"):
        train.resolve_dataset("none", "nowhere")


def test_a_workflow_reads_only_under_input_output_and_folders_an_administrator_allows(pack, tmp_path, monkeypatch):
    paths = pack.nodes.paths
    MagnetError = pack.magnet.errors.MagnetError
    inp, out, elsewhere = tmp_path / "input", tmp_path / "output", tmp_path / "elsewhere"
    for d in (inp / "clips", out / "renders", elsewhere / "audio"):
        d.mkdir(parents=True)
    (inp / "link_out").symlink_to(elsewhere / "audio")
    (inp / "link_in").symlink_to(inp / "clips")
    monkeypatch.setenv("MAGNET_INPUT_DIR", str(inp))
    monkeypatch.setenv("MAGNET_OUTPUT_DIR", str(out))
    monkeypatch.delenv("MAGNET_ALLOWED_DIRS", raising=False)
    for dataset, path in (("none", "/etc"), ("none", "../elsewhere/audio"), ("none", "clips/../../elsewhere"),
                          ("link_out", ""), ("none", "link_out"), ("../elsewhere", ""), ("none", str(elsewhere / "audio"))):
        with pytest.raises(MagnetError, match="extra_model_paths.yaml.*MAGNET_ALLOWED_DIRS"):
            paths.resolve_dataset(dataset, path)
    assert paths.resolve_dataset("link_in", "") == (inp / "clips").resolve()         # a link that stays inside
    assert paths.resolve_dataset("none", str(out / "renders")) == (out / "renders").resolve()
    monkeypatch.setenv("MAGNET_ALLOWED_DIRS", str(elsewhere))                        # an administrator allows it
    assert paths.resolve_dataset("none", str(elsewhere / "audio")) == (elsewhere / "audio").resolve()
    assert paths.resolve_dataset("link_out", "") == (elsewhere / "audio").resolve()
    assert paths.token_cache() == inp / ".magnet_cache"


def test_save_names_are_plain_file_names(pack, loras_dir):
    train = pack.nodes.paths
    assert train.save_path("my style (v2)") == loras_dir / "my style (v2).safetensors"
    assert train.save_path("x.safetensors") == loras_dir / "x.safetensors"
    for bad in ("", "../x", "a/b", "/abs", ".hidden", "a\\b"):
        with pytest.raises(pack.magnet.errors.MagnetError, match="save_name"):
            train.save_path(bad)


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_loss_chart_is_a_comfyui_image_with_the_average_and_the_validation_points(pack):
    train = pack.nodes.train
    losses = [8.0 - 0.05 * i + 0.3 * math.sin(i) for i in range(100)] + [float("nan")]
    img = train.loss_image(losses, [(50, 7.5), (101, 6.0), (60, float("nan"))])
    assert img.shape == (1, 360, 640, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    plot = img[0, 30:]                                                    # below the title and legend
    bright = (plot[:, :, 2] > 0.9) & (plot[:, :, 0] < 0.5)               # the running average is drawn
    cols = bright.any(dim=0).nonzero().flatten()
    assert len(cols) > 400
    rows = [int(bright[:, c].nonzero().float().mean()) for c in (int(cols[0]), int(cols[-1]))]
    assert rows[0] < rows[1]                                              # falling loss: the curve goes down
    orange = (plot[:, :, 0] > 0.9) & (plot[:, :, 1] > 0.5) & (plot[:, :, 1] < 0.75) & (plot[:, :, 2] < 0.3)
    xs = orange.any(dim=0).nonzero().flatten()
    assert len(xs) and 58 + 0.45 * 568 < int(xs[0]) < 58 + 0.55 * 568 and int(xs[-1]) > 600   # at steps 50, 101
    png = read_png(train.png_bytes(img[0]))
    assert png.shape == (360, 640, 3)
    assert np.abs(png.astype(np.float32) / 255 - img[0].numpy()).max() <= 0.5 / 255 + 1e-6
    for empty in ([], [float("nan")], [3.0]):                             # never fails to draw
        assert train.loss_image(empty).shape == (1, 360, 640, 3)
    assert train.loss_image([3.0], [4.0]).shape == (1, 360, 640, 3)


def test_inference_tensors_are_swapped_for_ordinary_ones_with_the_same_values(pack):
    with torch.inference_mode():
        lin = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        lin.register_buffer("table", torch.arange(3.0))
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    assert pack.nodes.train.leave_inference_mode(lin) == 5
    assert not any(t.is_inference() for t in (*lin.parameters(), *lin.buffers()))
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())
    x = torch.randn(2, 3, requires_grad=True)
    lin(x).sum().backward()                                             # autograd can save them now
    assert x.grad is not None
    assert pack.nodes.train.leave_inference_mode(lin) == 0


@pytest.fixture()
def clips(tmp_path, monkeypatch):
    """input/clips: two short tones (one with a caption file), as a user drops them into ComfyUI's input folder."""
    import soundfile as sf
    folder = tmp_path / "input" / "clips"
    folder.mkdir(parents=True)
    sr = 32000
    t = np.arange(int(sr * 1.3)) / sr
    for i, freq in enumerate((220.0, 330.0)):
        sf.write(str(folder / f"tone_{i}.wav"), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    (folder / "tone_0.txt").write_text("a calm low tone")
    monkeypatch.setenv("MAGNET_INPUT_DIR", str(tmp_path / "input"))
    return folder


@pytest.fixture(scope="module")
def t5(pack, ref):
    return pack.magnet.text.TextEncoder(ref / "t5-base", device="cpu")


def train(N, model, te, save_name="x", steps=2, **kw):
    args = dict(dataset="clips", path="", trigger="mystyle", steps=steps, rank=2, learning_rate=0.001, batch=1,
                training_seed=0, save_name=save_name, previews=False)
    args.update(kw)
    return N["MagnetTrainLora"]().train(model, te, **args)


def test_train_node_saves_a_lora_the_loader_applies(pack, N, base, t5, clips, loras_dir):
    before = weights(base)
    out = train(N, plain(pack, base), pack.nodes.common.Handle(t5, "t5-base", [None]), "test_style")
    name, image, previews = out["result"]
    assert previews["waveform"].abs().max() == 0 and "audio" not in out["ui"]     # previews off: silence
    assert name == "test_style.safetensors" and (loras_dir / name).is_file()
    assert not list(loras_dir.glob(".*"))                           # no temporary file left behind
    assert image.shape == (1, 360, 640, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    lora = pack.magnet.lora.load_lora(loras_dir / name)
    assert (lora.meta["steps"], lora.meta["trigger"], lora.meta["clips"], lora.rank) == ("2", "mystyle", "2", 2)
    assert same(weights(base), before)                              # training leaves the model as it was
    assert N["MagnetLoraLoader"].INPUT_TYPES()["required"]["lora"][0] == ["none", name]
    assert "clips" in N["MagnetTrainLora"].INPUT_TYPES()["required"]["dataset"][0]     # not its token cache
    tuned = load(N, plain(pack, base), "none", 1.0, lora_name=name).obj
    assert (logits(tuned) - logits(base)).abs().max() > 0


def test_train_node_in_comfyui_under_inference_mode_shows_progress_and_cancels(pack, N, ref, clips, loras_dir,
                                                                               in_comfy, monkeypatch):
    comfy, common = pack.nodes.comfy, pack.nodes.common
    with torch.inference_mode():                      # ComfyUI runs every node, the loaders too, in inference mode
        m = music(pack, ref)
        te = pack.magnet.text.TextEncoder(ref / "t5-base", device="cpu")
    assert next(m.lm.parameters()).is_inference()
    model = common.Handle(m, "magnet-music", [FakePatcher(comfy.managed_class("MAGNeT LM (t)")(m.lm))])
    text_encoder = common.Handle(te, "t5-base", [FakePatcher(comfy.managed_class("T5 (t)")(te.model))])
    texts = []
    monkeypatch.setattr(comfy, "progress_text", lambda text, node_id: texts.append((node_id, text)))
    before = weights(m)
    with torch.inference_mode():
        name, image, _ = train(N, model, text_encoder, "in_comfy", steps=3, dataset="none", path="clips",
                               unique_id="12")["result"]
    assert name == "in_comfy.safetensors" and image.shape == (1, 360, 640, 3)
    assert [t for _, t in texts][-1].startswith("step 3/3  loss ") and {n for n, _ in texts} == {"12"}
    assert same(weights(m), before)

    bars = []

    class CancelDuringStep2(FakeBar):                 # the user presses Cancel while step 2 runs
        def update_absolute(self, value, total=None, preview=None):
            bars.append(value)
            in_comfy.interrupted = value == 2
    monkeypatch.setattr(comfy, "comfy", SimpleNamespace(utils=SimpleNamespace(ProgressBar=CancelDuringStep2)))
    with torch.inference_mode(), pytest.raises(FakeMM.InterruptProcessingException):
        train(N, model, text_encoder, "cancelled", steps=6)
    assert bars == [1, 2]                              # no step after the one the cancel came in
    kept = loras_dir / "cancelled.step2.safetensors"   # kept, never under the name of a finished LoRA
    assert pack.magnet.lora.load_lora(kept).meta["steps"] == "2" and not (loras_dir / "cancelled.safetensors").exists()
    assert "saved cancelled.step2.safetensors" in texts[-1][1] and "resume_from" in texts[-1][1]
    assert not in_comfy.interrupted
    # resumed from what the cancel saved, it ends at the total steps under the name asked for
    monkeypatch.setattr(comfy, "comfy", SimpleNamespace(utils=SimpleNamespace(ProgressBar=FakeBar)))
    with torch.inference_mode():
        name, _, _ = train(N, model, text_encoder, "cancelled", steps=6, resume_from="cancelled.step2")["result"]
    assert name == "cancelled.safetensors"
    assert pack.magnet.lora.load_lora(loras_dir / name).meta["steps"] == "6"
    assert "cancelled.step2.state.safetensors" not in N["MagnetLoraLoader"].INPUT_TYPES()["required"]["lora"][0]


def test_train_node_refuses_a_model_with_a_lora_and_bad_inputs(pack, N, base, t5, clips, loras_dir):
    lora_file(pack, loras_dir / "style.safetensors", base, 11)
    te = pack.nodes.common.Handle(t5, "t5-base", [None])
    with_lora = load(N, plain(pack, base), "style.safetensors", 1.0)
    for model, kw, match in ((with_lora, {}, "has a LoRA applied"),
                             (plain(pack, base), {"learning_rate": float("nan")}, "learning_rate"),
                             (plain(pack, base), {"dataset": "none"}, "no dataset"),
                             (plain(pack, base), {"save_name": "../x"}, "save_name"),
                             (plain(pack, base), {"steps": "200"}, "steps"),       # a linked input of another type
                             (plain(pack, base), {"rank": 1.5}, "rank"),
                             (plain(pack, base), {"previews": "yes"}, "previews"),
                             (plain(pack, base), {"resume_from": "nowhere"}, "not found")):
        with pytest.raises(pack.magnet.errors.MagnetError, match=match) as info:
            train(N, model, te, **{"save_name": "x", **kw})
        assert str(info.value).startswith("MAGNeT Train LoRA: ")


def test_train_node_plays_previews_made_with_the_lora_and_outputs_them(pack, N, base, t5, clips, loras_dir,
                                                                      in_comfy, monkeypatch, tmp_path):
    import soundfile as sf
    temp = tmp_path / "temp"
    def no_folder(name):
        raise KeyError(name)
    monkeypatch.setattr(pack.nodes.comfy, "folder_paths", SimpleNamespace(
        get_temp_directory=lambda: str(temp), get_input_directory=lambda: str(tmp_path / "input"),
        get_output_directory=lambda: str(tmp_path / "output"), get_folder_paths=no_folder), raising=False)
    monkeypatch.setattr(pack.nodes.comfy, "model_dirs", lambda kind: [loras_dir])
    out = train(N, plain(pack, base), pack.nodes.common.Handle(t5, "t5-base", [None]), "heard", previews=True,
                preview_prompts="mystyle one\n\nmystyle two\n")
    _, _, previews = out["result"]
    wav = previews["waveform"]
    assert wav.shape[:2] == (2, base.channels) and previews["sample_rate"] == base.sample_rate
    assert wav.abs().max() > 0
    (entry,) = out["ui"]["audio"]
    data, sr = sf.read(str(temp / entry["filename"]))
    assert entry["type"] == "temp" and sr == base.sample_rate
    assert len(data) == 2 * (wav.shape[-1] + sr // 2)          # both clips, half a second apart
    assert out["ui"]["images"][0]["filename"].endswith(".png")


def test_train_a_lora_workflow_trains_then_generates_with_and_without_it(pack, ref, clips, loras_dir, monkeypatch):
    from test_workflows import load as load_workflow, run_graph, workflow
    monkeypatch.setenv("MAGNET_MODELS_DIR", str(ref))
    monkeypatch.setenv("MAGNET_TEXT_ENCODERS_DIR", str(ref))
    wf = load_workflow(workflow("train_a_lora"))
    trainer, = [n for n in wf["nodes"] if n["type"] == "MagnetTrainLora"]
    sinks = run_graph(wf, pack.NODE_CLASS_MAPPINGS, {
        "MagnetModelLoader": {"release": "magnet-music", "dtype": "fp32"},
        "MagnetTextEncoderLoader": {"text_encoder": "t5-base"},
        "MagnetTrainLora": {"path": "clips", "steps": 3, "rank": 2, "learning_rate": 0.02},
        "MagnetSampler": {"decoding_steps": "3,2,2,2", "duration": 1.0}})
    prefix = {n["id"]: n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SaveAudio"}
    saved = {prefix[nid]: kwargs["audio"] for nid, (typ, kwargs) in sinks.items() if typ == "SaveAudio"}
    assert set(saved) == {"audio/magnet_with_lora", "audio/magnet_without_lora"}
    assert (loras_dir / f"{trainer['widgets_values'][8]}.safetensors").is_file()      # save_name
    with_lora, without = saved["audio/magnet_with_lora"]["waveform"], saved["audio/magnet_without_lora"]["waveform"]
    assert with_lora.shape == without.shape and with_lora.shape[:2] == (1, 1)
    assert not torch.equal(with_lora, without)              # same seed and prompt: only the LoRA differs


def test_trainer_readies_its_models_in_one_call(pack, N, loras_dir, clips, monkeypatch):
    class Used(Exception):
        pass

    class Stub:
        def __getattr__(self, name):
            raise Used(name)
    calls = []
    monkeypatch.setattr(pack.nodes.comfy, "load", lambda *patchers: calls.append([p.name for p in patchers]))
    handle = pack.nodes.common.Handle
    with pytest.raises(Used):
        train(N, handle(Stub(), "m", [SimpleNamespace(name="model")]),
              handle(Stub(), "t", [SimpleNamespace(name="text_encoder")]))
    assert calls == [["model", "text_encoder"]]


def test_lora_folders_are_a_magnet_folder_in_every_comfyui_lora_folder(pack, monkeypatch, tmp_path):
    class FolderPaths:                                    # folder_paths as far as the registration uses it
        models_dir = str(tmp_path / "models")
        folder_names_and_paths = {"loras": ([str(tmp_path / "models" / "loras"), "/data/loras"], {".safetensors"})}

        def get_folder_paths(self, name):
            return list(self.folder_names_and_paths[name][0])

        def add_model_folder_path(self, name, path, is_default=False):
            paths, exts = self.folder_names_and_paths.setdefault(name, ([], set()))
            if path in paths:
                paths.remove(path)
            paths.insert(0, path) if is_default else paths.append(path)
    fp = FolderPaths()
    monkeypatch.setattr(pack.nodes.comfy, "folder_paths", fp)
    pack.nodes.comfy.register_lora_folders()
    pack.nodes.comfy.register_lora_folders()              # twice (a reload) changes nothing
    assert fp.folder_names_and_paths["magnet_loras"] == (
        [str(tmp_path / "models" / "loras" / "magnet"), "/data/loras/magnet"], {".safetensors"})
    assert pack.nodes.paths.save_path("x") == tmp_path / "models" / "loras" / "magnet" / "x.safetensors"
