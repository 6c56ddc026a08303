"""Where this process stands among the run's processes, and what the processes agree on.

    proc = this_process(cfg["trainer"])          # rank, device, threads, precision from torchrun's env
    proc.say("said once, by the main process")
    result = on_main(proc, write_file, path)     # run on rank 0, its result (or failure) on every rank
    stop = agree(proc, asked_to_stop, "max")     # one flag, the same on every rank
    states = gather(proc, my_state)              # every rank's, on every rank
    with autocast(proc): ...                     # the run's mixed precision, decided once at start
    seed_everything(seed); state = rng_state(proc.device); set_rng_state(state, proc.device)

trainer.setup_distributed starts the process group of what this_process found; everything here
works alike for one process (ddp False) and for many.
"""
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from config import ConfigError, uses_amp


class TrainingError(Exception):
    """The run cannot go on (for example a non-finite loss); reported as one line."""


class MainProcessFailed(TrainingError):
    """Another rank's word that rank 0 failed: rank 0 reports the cause itself."""


@dataclass
class Process:
    """Where this process stands: its rank among world_size processes, its device, its precision.

    cpu_group: a gloo group of all ranks for agreements the host makes (stop flags, checkpoint
    state, the main process's errors), so they never wait for the GPU; None without DDP.
    amp_dtype: the autocast dtype of mixed precision, or None for float32 (decide_amp_dtype).
    """
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool
    ddp: bool
    cpu_group: object = None
    amp_dtype: torch.dtype = None

    def say(self, message):
        """Print on the main process only, keeping the progress bar intact."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)


@dataclass
class Launch:
    """What torchrun's environment says of this process; one process of one without torchrun."""
    launched: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


# what torchrun sets for each process it starts, and init_process_group reads (LOCAL_RANK and
# LOCAL_WORLD_SIZE too, which one process per machine may go without)
TORCHRUN_NEEDS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_launch():
    """This process's place among the processes torchrun started (RANK, WORLD_SIZE, ...), read with
    checks: a variable missing or not what torchrun sets is a ConfigError naming it."""
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return Launch(False)
    missing = [name for name in TORCHRUN_NEEDS if name not in env]
    if missing:
        raise ConfigError(f"the environment sets {' and '.join(n for n in ('RANK', 'WORLD_SIZE') if n in env)} "
                          f"but not {', '.join(missing)}, which torchrun sets for each process it starts; "
                          f"launch with torchrun, or unset RANK and WORLD_SIZE to run one process")
    world_size = launch_number("WORLD_SIZE", 1)
    local_world_size = launch_number("LOCAL_WORLD_SIZE", 1, most=world_size)
    return Launch(True, rank=launch_number("RANK", 0, most=world_size - 1),
                  local_rank=launch_number("LOCAL_RANK", 0, most=local_world_size - 1),
                  world_size=world_size, local_world_size=local_world_size)


def launch_number(name, least, most=None):
    """A whole number of torchrun's environment in [least, most] (0 or 1 where it is not set)."""
    text = os.environ.get(name, str(least))
    value = int(text.strip()) if text.strip().isdigit() else None
    if value is None or value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise ConfigError(f"{name} is {text!r} in the environment; torchrun sets it to a whole number "
                          f"{bound}: launch with torchrun, or unset RANK and WORLD_SIZE to run one process")
    return value


def launch_rank():
    """This process's rank for deciding who prints an error: torchrun's RANK, or 0 when the process
    is not one of torchrun's (or its environment is not torchrun's: that error is its own to print)."""
    try:
        return torchrun_launch().rank
    except ConfigError:
        return 0


def uses_ddp(trainer_cfg, launch=None):
    """DDP or not: trainer.backend auto follows torchrun (launch: torchrun_launch(), as nanoGPT
    does), sp / ddp insist. Several processes started without DDP would each train alone: refused."""
    launch, backend = launch or torchrun_launch(), trainer_cfg["backend"]
    ddp = launch.launched if backend == "auto" else backend.startswith("ddp")
    if launch.world_size > 1 and not ddp:
        raise ConfigError(f"started with {launch.world_size} processes but trainer.backend is {backend}; "
                          f"use auto (or ddp) under torchrun")
    return ddp


def choose_device(trainer_cfg, local_rank):
    """trainer.device: this rank's own GPU (cuda:<local rank>, TF32 as trainer.tf32 says) or the CPU."""
    use_cuda = trainer_cfg["device"] == "cuda" or (trainer_cfg["device"] == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("trainer.device is cuda but no CUDA GPU is visible; use auto or cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU of its own: this machine shows "
                          f"{torch.cuda.device_count()}; start at most that many processes per machine "
                          f"(torchrun --nproc_per_node), or pass --trainer.device cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    # TF32 matmuls on Ampere and newer: float32 range, several times the speed
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = trainer_cfg["tf32"]
    return device


def set_threads(trainer_cfg, local_world_size):
    """trainer.num_threads, or this machine's cores shared among its processes: oversubscribed
    cores slow every process down."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(trainer_cfg["num_threads"] or max(1, cores // local_world_size))


def this_process(trainer_cfg):
    """This process's place among torchrun's (one of one without it), its device, CPU threads and
    precision, decided once and said once. DDP's process group is the caller's to start."""
    launch = torchrun_launch()
    ddp = uses_ddp(trainer_cfg, launch)
    device = choose_device(trainer_cfg, launch.local_rank)
    set_threads(trainer_cfg, launch.local_world_size)
    proc = Process(launch.rank, launch.local_rank, launch.world_size, device, launch.rank == 0, ddp and launch.launched)
    if ddp and not launch.launched:
        proc.say(f"note: trainer.backend {trainer_cfg['backend']} without torchrun: running as a "
                 f"world of one process (launch with torchrun --nproc_per_node N for more)")
    proc.amp_dtype = decide_amp_dtype(uses_amp(trainer_cfg), trainer_cfg["amp_dtype"], device,
                                      say=proc.say)
    return proc


def per_rank_batch(tcfg, world_size):
    """Examples each rank takes per step; a global batch that does not divide among the ranks is
    a config error (checked again at the start of a run, before anything is written)."""
    if tcfg["train_batch_size"] % world_size:
        raise ConfigError(f"trainer.train_batch_size {tcfg['train_batch_size']} does not divide "
                          f"among {world_size} processes; use a multiple of {world_size}")
    return tcfg["train_batch_size"] // world_size


def single_process(device="cpu"):
    """The Process of a run that is not distributed (tools and tests)."""
    return Process(0, 0, 1, torch.device(device), True, False)


def on_main(proc, fn, *args):
    """fn(*args) on the main process only, its result handed to every rank.

    If it fails, every rank raises too: no rank is left waiting in a collective for a process that
    has given up (on NCCL such a wait only ends at the watchdog timeout).
    """
    result, error = None, None
    if proc.is_main:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
            error = e
    if proc.ddp:
        shared = [("error", str(error)) if error is not None else ("ok", result)]
        dist.broadcast_object_list(shared, src=0, group=proc.cpu_group)
        kind, result = shared[0]
        if kind == "error" and error is None:
            raise MainProcessFailed(f"the main process (rank 0) failed: {result}")
    if error is not None:
        raise error
    return result


def agree(proc, flag, how):
    """One flag that every rank holds alike: how="max" is true if any rank's is, "min" if all are.

    A one-number all-reduce over the CPU (gloo) group, so it never waits for the GPU.
    """
    if not proc.ddp:
        return bool(flag)
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.MIN, group=proc.cpu_group)
    return bool(value.item())


def gather(proc, obj):
    """Every rank's obj (picklable), in rank order, on every rank; over the CPU (gloo) group."""
    if not proc.ddp:
        return [obj]
    gathered = [None] * proc.world_size
    dist.all_gather_object(gathered, obj, group=proc.cpu_group)
    return gathered


def decide_amp_dtype(amp, choice, device, say):
    """The autocast dtype of mixed precision (trainer.amp, trainer.amp_dtype), or None for float32;
    said plainly, once, at the start of the run."""
    if not amp:
        return None
    if device.type == "cuda":
        if choice == "auto":  # emulated bf16 (V100, T4) is slower than fp16 with a GradScaler
            choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        say(f"mixed precision: autocast {choice} on {torch.cuda.get_device_name(device)}"
            f"{' with GradScaler' if choice == 'fp16' else ''}")
        return torch.bfloat16 if choice == "bf16" else torch.float16
    if choice == "auto":
        # CPUs without native bf16 run a bf16 matmul far slower than fp32 (bench/README.md)
        say("mixed precision: off on a CPU; training in float32 (autocast there is bf16, "
            "much slower than fp32 without native bf16; force with --trainer.amp_dtype bf16)")
        return None
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    say(f"mixed precision: autocast {choice} on the CPU"
        f"{'' if native else ' (this CPU has no native bf16: expect it to be far slower than fp32)'}")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def autocast(proc):
    """The run's mixed precision for a forward pass; nothing in float32."""
    if proc.amp_dtype is None:
        return nullcontext()
    return torch.autocast(proc.device.type, dtype=proc.amp_dtype)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state(device):
    """This process's random generators as tensors and numbers, so a checkpoint stays plain data."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":  # this rank's own GPU only: the machine that resumes may have fewer
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
