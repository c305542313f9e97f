"""Batch generation (magnet.batch): prompt files, names and seeds, byte-identical sets whatever the batch size
or the number of processes, resuming after a crash; on the tiny reference release."""
import json
import os
from pathlib import Path

import pytest
import torch

from magnet import batch
from magnet.audio import read_audio
from magnet.errors import MagnetError

FAST = dict(seconds=0.3, decoding_steps=[2, 1, 1, 1])      # 15 frames, 5 forwards: milliseconds a clip


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: thread hand-offs cost more than the work


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    p = _write(tmp_path_factory.mktemp("prompts"), "prompts.jsonl",
               '{"prompt": "calm piano"}\n{"prompt": "loud drums", "name": "drums"}\n'
               '{"prompt": "rain", "seconds": 0.2}\n')
    return batch.read_prompt_file(p)


@pytest.fixture(scope="module")
def reference_set(music_model, jobs, tmp_path_factory):
    """The set made by one process with batch 1: 3 prompts x 2 clips."""
    out = tmp_path_factory.mktemp("one") / "out"
    r = batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, **FAST)
    assert len(r.written) == 6 and not r.skipped
    return _files(out)


# --- prompt files -------------------------------------------------------------------------------

def test_text_prompt_file_skips_blank_lines_and_indexes_the_prompts(tmp_path):
    p = _write(tmp_path, "p.txt", "\ufeffcalm piano\n\n  \nloud drums  \n{not json\n")
    jobs = batch.read_prompt_file(p)
    assert [(j.index, j.prompt, j.lineno) for j in jobs] == [(0, "calm piano", 1), (1, "loud drums", 4),
                                                             (2, "{not json", 5)]
    assert [j.stem for j in jobs] == ["00000", "00001", "00002"]


def test_jsonl_prompt_file_by_name_or_content(tmp_path):
    lines = ['{"prompt": "a", "seconds": 4, "seed": 7, "name": "first", "ytid": "x"}', "",
             '{"prompt": ""}']
    for name in ("p.jsonl", "p.txt"):
        jobs = batch.read_prompt_file(_write(tmp_path, name, "\n".join(lines)))
        assert jobs == [batch.Job(0, "a", 4.0, 7, "first", 1), batch.Job(1, "", None, None, None, 3)]


@pytest.mark.parametrize("name,text,match", [
    ("p.jsonl", '{"prompt": "a"}\nplain text\n', r"line 2: not a JSON object, but the file is named \.jsonl"),
    ("p.txt", 'plain\n{"prompt": "a"}\n', r"line 1: not a JSON object, but line 2 is one"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', r"line 2: not a JSON object"),
    ("p.jsonl", '\n{"caption": "a", "ytid": "x"}\n', r"line 2: needs a \"prompt\" string \(keys found: caption, ytid\)"),
    ("p.jsonl", '{"prompt": "a", "seconds": 0}\n', r"line 1: \"seconds\" 0 must be a number of seconds > 0"),
    ("p.jsonl", '{"prompt": "a", "seconds": "10"}\n', r"\"seconds\" '10'"),
    ("p.jsonl", '{"prompt": "a", "seconds": NaN}\n', r"\"seconds\" nan"),
    ("p.jsonl", '{"prompt": "a", "seed": 1.5}\n', r"\"seed\" 1.5 must be a whole number"),
    ("p.jsonl", '{"prompt": "a", "seed": true}\n', r"\"seed\" True"),
    ("p.jsonl", '{"prompt": "a", "name": "../up"}\n', r"\"name\" '../up' holds a path separator"),
    ("p.jsonl", '{"prompt": "a", "name": "a\\\\b"}\n', r"path separator"),
    ("p.jsonl", '{"prompt": "a", "name": ".hidden"}\n', r"starts with a dot"),
    ("p.jsonl", '{"prompt": "a", "name": ".."}\n', r"starts with a dot"),
    ("p.jsonl", '{"prompt": "a", "name": "con"}\n', r"reserved device name"),
    ("p.jsonl", '{"prompt": "a", "name": " "}\n', r"is empty"),
    ("p.jsonl", '{"prompt": "a", "name": 3}\n', r"must be a string"),
    ("p.jsonl", '{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "X"}\n', r"lines 1 and 2 would both write X_"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "name": "00000"}\n', r"lines 1 and 2 would both write 00000_"),
    ("p.txt", "\n  \n", r"has no prompts"),
])
def test_bad_prompt_file_lines_name_the_line_and_the_fix(tmp_path, name, text, match):
    with pytest.raises(MagnetError, match=match):
        batch.read_prompt_file(_write(tmp_path, name, text))


def test_missing_or_unreadable_prompt_file(tmp_path):
    with pytest.raises(MagnetError, match="prompts file not found"):
        batch.read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(MagnetError, match="Save it as UTF-8"):
        batch.read_prompt_file(tmp_path / "latin1.txt")


# --- names and seeds ----------------------------------------------------------------------------

def test_names_and_seeds_depend_on_the_prompt_and_k_only(jobs):
    items = batch.plan(jobs, per_prompt=2, seed=5)
    assert [it.filename for it in items] == ["00000_0.wav", "00000_1.wav", "drums_0.wav", "drums_1.wav",
                                             "00002_0.wav", "00002_1.wav"]
    assert [it.index for it in items] == list(range(6))
    assert items[3].seed == batch.item_seed(5, 1, 1) and 0 <= items[3].seed < 2 ** 63
    assert len({it.seed for it in items}) == 6
    one = batch.plan(jobs, per_prompt=1, seed=5)              # fewer clips per prompt: the same _0 clips
    assert [(it.filename, it.seed) for it in one] == [(it.filename, it.seed) for it in items if it.k == 0]
    assert batch.plan(jobs, per_prompt=2, seed=6)[0].seed != items[0].seed
    assert batch.plan(jobs, fmt="FLAC")[0].filename == "00000_0.flac"


def test_a_subset_of_the_jobs_makes_the_same_files(jobs):
    whole = {it.filename: it.seed for it in batch.plan(jobs, per_prompt=2, seed=5)}
    part = batch.plan(jobs[1:], per_prompt=2, seed=5)
    assert [it.filename for it in part] == ["drums_0.wav", "drums_1.wav", "00002_0.wav", "00002_1.wav"]
    assert all(whole[it.filename] == it.seed for it in part)


def test_a_lines_own_seed_gives_seed_plus_k():
    jobs = [batch.Job(0, "a", seed=41), batch.Job(1, "b")]
    assert [it.seed for it in batch.plan(jobs, per_prompt=3, seed=0)][:3] == [41, 42, 43]


@pytest.mark.parametrize("kwargs,match", [
    (dict(per_prompt=0), "per_prompt 0 must be a whole number >= 1"),
    (dict(seed=1.5), "seed 1.5 must be a whole number"),
    (dict(fmt="mp3"), "write wav or flac"),
])
def test_bad_set_arguments(jobs, kwargs, match):
    with pytest.raises(MagnetError, match=match):
        batch.plan(jobs, **kwargs)


def test_local_device_is_the_given_one_without_cuda_or_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert batch.local_device(None) is None and batch.local_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert batch.local_device(None) == "cuda:1" and batch.local_device("cuda") == "cuda:1"
    assert batch.local_device("cpu") == "cpu" and batch.local_device("cuda:0") == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(MagnetError, match="has 2 CUDA device"):
        batch.local_device(None)
    monkeypatch.delenv("LOCAL_RANK")
    assert batch.local_device(None) is None


def test_rank_and_world_from_torchrun_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert batch.rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert batch.rank_and_world() == (1, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(MagnetError, match="0 <= RANK < WORLD_SIZE"):
        batch.rank_and_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MagnetError, match=r"\$RANK is 'x'"):
        batch.rank_and_world()


# --- generating a set ---------------------------------------------------------------------------

def test_each_clip_is_what_a_single_generation_with_its_seed_gives(music_model, jobs, reference_set):
    item = batch.plan(jobs, per_prompt=2, seed=5)[3]          # drums_1
    codes = music_model.generate([item.job.prompt], duration=0.3, seed=item.seed, decoding_steps=[2, 1, 1, 1])
    wav, sr = read_audio_bytes(reference_set["drums_1.wav"])
    want = music_model.decode(codes)[0].clamp(-1, 1)
    assert sr == music_model.sample_rate and wav.shape == want.shape
    assert float((wav - want).abs().max()) <= 2 / 32767                   # PCM_16 rounding
    short, _ = read_audio_bytes(reference_set["00002_0.wav"])             # its line asks for 0.2 s
    assert short.shape[-1] < wav.shape[-1]


def read_audio_bytes(data: bytes):
    import io

    import soundfile as sf
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return torch.from_numpy(x.T.copy()), sr


def test_outputs_are_byte_identical_whatever_the_batch_size(music_model, jobs, reference_set, tmp_path):
    batch.generate_set(music_model, jobs, tmp_path / "b3", per_prompt=2, seed=5, batch=3, **FAST)
    assert _files(tmp_path / "b3") == reference_set


def test_two_processes_write_exactly_the_files_of_one(music_model, jobs, reference_set, tmp_path):
    out = tmp_path / "shared"
    r0 = batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, rank=0, world=2, **FAST)
    r1 = batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, rank=1, world=2, **FAST)
    assert [p.name for p in r0.written] == ["00000_0.wav", "drums_0.wav", "00002_0.wav"]
    assert [p.name for p in r1.written] == ["00000_1.wav", "drums_1.wav", "00002_1.wav"]
    assert (r0.share, r0.total) == (3, 6)
    assert _files(out) == reference_set


def test_a_crash_leaves_complete_files_only_and_a_rerun_completes_the_set(music_model, jobs, reference_set,
                                                                         tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []

    def crash_after_two(p):
        seen.append((p.done, p.total, p.made))
        if p.made == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, batch=2, progress=crash_after_two, **FAST)
    assert seen == [(0, 6, 0), (1, 6, 1), (2, 6, 2)]
    assert _files(out) == {k: reference_set[k] for k in ("00000_0.wav", "00000_1.wav")}

    # a crash while writing: the temporary file goes, nothing half-written stays
    import soundfile as sf
    real_write = sf.write

    def dies_midway(file, data, *a, **k):
        real_write(file, data[: len(data) // 2], *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(sf, "write", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, **FAST)
    monkeypatch.setattr(sf, "write", real_write)
    assert sorted(os.listdir(out)) == ["00000_0.wav", "00000_1.wav"]

    # a process killed outright leaves its temporary file: the next run removes it
    (out / ".drums_0.0123abcd.tmp.wav").write_bytes(b"RIFF partial")
    calls = []
    real_generate = music_model.generate
    monkeypatch.setattr(music_model, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    r = batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, **FAST)
    assert [p.name for p in r.skipped] == ["00000_0.wav", "00000_1.wav"] and len(r.written) == 4
    assert len(calls) == 4
    assert _files(out) == reference_set
    r = batch.generate_set(music_model, jobs, out, per_prompt=2, seed=5, **FAST)      # nothing left to do
    assert not r.written and len(r.skipped) == 6 and len(calls) == 4


def test_progress_counts_the_whole_set(music_model, jobs, tmp_path):
    reports = []
    batch.generate_set(music_model, jobs[:1], tmp_path / "out", per_prompt=2, seed=1, rank=1, world=2,
                       progress=reports.append, **FAST)
    assert [(p.done, p.total, p.made) for p in reports] == [(0, 2, 0), (1, 2, 1)]
    assert reports[-1].last.name == "00000_1.wav" and reports[-1].clips_per_minute > 0
    assert reports[0].eta_seconds is None and "1/2 clips" in str(reports[-1])


def test_flac_and_loudness(music_model, tmp_path):
    jobs = [batch.Job(0, "calm piano")]
    batch.generate_set(music_model, jobs, tmp_path / "out", fmt="flac", loudness=-20.0, **FAST)
    wav, sr = read_audio(tmp_path / "out" / "00000_0.flac")
    assert sr == music_model.sample_rate and wav.shape[-1] > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(duration=2.0), "sets duration itself"),
    (dict(progress=None, prompt=None), "sets prompt itself"),
    (dict(rank=2, world=2), "rank 2 of 2 processes"),
    (dict(batch=0), "batch 0 must be a whole number >= 1"),
    (dict(temperature=-1.0), "temperature"),
    (dict(seconds=-1.0), "duration"),
    (dict(loudness=5.0), "loudness 5.0"),
    (dict(overlap=-1.0), "overlap"),
])
def test_bad_arguments_fail_before_any_work(music_model, tmp_path, kwargs, match):
    jobs = [batch.Job(0, "calm piano")]
    args = dict(FAST, **kwargs)
    with pytest.raises(MagnetError, match=match):
        batch.generate_set(music_model, jobs, tmp_path / "out", **args)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_lines_bad_duration_names_the_line(music_model, tmp_path):
    p = _write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "seconds": 0.01}\n')
    with pytest.raises(MagnetError, match="line 2: duration 0.01 s is too short"):
        batch.generate_set(music_model, batch.read_prompt_file(p), tmp_path / "out", **FAST)


def test_an_output_folder_that_is_a_file_is_refused(music_model, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(MagnetError, match="is a file"):
        batch.generate_set(music_model, [batch.Job(0, "a")], tmp_path / "out", **FAST)


def test_pair_outputs_finds_the_sets_files_with_their_prompts(jobs, tmp_path):
    for name in ("drums_1.wav", "00000_0.wav", "00002_0.flac", "00000_x.wav", "other_0.wav", ".00000_1.wav"):
        (tmp_path / name).write_bytes(b"")
    got = [(p.name, job.prompt, k) for p, job, k in batch.pair_outputs(jobs, tmp_path)]
    assert got == [("00000_0.wav", "calm piano", 0), ("drums_1.wav", "loud drums", 1), ("00002_0.flac", "rain", 0)]


def test_jobs_built_in_code_are_checked(music_model, tmp_path):
    with pytest.raises(MagnetError, match="job 1 has index 0: each job needs an index of its own"):
        batch.plan([batch.Job(0, "a"), batch.Job(0, "b")])
    with pytest.raises(MagnetError, match="job 0 has index -1"):
        batch.plan([batch.Job(-1, "a")])
    with pytest.raises(MagnetError, match="no prompts"):
        batch.plan([])
    with pytest.raises(MagnetError, match="holds a path separator"):
        batch.plan([batch.Job(0, "a", name="x/y")])
    assert json.dumps([it.filename for it in batch.plan([batch.Job(0, "a", name="x y")])]) == '["x y_0.wav"]'


def test_torchrun_processes_write_the_files_of_one_process(ref, jobs, reference_set, tmp_path):
    """Two real processes started by torchrun (RANK / WORLD_SIZE from the environment, no process group)."""
    import subprocess
    import sys
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({k: v for k, v in (("prompt", j.prompt), ("name", j.name),
                                                               ("seconds", j.seconds)) if v is not None})
                                 for j in jobs), encoding="utf-8")
    script = tmp_path / "make_set.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from magnet import MagnetModel, batch\n"
        f"model = MagnetModel.from_pretrained({str(ref / 'magnet-music')!r}, text_encoder={str(ref / 't5-base')!r},"
        " device='cpu')\n"
        "rank, world = batch.rank_and_world()\n"
        "assert world == 2\n"
        f"batch.generate_set(model, batch.read_prompt_file({str(prompts)!r}), sys.argv[1], per_prompt=2, seed=5,"
        " rank=rank, world=world, seconds=0.3, decoding_steps=[2, 1, 1, 1])\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _files(tmp_path / "out") == reference_set
