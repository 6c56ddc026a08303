"""processes.py: the device a process picks, its threads and precision, and the random state a checkpoint restores."""
import pickle
import random
import re

import numpy as np
import pytest
import torch

import config
import processes
import trainer

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_environment(monkeypatch, **variables):
    """The environment torchrun gives a process (MASTER_ADDR / MASTER_PORT unless said otherwise),
    with exactly the variables given of the rest."""
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500", **variables}.items():
        if value is not None:
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "3", "MASTER_ADDR": None, "MASTER_PORT": None},
     "the environment sets RANK but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT, which torchrun sets"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": None},
     "the environment sets RANK and WORLD_SIZE but not MASTER_ADDR, which torchrun sets"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "abc"}, "LOCAL_RANK is 'abc' in the environment"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE is '0' in the environment"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK is '2' in the environment; torchrun sets it to a whole number from 0 to 1"),
    ({"RANK": "0", "WORLD_SIZE": "-1"}, "WORLD_SIZE is '-1' in the environment"),
])
def test_an_environment_that_is_not_torchruns_is_one_line_naming_the_variable(monkeypatch, capsys, variables, message):
    torchrun_environment(monkeypatch, **variables)
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        processes.torchrun_launch()
    # the run stops with that line, printed by this process whatever RANK says
    assert trainer.main(["--trainer.device", "cpu"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line


def test_torchruns_environment_reads_as_the_process_place(monkeypatch):
    torchrun_environment(monkeypatch, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert processes.torchrun_launch() == processes.Launch(True, rank=3, local_rank=1, world_size=4, local_world_size=2)
    torchrun_environment(monkeypatch, MASTER_ADDR=None, MASTER_PORT=None)
    assert processes.torchrun_launch() == processes.Launch(False)


def test_a_config_error_is_printed_by_a_process_whose_rank_is_not_torchruns(monkeypatch, capsys):
    # RANK=3 left in a shell: once the config error went unprinted (exit 2, no output at all)
    torchrun_environment(monkeypatch, RANK="3", MASTER_ADDR=None, MASTER_PORT=None)
    assert trainer.main(["--trainer.epochs", "0"]) == 2
    assert capsys.readouterr().err == "error: trainer.epochs is 0; it must be positive\n"
    # under torchrun, rank 0 alone prints an error that every rank meets alike
    for rank, printed in (("3", ""), ("0", "error: trainer.epochs is 0; it must be positive\n")):
        torchrun_environment(monkeypatch, RANK=rank, WORLD_SIZE="4")
        assert trainer.main(["--trainer.epochs", "0"]) == 2
        assert capsys.readouterr().err == printed


def test_a_local_rank_without_a_gpu_of_its_own_is_one_line_naming_both_numbers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    torchrun_environment(monkeypatch, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    cfg = config.load_config(["--trainer.backend", "ddp"])
    with pytest.raises(config.ConfigError, match="local rank 1 has no GPU of its own: this machine shows 1"):
        trainer.setup_distributed(cfg["trainer"])


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached Gaussian is part of Python's state too
    state = processes.rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    processes.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert "cuda" not in state  # a CPU process saves no GPU state, a GPU process only its own device's
    with pytest.raises(pickle.UnpicklingError):  # what weights_only refuses, rng_state avoids
        torch.save({"numpy": np.random.get_state()}, tmp_path / "raw.pt")
        torch.load(tmp_path / "raw.pt", weights_only=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_process_restores_its_own_device_rng():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    state = processes.rng_state(device)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed_all(9)
    processes.set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), expected)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch, native, expected):
    # emulated bf16 (V100, T4) reports supported with emulation; it is slower than fp16 there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    said = []
    assert processes.decide_amp_dtype(True, "auto", torch.device("cuda", 0), said.append) is expected
    assert said == ["mixed precision: autocast bf16 on a GPU" if native else
                    "mixed precision: autocast fp16 on a GPU with GradScaler"]  # said once, at start


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_on_cuda_follows_trainer_tf32(monkeypatch, tf32):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    # torch's backend flags are properties of module objects: set and restored by hand
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    try:
        cfg = config.load_config(["--trainer.tf32", str(tf32).lower(), "--trainer.num_threads", "1"])
        proc = trainer.setup_distributed(cfg["trainer"])
        assert proc.device == torch.device("cuda", 0)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_gpu_rank_saves_and_restores_its_own_device_rng_only(monkeypatch):
    """Rank 3 of a machine with 8 GPUs, resumed as rank 3 of machines with 1 each (cuda:0): the
    checkpoint holds cuda:3's state alone (the *_all functions would list 8 GPUs and the restore
    with fewer would raise IndexError), and it is restored onto the resuming rank's own device."""
    saved, restored = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: saved.append(device) or torch.full((8,), 3, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))

    def every_gpu(*args):
        raise AssertionError("the state of every visible GPU")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    state = processes.rng_state(torch.device("cuda", 3))
    assert saved == [torch.device("cuda", 3)] and state["cuda"].tolist() == [3] * 8
    processes.set_rng_state(state, torch.device("cuda", 0))
    assert [(s.tolist(), d) for s, d in restored] == [([3] * 8, torch.device("cuda", 0))]
    processes.set_rng_state(state, torch.device("cpu"))  # a GPU checkpoint resumed on a CPU: no GPU to seed
    assert len(restored) == 1
