"""`python -m magnet doctor`, run in-process: on this CPU every check passes and reports its numbers; a
broken decoding path and a check that raises are reported as failed by name while the doctor goes on; the
speed measurement (on a small architecture here); a release's real LM (the reference fixture); the user's
mistakes."""
import json
import math

import pytest
import torch

from magnet import doctor, linears, random_models, stage_forward
from magnet.__main__ import main
from magnet.sampling import FastMode

TINY_CHECKS = ["load", "logits stage 0", "logits stage 1", "logits stage 2", "logits stage 3", "activations",
               "greedy nonoverlap", "greedy stride1", "long-form", "codec"]
SMALL_ARCH = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, n_q=4, card=64, text_dim=32)


def run_doctor(capsys, *args):
    rc = main(["doctor", "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def by_name(report):
    return {c["name"]: c for c in report["checks"]}


def test_every_check_passes_on_this_cpu_with_its_numbers(capsys, monkeypatch):
    monkeypatch.setattr(doctor.speed, "ARCH", SMALL_ARCH)  # the speed check's architecture, small: cheap here
    rc, out, err = run_doctor(capsys, "--json")
    assert len(out.strip().splitlines()) == 1               # one JSON object on stdout ...
    report = json.loads(out)
    assert rc == 0 and report["ok"] is True, report["verdict"]
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["torch"] == torch.__version__
    env = report["environment"]
    assert env["cpu"]["cores"] >= 1 and env["kernels"]["onednn_linears"] == linears.onednn_available()
    assert env["kernels"]["int8_fast_mode"] == linears.int8_available() and env["default_dtype"] == "float32"

    checks = by_name(report)
    assert [c["name"] for c in report["checks"]] == TINY_CHECKS + ["speed"]
    assert all(c["ok"] and c["seconds"] >= 0 for c in report["checks"])
    for stage in range(4):
        c = checks[f"logits stage {stage}"]
        assert c["relative_tolerance"] == 1e-4 and c["logit_scale"] > 1
        assert 0 <= c["max_abs_error"] <= c["tolerance"] == pytest.approx(1e-4 * c["logit_scale"])
        assert c["steps"] == 4 and c["path"] == "pruned positions"
    for name in ("greedy nonoverlap", "greedy stride1"):
        assert checks[name]["identical"] is True and checks[name]["agreement"] == 1.0
        assert checks[name]["frames"] == checks[name]["expected_frames"] == 120
    assert checks["long-form"]["frames"] == 300 and checks["long-form"]["window_frames"] == 120
    assert checks["long-form"]["identical"] is True
    assert checks["codec"]["max_abs_error"] <= checks["codec"]["tolerance"]
    assert checks["codec"]["codes_agreement"] == 1.0
    act = checks["activations"]
    assert 0 < act["max_abs_linear_output"] < 1e3 and act["fp16_headroom"] > 10 and not act["overflowed"]
    speed = checks["speed"]
    assert speed["arch"] == SMALL_ARCH and speed["frames"] == 500 and speed["seconds_per_step"] > 0
    assert speed["rtf_exact"] == pytest.approx(50 * speed["seconds_per_step"] / 10)
    assert speed["peak_memory_gib"] > 0 and speed["peak_memory_kind"] == "process peak RSS"
    if linears.fast_linears(FastMode(), torch.device("cpu")):
        assert speed["seconds_per_step_fast"] > 0 and speed["rtf_fast"] > 0 and speed["fast_copy_seconds"] >= 0
        assert speed["fast_linears"] == env["kernels"]["fast_linears"]["path"]
    assert env["cpu"]["features"] == linears.cpu_features()
    assert env["kernels"]["fast_linears"]["path"] == linears.choose_linears().path

    lines = err.strip().splitlines()                        # ... the human-readable report on stderr
    assert lines[0] == "MAGNeT doctor" and any(line.startswith("kernels ") for line in lines)
    assert lines[-1] == report["verdict"] and lines[-1].startswith("doctor: ok — every check passed on cpu (float32)")
    assert sum(line.startswith("  ok    ") for line in lines) == len(TINY_CHECKS) + 1


def test_a_broken_path_and_a_raising_check_are_reported_and_the_doctor_goes_on(capsys, monkeypatch):
    real = stage_forward.StageForward.logits

    def off_by_one(self, codes, used, coef):
        logits, guided = real(self, codes, used, coef)
        return logits + 1.0, guided
    monkeypatch.setattr(stage_forward.StageForward, "logits", off_by_one)

    def explode(*a, **k):
        raise RuntimeError("the codec exploded\nsecond line of the message")
    monkeypatch.setattr(doctor.checks, "check_codec", explode)
    rc, out, err = run_doctor(capsys, "--no-speed")
    assert rc == 1 and "Traceback" not in err
    lines = out.strip().splitlines()
    failed = [line.split()[1:4] for line in lines if line.startswith("  FAIL")]
    assert [" ".join(f[:3]) for f in failed[:4]] == [f"logits stage {s}" for s in range(4)]
    assert any("codec" in line and "raised RuntimeError: the codec exploded" in line and "second line" not in line
               for line in lines)
    # the doctor went on: greedy decoding is unchanged by a constant added to every logit
    assert any(line.startswith("  ok    greedy nonoverlap") for line in lines)
    assert lines[-1] == ("doctor: 5 checks FAILED: logits stage 0, logits stage 1, logits stage 2, logits stage 3, "
                         "codec on cpu (float32) — paste this whole output (or --json) into a bug report")


def test_the_report_as_json_names_the_failed_check_and_its_error(monkeypatch):
    monkeypatch.setattr(doctor.checks, "check_longform", lambda *a: 1 / 0)
    monkeypatch.setattr(doctor.checks, "check_logits", lambda *a, **k: (False, {"max_abs_error": math.nan}, "nan"))
    report = doctor.run("cpu", speed=False, echo=lambda line: None)
    assert report["ok"] is False
    checks = by_name(json.loads(doctor.to_json(report)))   # strict JSON: NaN became null
    assert checks["long-form"]["ok"] is False and checks["long-form"]["error"] == "ZeroDivisionError: division by zero"
    assert checks["logits stage 2"]["max_abs_error"] is None
    assert checks["greedy stride1"]["ok"] and checks["codec"]["ok"]


@pytest.mark.parametrize("path", ["bf16", "int8", "fp32"])
def test_speed_check_times_exact_and_fast_steps_of_the_given_architecture(path, monkeypatch):
    if path == "int8" and not linears.int8_available():
        pytest.skip("this torch has no CPU int8 kernels")
    monkeypatch.setenv(linears.LINEARS_ENV, path)          # the choice forced, as a user can
    ok, n, text = doctor.speed.check_speed(torch.device("cpu"), "fp32", SMALL_ARCH, frames=90)
    assert ok and n["frames"] == 90 and n["timed_steps"] == 1 and n["dtype"] == "float32"
    assert n["seconds_per_step"] > 0 and n["rtf_exact"] == pytest.approx(50 * n["seconds_per_step"] / 1.8)
    assert n["weights_gib"] > 0 and "s/step" in text and "RTF" in text
    if path == "fp32":                                      # fast mode's linears are the weights themselves
        assert "rtf_fast" not in n and "fast (" not in text
    else:
        assert n["fast_linears"] == path and f"fast ({path})" in text
        assert n["rtf_fast"] == pytest.approx(35 * n["seconds_per_step_fast"] / 1.8)


def test_a_release_is_checked_on_its_real_lm(ref, capsys, monkeypatch):
    rc, out, err = run_doctor(capsys, "--json", "--no-speed", "--release", ref / "magnet-music", "--text-encoder",
                              ref / "t5-base")
    report = json.loads(out)
    assert rc == 0 and report["ok"], report["verdict"]
    checks = by_name(report)
    assert checks["release load"]["text_encoder"].endswith("t5-base")
    for stage in range(4):
        c = checks[f"release logits stage {stage}"]
        assert c["max_abs_error"] <= c["tolerance"] and c["frames"] == 48
    assert checks["release greedy"]["identical"] and checks["release codec"]["ok"]
    assert "release activations" in checks


@pytest.mark.parametrize("args,words", [
    (["--text-encoder", "t5"], ["--text-encoder needs --release"]),
    (["--release", "no/such/release"], ["release not found"]),
    (["--dtype", "fp64"], ["--dtype", "fp32, fp16 or bf16"]),
    (["--device", "tpu"], ["--device", "not a device name"]),
    (["--device", "gpu\u00b2"], ["--device 'gpu\u00b2'", "not a device name"]),
    (["--device", "cpu:\u00b2"], ["--device 'cpu:\u00b2'", "not a device name"]),
    (["--device", "cuda:99999999999999999999"], ["--device 'cuda:99999999999999999999'", "auto"]),
])
def test_user_mistakes_are_one_line_errors_before_any_work(capsys, args, words):
    rc, out, err = run_doctor(capsys, *args)
    assert rc == 2 and not out and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert all(w in err for w in words), err


def test_the_static_step_path_cuda_runs_is_checked_replay_by_replay(tmp_path, monkeypatch):
    """What CUDA runs (static buffers, a graph per stage, its first replay checked against eager), here on the
    CPU through `static_steps_on_cpu`: each of the logits check's steps after the first is a replay."""
    import magnet.model
    from magnet.stage_forward import DecodingSettings
    monkeypatch.setattr(magnet.model, "DecodingSettings", lambda: DecodingSettings(static_steps_on_cpu=True))
    tiny = random_models.Tiny()
    dev = magnet.model.MagnetModel.from_pretrained(random_models.write_tiny_release(tiny, tmp_path),
                                                   text_encoder=False, device="cpu")
    ref = doctor.checks.reference(dev)
    cond = doctor.checks.condition(tiny.batch, tiny.text_len, tiny.text_dim, 0)
    ok, n, text = doctor.checks.check_logits(dev, ref, 1, cond, tiny.frames, 4, 0, [])
    assert ok and n["path"] == "static buffers" and n["max_abs_error"] <= n["tolerance"]
    ok, n, text = doctor.checks.check_graphs(dev)                  # the replays passed their check: still on
    assert ok and n["graphs"] == "on" and n["verified_shapes"] == 1
    monkeypatch.setenv("MAGNET_CUDA_GRAPHS", "0")
    ok, n, text = doctor.checks.check_graphs(dev)
    assert ok and n["graphs"] == "off" and "MAGNET_CUDA_GRAPHS=0" in text
