"""Fine-tune a Hugging Face encoder for text sequence classification: the training loop and the CLI.

One process (CPU or one GPU):
    python trainer.py                                        # the default job in config.yaml
    python trainer.py --trainer.epochs 3 --module.max_lr 3e-5
Evaluate a checkpoint, or label new texts:
    python trainer.py --data.train_filepath null --data.val_filepath test.csv --model.model_path checkpoints/best
    python trainer.py --data.train_filepath null --data.val_filepath null \
        --data.predict_filepath new.csv --model.model_path checkpoints/best
Several processes (DDP), on one machine or several:
    torchrun --nproc_per_node 4 trainer.py --trainer.backend ddp-amp
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint host:29500 trainer.py --trainer.backend ddp
Resume after a crash:
    python trainer.py --ckpt.resume auto

The loop is written out by hand so it can be read: global batch = micro-batches x accumulation x
ranks, the loss scaled by the true number of examples in each step, no gradient sync on non-final
micro-steps, GradScaler for float16 only, a linear warmup / decay schedule, and checkpoints that
carry everything needed to resume exactly.
"""
import csv
import json
import math
import os
import random
import signal
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import speedups
from checkpoint import (LINKS, CheckpointError, SaveDirLock, check_writable_dir, checkpoint_name, file_digest,
                        foreign_lookalikes, load_checkpoint, move_aside, new_session, our_checkpoints, our_link,
                        point_link, prune, read_manifest, recover, restore_aside, write_checkpoint)
from config import GOLDEN_CONFIG, ConfigError, load_config
from data import DataError, collate, encode, eval_batches, micro_batches, read_examples, train_batches
from metrics import compute_metrics, format_report
from model import ModelError, build_model, load_tokenizer, load_weights, save_pretrained

TRAINING_STATE = "training_state"


# ---------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class Process:
    """Where this process stands: its rank among world_size processes, and its device."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool
    ddp: bool


def log(proc, message):
    """Print on the main process only, keeping the progress bar intact."""
    if proc.is_main:
        tqdm.write(message, file=sys.stdout)


def setup_distributed(trainer_cfg):
    """Read torchrun's environment, pick the device, start the process group for DDP."""
    ddp = trainer_cfg["backend"].startswith("ddp")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched else 1
    if world_size > 1 and not ddp:
        raise ConfigError(f"started with {world_size} processes but trainer.backend is "
                          f"{trainer_cfg['backend']}; use ddp or ddp-amp under torchrun")
    use_cuda = trainer_cfg["device"] == "cuda" or (
        trainer_cfg["device"] == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("trainer.device is cuda but no CUDA GPU is visible; use auto or cpu")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # processes on one machine share its cores; oversubscribing them slows every process down
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(trainer_cfg["num_threads"] or max(1, cores // local_world_size))
    if ddp and launched:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=device if use_cuda else None)
    proc = Process(rank, local_rank, world_size, device, rank == 0, ddp and launched)
    if ddp and not launched:
        log(proc, f"note: trainer.backend {trainer_cfg['backend']} without torchrun: running as a "
                  f"world of one process (launch with torchrun --nproc_per_node N for more)")
    return proc


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(trainer_cfg, proc):
    """The autocast dtype of *-amp backends, or None for float32; said plainly at start."""
    if not trainer_cfg["backend"].endswith("-amp"):
        return None
    choice, device = trainer_cfg["amp_dtype"], proc.device
    if device.type == "cuda":
        if choice == "auto":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        log(proc, f"mixed precision: autocast {choice} on {torch.cuda.get_device_name(device)}"
                      f"{' with GradScaler' if choice == 'fp16' else ''}")
        return torch.bfloat16 if choice == "bf16" else torch.float16
    if choice == "auto":
        # CPUs without native bf16 run a bf16 matmul about 100x slower than fp32 (measured here)
        log(proc, "mixed precision: off on a CPU; training in float32 (autocast there is bf16, "
                      "much slower than fp32 without native bf16; force with --trainer.amp_dtype bf16)")
        return None
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    log(proc, f"mixed precision: autocast {choice} on the CPU"
                  f"{'' if native else ' (this CPU has no native bf16: expect it to be far slower than fp32)'}")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state(device):
    """This process's random generators as tensors and numbers, so a checkpoint stays plain data."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":  # this rank's own GPU only: the machine that resumes may have fewer
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, loss


def lr_multiplier(step, warmup_steps, total_steps):
    """Linear warmup to 1, then linear decay to 0, for the update with index `step` (from 0).

    The warmup counts from 1/warmup_steps, not from 0, so the first update already learns; the
    decay reaches 0 only after the last update.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_optimizer(model, lr, weight_decay):
    """AdamW with weight decay on weight matrices only: biases and LayerNorm gains are exempt.

    fused: one kernel over all parameters; on our CPUs the default per-parameter loop took 2-7x
    longer per update, about a sixth of a MiniLM training step (bench/README.md). CPU and CUDA have it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def supervised_loss(model, batch):
    """Summed loss over the batch's examples (the caller divides by the step's example count)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # losses in float32, also under autocast
    if logits.shape[-1] == 1:
        loss = F.mse_loss(logits.squeeze(-1), batch["labels"].float(), reduction="sum")
    else:
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
    return loss, {}


# ---------------------------------------------------------------------------------------------
# data, evaluation and predictions


@dataclass
class Split:
    """One data file: its checked rows and their token ids."""
    examples: object
    encoded: object


def load_split(cfg, tokenizer, path, need_labels):
    examples = read_examples(path, cfg["data"], cfg["data"]["labels_list"], need_labels)
    return Split(examples, encode(tokenizer, examples, cfg["module"]["max_seq_len"]))


def label_names(cfg):
    labels = cfg["data"]["labels_list"]
    return None if len(labels) == 1 else [str(label) for label in labels]


@torch.inference_mode()
def predict_logits(model, encoded, batch_size, pad_token_id, proc, amp_dtype):
    """Float32 logits of every example in input order; batches sorted by length, sharded by rank."""
    was_training = model.training
    model.eval()
    shards = []
    for indices in eval_batches(encoded.lengths, batch_size, proc.rank, proc.world_size):
        batch = {k: v.to(proc.device, non_blocking=True)
                 for k, v in collate(encoded, indices, pad_token_id).items() if k != "labels"}
        with autocast(proc, amp_dtype):
            logits = model(**batch).logits.float()
        shards.append((indices, logits.cpu().numpy()))
    model.train(was_training)
    if proc.ddp:  # every example was on exactly one rank: gather them all, no duplicates
        gathered = [None] * proc.world_size
        dist.all_gather_object(gathered, shards)
        shards = [shard for rank_shards in gathered for shard in rank_shards]
    num_outputs = shards[0][1].shape[1] if shards else 1
    logits = np.zeros((len(encoded), num_outputs), dtype=np.float32)
    for indices, values in shards:
        logits[indices] = values
    return logits


def logits_to_predictions(logits, names):
    return logits[:, 0] if names is None else logits.argmax(axis=1)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def write_predictions(path, examples, logits, names):
    """The input columns, the predicted label and every class probability, in input order."""
    extra = ["prediction"] if names is None else ["predicted_label"] + [f"prob_{n}" for n in names]
    probs = None if names is None else softmax(logits)
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow([str(c) for c in examples.columns] + extra)
        for i, row in enumerate(examples.rows):
            values = ["" if row.get(c) is None else row.get(c) for c in examples.columns]
            if names is None:
                values.append(f"{logits[i, 0]:.6g}")
            else:
                values += [names[int(probs[i].argmax())]] + [f"{p:.6f}" for p in probs[i]]
            writer.writerow(values)


@contextmanager
def atomic_write(path, newline=None):
    """A text file open for writing under a temporary name of its own beside path, renamed onto
    path only once complete: a kill or a full disk never leaves half a file there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def autocast(proc, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(proc.device.type, dtype=amp_dtype)


def scalar_metrics(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------------
# the main process's work, shared


class TrainingError(Exception):
    """The run cannot go on (for example a non-finite loss); reported as one line."""


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
        dist.broadcast_object_list(shared, src=0)
        kind, result = shared[0]
        if kind == "error" and error is None:
            raise TrainingError(f"the main process (rank 0) failed: {result}")
    if error is not None:
        raise error
    return result


def new_window(device):
    """Running sums of one logging interval: summed loss, examples, loss terms, its start time."""
    return {"loss": torch.zeros((), device=device), "examples": 0, "terms": {}, "start": time.perf_counter()}


# keys a resumed run may change: they steer logging, checkpoint cadence, threads, debugging or the
# predictions written at the end, never the arithmetic of training
RESUME_MAY_CHANGE = {"trainer.log_steps", "trainer.log_dir", "trainer.num_threads", "trainer.debug",
                     "ckpt.checkpoint", "ckpt.period", "ckpt.save_steps", "ckpt.keep_last",
                     "ckpt.resume", "ckpt.overwrite", "data.predict_filepath", "data.predict_output"}
# data files are compared by content (a moved file is the same data; an edited one is not)
DATA_FILE_KEYS = ("data.train_filepath", "data.val_filepath", "distill.unlabeled_filepaths")


def data_digests(cfg):
    """{key: content hash} of every data file that training reads."""
    digests = {}
    for key in DATA_FILE_KEYS:
        section, name = key.split(".")
        paths = cfg[section][name]
        paths = paths if isinstance(paths, list) else [paths]
        digests[key] = [file_digest(p) if p is not None else None for p in paths]
    return digests


def resume_conflicts(saved_cfg, saved_digests, cfg, digests):
    """'key old -> new' for every difference between a checkpoint's run and this one that would
    make the resumed run silently different from continuing the original."""
    conflicts = []
    for section, values in cfg.items():
        for name, value in values.items():
            key, old = f"{section}.{name}", saved_cfg.get(section, {}).get(name)
            if key in RESUME_MAY_CHANGE or key in DATA_FILE_KEYS or old == value:
                continue
            if key == "trainer.epochs" and value > old:
                continue  # documented: a finished run can be extended
            conflicts.append(f"{key} {old!r} -> {value!r}" + (" (may only grow)" if key == "trainer.epochs" else ""))
    for key in DATA_FILE_KEYS:
        if saved_digests.get(key) != digests[key]:
            conflicts.append(f"{key}: the file's content differs from the one the checkpoint trained on")
    return conflicts


class Trainer:
    """The state of one training run and the steps of its loop.

    loss_fn(model, batch) -> (summed loss, {term name: summed term}) lets distillation train with
    another loss through the same loop; `model` may wrap the Hugging Face model as `.student`.
    """

    def __init__(self, cfg, proc, model, tokenizer, train, val, loss_fn=supervised_loss):
        self.cfg, self.proc, self.tokenizer = cfg, proc, tokenizer
        self.train_split, self.val_split, self.loss_fn = train, val, loss_fn
        tcfg = cfg["trainer"]
        self.amp_dtype = autocast_dtype(tcfg, proc)
        self.model = model.to(proc.device)
        self.optimizer = build_optimizer(self.model, cfg["module"]["max_lr"],
                                         cfg["module"]["weight_decay"])
        self.setup_batches()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, self.warmup_steps, self.total_steps))
        # loss scaling guards float16 gradients from underflow; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(proc.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best = None  # {"value", "path", "metrics", "step"} of the best validation so far
        self.skipped_steps = 0
        self.window = new_window(proc.device)
        self.signals, self.stop_signal, self.stopping = 0, None, False
        self.run_dir = None
        # the save folder: its lock, this launch's id, checkpoints moved aside by this launch
        self.lock, self.session, self.aside, self.digests = None, new_session(), None, None
        if proc.ddp:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[proc.device] if proc.device.type == "cuda" else None)
        else:
            self.ddp_model = self.model
        if tcfg["compile"]:
            self.ddp_model = torch.compile(self.ddp_model, dynamic=True)

    def setup_batches(self):
        """Per-rank micro-batch plan and step counts, from the global batch and the world size."""
        tcfg, world_size = self.cfg["trainer"], self.proc.world_size
        if tcfg["train_batch_size"] % world_size:
            raise ConfigError(f"trainer.train_batch_size {tcfg['train_batch_size']} does not divide "
                              f"among {world_size} processes; use a multiple of {world_size}")
        self.per_rank_batch = tcfg["train_batch_size"] // world_size
        self.grad_accum_steps = math.ceil(self.per_rank_batch / tcfg["gpu_batch_size_limit"])
        self.steps_per_epoch = len(self.epoch_batches(0))
        self.total_steps = max(1, self.steps_per_epoch * tcfg["epochs"])
        self.warmup_steps = round(self.cfg["module"]["warmup_prop"] * self.total_steps)

    def epoch_batches(self, epoch):
        return train_batches(self.train_split.encoded.lengths, self.cfg["trainer"]["train_batch_size"],
                             self.cfg["trainer"]["seed"], epoch, self.proc.rank, self.proc.world_size)

    @property
    def hf_model(self):
        """The Hugging Face model inside (what checkpoints and evaluation use)."""
        return getattr(self.model, "student", self.model)

    @property
    def epoch_number(self):
        """The epoch (from 1) that the last step belongs to: what logs and checkpoint names say."""
        return self.epoch + (self.batch_in_epoch > 0)

    # -- the loop ------------------------------------------------------------------------------

    def train(self):
        tcfg = self.cfg["trainer"]
        self.run_dir = on_main(self.proc, self.open_logs)
        log(self.proc, f"training: {len(self.train_split.encoded)} examples, {tcfg['epochs']} epochs x "
                       f"{self.steps_per_epoch} steps, global batch {tcfg['train_batch_size']} = "
                       f"{self.proc.world_size} processes x {self.grad_accum_steps} micro-batches "
                       f"of <= {tcfg['gpu_batch_size_limit']}, warmup {self.warmup_steps} steps, "
                       f"device {self.proc.device}")
        self.model.train()
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not self.proc.is_main,
                        desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        # SIGTERM / SIGINT end the current step; then a checkpoint is written and the run stops
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.epoch < tcfg["epochs"] and not self.stopping:
                self.train_epoch(progress)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            progress.close()
        if self.stopping:
            return None
        return self.finish()

    def train_epoch(self, progress):
        tcfg, ckpt = self.cfg["trainer"], self.cfg["ckpt"]
        batches = self.epoch_batches(self.epoch)
        for rank_indices, global_size in batches[self.batch_in_epoch:]:
            self.train_step(rank_indices, global_size)
            self.step += 1
            self.batch_in_epoch += 1
            progress.update(1)
            if self.step % tcfg["log_steps"] == 0:
                self.log_train(progress)
            if tcfg["eval_steps"] and self.step % tcfg["eval_steps"] == 0 and self.batch_in_epoch < len(batches):
                self.validate()
            if ckpt["save_steps"] and self.step % ckpt["save_steps"] == 0:
                self.save_checkpoint()
            if self.stopping:  # agreed by every rank in train_step, so all of them save together
                self.save_checkpoint(reason="stop")
                return
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.validate()
        if ckpt["checkpoint"] and ckpt["period"] and self.epoch % ckpt["period"] == 0:
            self.save_checkpoint()  # nothing new is written if validation just saved this step

    def train_step(self, rank_indices, global_size):
        """One optimizer step over a global batch: accumulate micro-batches, clip, step."""
        tcfg, window = self.cfg["trainer"], self.window
        micro = micro_batches(rank_indices, tcfg["gpu_batch_size_limit"])
        # each rank's summed loss is scaled so that DDP's mean over ranks is the mean over the
        # global batch: this weighs every example equally, also in a short last step
        scale = self.proc.world_size / global_size
        step_loss = torch.zeros((), device=self.proc.device)
        for i, indices in enumerate(micro):
            batch = {k: v.to(self.proc.device, non_blocking=True)
                     for k, v in collate(self.train_split.encoded, indices,
                                         self.tokenizer.pad_token_id).items()}
            # gradients are all-reduced only on the last micro-batch; no_sync covers the forward too
            is_last = i == len(micro) - 1
            sync = nullcontext() if is_last or not self.proc.ddp else self.ddp_model.no_sync()
            with sync:
                with autocast(self.proc, self.amp_dtype):
                    loss, terms = self.loss_fn(self.ddp_model, batch)
                self.scaler.scale(loss * scale).backward()
            step_loss += loss.detach()
            for name, value in terms.items():
                window["terms"][name] = window["terms"].get(name, 0) + value.detach()
        self.agree_to_stop(step_loss)  # before the update, so a bad loss never reaches the weights
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if tcfg["clip_grads"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg["max_grad_norm"])
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # inf/nan gradients: GradScaler skipped this update
        else:
            self.scheduler.step()  # the schedule only advances with real updates
        self.optimizer.zero_grad(set_to_none=True)
        window["loss"] += step_loss
        window["examples"] += len(rank_indices)  # summed over ranks at log time

    def log_train(self, progress):
        """Mean loss over the window's examples (and ranks), learning rate, throughput."""
        window = self.window
        stats = torch.stack([window["loss"], torch.tensor(float(window["examples"]), device=self.proc.device)]
                            + [v.float() for v in window["terms"].values()])
        if self.proc.ddp:
            dist.all_reduce(stats)
        stats = stats.tolist()  # the one host sync of a log interval
        elapsed = time.perf_counter() - window["start"]
        scalars = {"train/loss": stats[0] / stats[1], "train/lr": self.scheduler.get_last_lr()[0],
                   "train/examples_per_s": stats[1] / elapsed}
        for name, value in zip(window["terms"], stats[2:]):
            scalars[f"train/{name}"] = value / stats[1]
        if self.skipped_steps:
            scalars["train/skipped_steps"] = self.skipped_steps
        self.write_scalars(scalars)
        progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}",
                             ex_s=f"{scalars['train/examples_per_s']:.1f}")
        self.window = new_window(self.proc.device)

    def validate(self):
        """Metrics on the validation file; saves and marks the best checkpoint. None without one."""
        if self.val_split is None:
            return None
        names = label_names(self.cfg)
        logits = predict_logits(self.hf_model, self.val_split.encoded, self.cfg["trainer"]["val_batch_size"],
                                self.tokenizer.pad_token_id, self.proc, self.amp_dtype)
        metrics = compute_metrics(logits_to_predictions(logits, names), self.val_split.encoded.labels, names)
        metric = self.cfg["module"]["metric"]
        self.write_scalars({f"val/{k}": v for k, v in scalar_metrics(metrics).items()})
        log(self.proc, f"validation at step {self.step} (epoch {self.epoch_number}): "
                       + "  ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(metrics).items()))
        if self.best is None or metrics[metric] > self.best["value"]:
            # the new best is recorded before the save, so the checkpoint's state holds it
            ckpt = self.cfg["ckpt"]
            path = (Path(ckpt["model_state_save_dir"]) / self.checkpoint_name()) if ckpt["checkpoint"] else None
            self.best = {"value": metrics[metric], "metrics": metrics, "step": self.step,
                         "path": None if path is None else str(path)}
            if path is not None:
                self.save_checkpoint(reason="best")
        return metrics

    def finish(self):
        """Reload the best model for predictions and report: the final metrics of the run."""
        if self.best is None:
            return {"step": self.step}
        if self.best["path"] is not None and self.best["step"] != self.step:
            load_weights(self.hf_model, str(Path(self.best["path"]) / "model.safetensors"))
        result = {**scalar_metrics(self.best["metrics"]), "best_step": self.best["step"],
                  "best_checkpoint": self.best["path"]}
        on_main(self.proc, write_json, Path(self.run_dir) / "final_metrics.json", self.best["metrics"] | result)
        return result

    # -- stopping ------------------------------------------------------------------------------

    def request_stop(self, signum, frame):
        self.signals += 1
        if self.signals > 1:  # a second Ctrl-C: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name

    def agree_to_stop(self, step_loss):
        """(loss not finite, stop requested) as agreed by all ranks, so that none waits forever.

        One small all-reduce per step under DDP; float16 overflows are left to GradScaler.
        """
        nonfinite = not self.scaler.is_enabled() and not torch.isfinite(step_loss)
        flags = torch.tensor([float(nonfinite), float(self.stop_signal is not None)],
                             device=self.proc.device)
        if self.proc.ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = flags.tolist()
        self.stopping = bool(stop)
        if self.stopping and self.stop_signal is None:
            self.stop_signal = "a signal to another process"
        if nonfinite:
            last = Path(self.cfg["ckpt"]["model_state_save_dir"]) / "last"
            raise TrainingError(f"step {self.step + 1}: the loss is not finite; lower module.max_lr "
                                f"or check the data. Last good checkpoint: "
                                f"{last.resolve() if last.exists() else 'none'}")

    # -- logs ----------------------------------------------------------------------------------

    def open_logs(self):
        """A new log folder per run (a resumed run continues its own), never deleting others."""
        from torch.utils.tensorboard import SummaryWriter
        if self.run_dir is None:
            self.run_dir = new_run_dir(self.cfg["trainer"]["log_dir"], "train")
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        # a resumed run redoes the steps after its checkpoint: drop what the killed run logged there
        self.writer = SummaryWriter(self.run_dir, purge_step=self.step + 1 if self.step else None)
        self.jsonl = Path(self.run_dir) / "metrics.jsonl"
        truncate_jsonl(self.jsonl, self.step)
        write_json(Path(self.run_dir) / "config.json", self.cfg)
        log(self.proc, f"logs: {self.run_dir}")
        return self.run_dir

    def write_scalars(self, scalars):
        on_main(self.proc, self.append_scalars, scalars)

    def append_scalars(self, scalars):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, self.step)
        self.writer.flush()
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "epoch": self.epoch_number, **scalars}) + "\n")

    # -- the save folder, checkpoints and resume -----------------------------------------------

    def prepare_save_dir(self):
        """Main process, before step 1: check the output folders, lock the save folder, repair what a
        killed run left, choose the checkpoint to resume from. Returns its path or None."""
        ckpt = self.cfg["ckpt"]
        save_dir, prefix = Path(ckpt["model_state_save_dir"]), ckpt["file_prefix"]
        check_writable_dir(self.cfg["trainer"]["log_dir"], "trainer.log_dir")
        check_writable_dir(save_dir, "ckpt.model_state_save_dir")
        self.lock = SaveDirLock(save_dir)
        for message in recover(save_dir, prefix):
            log(self.proc, f"note: {message}")
        for name in LINKS:
            if not our_link(save_dir, name, prefix):
                raise CheckpointError(f"{save_dir / name} was not made by this trainer, which keeps its "
                                      f"`{name}` link there; move it away or choose another "
                                      f"ckpt.model_state_save_dir")
        foreign = foreign_lookalikes(save_dir, prefix)
        if foreign:
            log(self.proc, f"note: ignoring {', '.join(foreign)} in {save_dir}: not written by this trainer")
        self.digests = data_digests(self.cfg)
        resume = self.choose_resume(our_checkpoints(save_dir, prefix))
        return None if resume is None else str(resume)

    def choose_resume(self, ours):
        """The checkpoint to resume from (None: a fresh run), after the overwrite and resume rules."""
        ckpt = self.cfg["ckpt"]
        if ckpt["resume"] is None:
            if ours and not ckpt["overwrite"]:
                raise ConfigError(f"{ckpt['model_state_save_dir']} already holds checkpoints "
                                  f"({ours[-1][1].name}); resume with --ckpt.resume auto, choose another "
                                  f"--ckpt.model_state_save_dir, or pass --ckpt.overwrite true to replace them")
            self.move_aside([path for _, path, _ in ours], "replaced by this run")
            return None
        if ckpt["resume"] == "auto":
            chosen = None
            for _, path, _ in reversed(ours):
                try:
                    chosen = (path, load_checkpoint(path, ckpt["file_ext"])[1])
                    break
                except CheckpointError as e:
                    log(self.proc, f"note: skipping {path.name}: {e}")
            if chosen is None:
                return None
        else:
            path = Path(ckpt["resume"])
            chosen = (path, load_checkpoint(path, ckpt["file_ext"])[1])
        path, manifest = chosen
        self.check_compatible(path, manifest)
        newer = [p for step, p, _ in ours if step > manifest["step"] and p.resolve() != path.resolve()]
        if newer and ckpt["resume"] != "auto" and not ckpt["overwrite"]:
            raise ConfigError(f"{ckpt['model_state_save_dir']} holds checkpoints newer than {path.name} "
                              f"({', '.join(p.name for p in newer)}); resume the newest (--ckpt.resume auto), "
                              f"or pass --ckpt.overwrite true to replace them with this run's")
        self.move_aside(newer, "newer than the one resumed")  # with auto: the ones that did not load
        return path

    def check_compatible(self, path, manifest):
        """Refuse to resume with a config or data that would make the run silently different."""
        if manifest["world_size"] != self.proc.world_size:
            raise ConfigError(f"{path} was written by {manifest['world_size']} processes; resume it "
                              f"with the same number (this run has {self.proc.world_size})")
        conflicts = resume_conflicts(manifest["config"], manifest["data"], self.cfg, self.digests)
        if conflicts:
            raise ConfigError(f"cannot resume {path}: {'; '.join(conflicts)}. Resume with the checkpoint's "
                              f"settings, or start a new run from its weights with --model.model_path {path}")

    def move_aside(self, paths, why):
        if paths:
            self.aside = move_aside(self.cfg["ckpt"]["model_state_save_dir"], paths, self.session)
            log(self.proc, f"note: moved {len(paths)} checkpoints {why} to {self.aside}; they are deleted "
                           f"once this run has written a checkpoint, and put back if it fails first")

    def checkpoint_name(self):
        return checkpoint_name(self.cfg["ckpt"]["file_prefix"], self.epoch_number, self.step)

    def rank_state(self):
        """This rank's part of the training state: its RNG and its logging window."""
        w = self.window
        window = {"loss": w["loss"].cpu(), "examples": w["examples"],
                  "terms": {k: v.cpu() for k, v in w["terms"].items()}}
        return {"rng": rng_state(self.proc.device), "window": window}

    def save_checkpoint(self, reason="period"):
        """Write a checkpoint of every rank's state; the main process writes it."""
        per_rank = [self.rank_state()]
        if self.proc.ddp:  # a collective: every rank calls save_checkpoint at the same step
            per_rank = [None] * self.proc.world_size
            dist.all_gather_object(per_rank, self.rank_state())
        return Path(on_main(self.proc, self.write_checkpoint, per_rank, reason))

    def write_checkpoint(self, per_rank, reason):
        ckpt = self.cfg["ckpt"]
        save_dir, name = Path(ckpt["model_state_save_dir"]), self.checkpoint_name()
        existing = read_manifest(save_dir / name)
        if existing is not None and existing.get("session") == self.session:
            path = save_dir / name  # this launch already saved this step (validation did)
        else:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "ranks": per_rank}
            if self.model is not self.hf_model:  # e.g. distillation projections beside the student
                state["module"] = self.model.state_dict()

            def write_files(folder):
                save_pretrained(self.hf_model, self.tokenizer, folder)
                torch.save(state, folder / f"training_state{ckpt['file_ext']}")
            manifest = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                        "best": self.best, "skipped_steps": self.skipped_steps, "run_dir": self.run_dir,
                        "world_size": self.proc.world_size, "config": self.cfg, "data": self.digests}
            path = write_checkpoint(save_dir, name, self.session, write_files, manifest)
            log(self.proc, f"checkpoint: {path}" + (f" ({reason})" if reason != "period" else ""))
        point_link(save_dir, "last", path)
        if reason == "best":
            point_link(save_dir, "best", path)
        if self.aside is not None:  # this run now has a checkpoint of its own
            shutil.rmtree(self.aside)
            self.aside = None
        if ckpt["keep_last"] is not None:
            best = self.best["path"] if self.best else None
            prune(save_dir, ckpt["file_prefix"], ckpt["keep_last"], [best, path])
        return str(path)

    def resume_from(self, path):
        """Restore weights, optimizer, schedule, scaler, position, logging window and RNG."""
        state, manifest = load_checkpoint(path, self.cfg["ckpt"]["file_ext"])
        if "module" in state:
            self.model.load_state_dict(state["module"])
        else:
            load_weights(self.hf_model, str(Path(path) / "model.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = manifest["step"], manifest["epoch"], manifest["batch_in_epoch"]
        self.best, self.skipped_steps, self.run_dir = manifest["best"], manifest["skipped_steps"], manifest["run_dir"]
        mine = state["ranks"][self.proc.rank]
        set_rng_state(mine["rng"], self.proc.device)
        device = self.proc.device
        self.window = {**new_window(device), "loss": mine["window"]["loss"].to(device),
                       "examples": mine["window"]["examples"],
                       "terms": {k: v.to(device) for k, v in mine["window"]["terms"].items()}}
        log(self.proc, f"resumed from {path} at step {self.step} (epoch {self.epoch_number}, "
                       f"batch {self.batch_in_epoch} of {self.steps_per_epoch})")

    def release(self, failed):
        """End of the run on the main process: a failed run puts back what it moved aside."""
        if self.aside is not None:
            if failed:
                restore_aside(self.cfg["ckpt"]["model_state_save_dir"], self.aside)
            else:  # finished without writing a checkpoint (ckpt.checkpoint false)
                shutil.rmtree(self.aside)
            self.aside = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def new_run_dir(log_dir, mode):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(log_dir) / f"{stamp}-{mode}", 1
    while True:
        try:
            path.mkdir(parents=True)
            return str(path)
        except FileExistsError:  # two runs in the same second get their own folders
            n += 1
            path = Path(log_dir) / f"{stamp}-{mode}-{n}"


def truncate_jsonl(path, step):
    """Drop log lines past `step` (the part of a killed run that a resume will redo) and a line
    torn by a kill in the middle of a write."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            print(f"note: {path}:{number}: dropped a torn log line (the run was killed while writing it)")
            continue
        if row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))


def write_text(path, text):
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# the run: check everything, then train, evaluate, predict


def load_splits(cfg, tokenizer):
    """Read and check every file of the run up front, so a bad row fails before training."""
    data = cfg["data"]
    # longer sequences than the model has positions would crash the first forward pass, mid-run
    if cfg["module"]["max_seq_len"] > tokenizer.model_max_length:
        raise ConfigError(f"module.max_seq_len is {cfg['module']['max_seq_len']} but the model takes "
                          f"at most {tokenizer.model_max_length} tokens; lower it")
    train = load_split(cfg, tokenizer, data["train_filepath"], True) if data["train_filepath"] else None
    val = load_split(cfg, tokenizer, data["val_filepath"], True) if data["val_filepath"] else None
    predict = (load_split(cfg, tokenizer, data["predict_filepath"], False)
               if data["predict_filepath"] else None)
    return train, val, predict


def check_outputs(cfg):
    """Every folder the run will write in, checked (and created) before the first step."""
    check_writable_dir(cfg["trainer"]["log_dir"], "trainer.log_dir")
    if cfg["data"]["predict_filepath"] and cfg["data"]["predict_output"]:
        output = Path(cfg["data"]["predict_output"])
        if output.is_dir():
            raise CheckpointError(f"data.predict_output: {output} is a folder; name a file")
        check_writable_dir(output.resolve().parent, "data.predict_output")


def evaluate_only(cfg, proc, model, tokenizer, val):
    """Metrics of a fine-tuned model on a labelled file, with a per-class table."""
    names = label_names(cfg)
    logits = predict_logits(model, val.encoded, cfg["trainer"]["val_batch_size"],
                            tokenizer.pad_token_id, proc, autocast_dtype(cfg["trainer"], proc))
    metrics = compute_metrics(logits_to_predictions(logits, names), val.encoded.labels, names)
    log(proc, f"evaluation of {cfg['model']['model_path']} on {cfg['data']['val_filepath']} "
                  f"({len(val.encoded)} examples)\n{format_report(metrics)}")
    return metrics


def fit(cfg, proc, model, tokenizer, train, val, loss_fn=supervised_loss):
    """Train fresh or resumed (ckpt.resume): (trainer, final metrics or None if stopped)."""
    trainer = Trainer(cfg, proc, model, tokenizer, train, val, loss_fn=loss_fn)
    failed = True
    try:
        resume = on_main(proc, trainer.prepare_save_dir)
        if resume is not None:
            trainer.resume_from(resume)
        result = trainer.train()
        failed = False
    finally:
        if proc.is_main:
            trainer.release(failed)
    if result is None:
        log(proc, f"stopped by {trainer.stop_signal} at step {trainer.step}; resume with "
                      f"--ckpt.resume auto")
    return trainer, result


def run(cfg, proc):
    """Everything a config asks for; returns the final metrics (main process)."""
    seed_everything(cfg["trainer"]["seed"])
    tokenizer = load_tokenizer(cfg["model"])
    train, val, predict = load_splits(cfg, tokenizer)
    model = build_model(cfg["model"], cfg["data"]["labels_list"])
    if cfg["trainer"]["speedups"]:
        speedups.apply(model, proc.device)  # the same arithmetic, less of it (speedups.py)
    on_main(proc, check_outputs, cfg)
    # ranks draw different dropout masks; the initial weights were already the same on all
    seed_everything((cfg["trainer"]["seed"] + proc.rank) % 2**32)
    result, run_dir = {}, None
    if train:
        trainer, result = fit(cfg, proc, model, tokenizer, train, val)
        if result is None:
            return None
        model, run_dir = trainer.hf_model, trainer.run_dir
    elif val:
        metrics = evaluate_only(cfg, proc, model.to(proc.device), tokenizer, val)
        result = scalar_metrics(metrics)
        run_dir = on_main(proc, write_eval_metrics, cfg, metrics)
    if predict:
        result["predictions"] = predict_file(cfg, proc, model.to(proc.device), tokenizer,
                                             predict, run_dir)
    return result


def write_eval_metrics(cfg, metrics):
    run_dir = new_run_dir(cfg["trainer"]["log_dir"], "eval")
    write_json(Path(run_dir) / "eval_metrics.json", metrics)
    print(f"metrics written to {Path(run_dir) / 'eval_metrics.json'}")
    return run_dir


def predict_file(cfg, proc, model, tokenizer, predict, run_dir):
    logits = predict_logits(model, predict.encoded, cfg["trainer"]["val_batch_size"],
                            tokenizer.pad_token_id, proc, autocast_dtype(cfg["trainer"], proc))
    if not proc.is_main:
        return None
    path = cfg["data"]["predict_output"]
    if path is None:
        run_dir = run_dir or new_run_dir(cfg["trainer"]["log_dir"], "predict")
        path = str(Path(run_dir) / "predictions.csv")
    write_predictions(path, predict.examples, logits, label_names(cfg))
    log(proc, f"predictions for {len(predict.encoded)} texts written to {path}")
    return path


def main(argv=None, run_fn=run, doc=__doc__):
    """Command-line entry point: one clear line and exit status 2 on any user error.

    distill.py runs through here too, with its own run_fn and docstring.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(doc + f"\nEvery key, with its default and meaning: {GOLDEN_CONFIG}")
        return 0
    cfg = None
    try:
        cfg = load_config(argv)
        proc = setup_distributed(cfg["trainer"])
        try:
            result = run_fn(cfg, proc)
        finally:
            cleanup_distributed()
    except (ConfigError, DataError, ModelError, TrainingError, CheckpointError) as e:
        if cfg is not None and cfg["trainer"]["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: stopped at once by a second signal, without a new checkpoint; resume from the "
              "last one with --ckpt.resume auto", file=sys.stderr)
        return 130
    if result is None:
        return 1  # stopped by a signal; the checkpoint to resume from is written
    if proc.is_main:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
