"""Training in several processes (torchrun, gloo over 127.0.0.1): the same LoRA as one process with the same
effective batch, and a dead process stops the others with an error instead of a hang."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from magnet import lora as L
from magnet.train import TrainSettings, train_lora

WORKER = Path(__file__).with_name("dist_train_worker.py")
ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(timeout: int = 60) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MAGNET_DIST_TIMEOUT=str(timeout), GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture()
def tones(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sr = 32000
    t = np.arange(int(1.3 * sr)) / sr
    for i, f in enumerate((220.0, 330.0, 495.0)):
        sf.write(str(data / f"tone_{i}.wav"), (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr)
        (data / f"tone_{i}.txt").write_text(f"a tone number {i}")
    return data


SETTINGS = dict(steps=3, rank=2, lr=1e-3, warmup=1, seed=11, previews=False, grad_accum=2)


def test_two_processes_with_batch_1_train_the_lora_one_process_trains_with_batch_2(ref, music_model, tones,
                                                                                   tmp_path):
    one = train_lora(music_model, tones, tmp_path / "one.safetensors", TrainSettings(**SETTINGS, batch=2))
    args = {"release": str(ref / "magnet-music"), "t5": str(ref / "t5-base"), "data": str(tones),
            "out": str(tmp_path / "two.safetensors"), "settings": dict(SETTINGS, batch=1)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_port()), "--max_restarts", "0",
           str(WORKER), json.dumps(args)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"two.safetensors.rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["world"] == 2 for r in reports)
    assert all(r["losses"] == pytest.approx(one.losses, rel=1e-4) for r in reports)
    a, b = L.load_lora(one.path).tensors, L.load_lora(tmp_path / "two.safetensors").tensors
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    # the first process alone wrote the files
    assert sorted(p.name for p in tmp_path.glob("two*.safetensors")) == ["two.safetensors", "two.state.safetensors"]


def test_a_process_that_dies_stops_the_other_with_an_error_never_a_hang(ref, tones, tmp_path):
    args = {"release": str(ref / "magnet-music"), "t5": str(ref / "t5-base"), "data": str(tones),
            "out": str(tmp_path / "x.safetensors"), "settings": dict(SETTINGS, batch=1), "die_rank": 1}
    port = _port()
    procs = []
    for rank in (0, 1):
        env = dict(_env(timeout=20), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, outs[0][1][-2000:]
    assert "another training process stopped" in outs[0][1]
    assert not (tmp_path / "x.safetensors").exists()
