r"""Fine-tune a Hugging Face encoder for text sequence classification: the training loop and the CLI.

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
carry everything needed to resume exactly. A step never waits for the GPU: the learning rate, the
count of updates and the skip of an update with non-finite gradients all stay on the device, and
the host reads them once per log interval.

Reading order: Trainer (set-up, train, train_step, validate, checkpoints), then the pieces it uses
(schedule, optimizer, loss; processes and devices; evaluation), then the run and the command line.
Configuration is config.py, files on disk checkpoint.py, data data.py (its token cache
cache.py), models model.py.
"""
import sys

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

import csv
import functools
import gc
import json
import os
import random
import signal
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

# no tqdm monitor thread: a daemon thread that writes to stderr on its own, on the main process
# only, where the rare SIGABRT at the end of CI's torchrun runs struck; the bars still update
tqdm.monitor_interval = 0

import speedups
from cache import cache_folder, cached_encode, mapped
from checkpoint import (CheckpointError, SaveDir, check_writable_dir, checkpoint_name, data_digests, follow_umask,
                        load_checkpoint, new_session, point_link, prune, read_manifest, sees_lock_of, write_checkpoint)
from config import ConfigError, fit_metric_to_task, load_config, print_help, task_of, uses_amp
from data import (DataError, cap_windows, collate, count_examples, dropped_by_truncation, encode, eval_batches,
                  example_chunks, micro_batches, read_examples, train_batches, window_stride)
from metrics import best_thresholds, compute_metrics, format_report, multilabel_metrics
from model import (ModelError, build_model, load_tokenizer, load_weights, save_pretrained, save_thresholds,
                   saved_thresholds, use_checkpoint_settings)


# rows of a predict file read, tokenized, run and written at a time: what prediction holds
PREDICT_CHUNK = 10_000


class TrainingError(Exception):
    """The run cannot go on (for example a non-finite loss); reported as one line."""


class MainProcessFailed(TrainingError):
    """Another rank's word that rank 0 failed: rank 0 reports the cause itself."""


# ---------------------------------------------------------------------------------------------
# the training loop


class Trainer:
    """The state of one training run and the steps of its loop.

    `model` is what is optimized and saved: a Hugging Face classifier, or a module that holds one
    as `.student` (distillation, with loss_fn(model, batch, indices) -> (summed loss, {term: summed
    term}), indices being the batch's rows in the training split).
    `wrapped` is the same model as the forward pass sees it: inside DDP and / or torch.compile.
    """

    def __init__(self, cfg, proc, model, tokenizer, train, val, loss_fn=None):
        self.cfg, self.proc, self.tokenizer = cfg, proc, tokenizer
        self.train_split, self.val_split = train, val
        self.loss_fn = loss_fn or supervised_loss
        tcfg, device = cfg["trainer"], proc.device
        self.amp_dtype = autocast_dtype(tcfg, proc)
        self.model = model.to(device)
        self.wrapped = self.model
        if proc.ddp:
            # no BatchNorm here: the buffers (position ids) never change, so none are broadcast
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
        if tcfg["compile"]:
            self.wrapped = torch.compile(self.wrapped, dynamic=True)
        # free sequence lengths would recompile a compiled model often: pad to multiples of 8 then
        self.pad_to_multiple_of = 8 if tcfg["compile"] else 1

        # batches: global batch = world_size ranks x grad_accum_steps micro-batches of <= the limit
        per_rank = per_rank_batch(tcfg, proc.world_size)
        self.grad_accum_steps = -(-per_rank // tcfg["gpu_batch_size_limit"])  # ceiling division
        self.steps_per_epoch = len(self.epoch_batches(0))
        self.total_steps = max(1, self.steps_per_epoch * tcfg["epochs"])
        self.warmup_steps = round(cfg["module"]["warmup_prop"] * self.total_steps)

        # the optimizer reads its learning rate from a tensor on the device, set before each update
        self.lr = torch.zeros((), device=device)
        self.optimizer = build_optimizer(self.model, self.lr, cfg["module"]["weight_decay"])
        # loss scaling guards float16 gradients from underflow; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

        # where the run stands: all of it goes into a checkpoint
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.updates = torch.zeros((), dtype=torch.int64, device=device)  # steps whose update was made
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # non-finite gradients
        self.best = None  # {"value", "path", "metrics", "step"} of the best validation so far
        self.bad_validations = 0  # in a row, without an improvement of more than min_delta
        # multi-label decisions: module.threshold's, or those tuned at the latest validation
        self.thresholds, self.thresholds_chosen = fixed_thresholds(cfg), "module.threshold"
        self.window = new_window(device)
        self.run_dir, self.session, self.digests, self.save_dir = None, new_session(), None, None
        self.signals, self.stop_signal = 0, None
        self.writer = None  # the main process's TensorBoard writer, from open_logs

    def epoch_batches(self, epoch):
        return train_batches(self.train_split.encoded.lengths, self.cfg["trainer"]["train_batch_size"],
                             self.cfg["trainer"]["seed"], epoch, self.proc.rank, self.proc.world_size)

    @property
    def epoch_number(self):
        """The epoch (from 1) that the last step belongs to: what logs and checkpoint names say."""
        return self.epoch + (self.batch_in_epoch > 0)

    def train(self):
        """Epochs of steps, each followed by logging, validation and checkpoints at their cadence."""
        tcfg, ckpt = self.cfg["trainer"], self.cfg["ckpt"]
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
            while self.epoch < tcfg["epochs"] and not self.stop_early() and not self.paused():
                batches = self.epoch_batches(self.epoch)
                for rank_indices, global_size in batches[self.batch_in_epoch:]:
                    self.train_step(rank_indices, global_size)
                    self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                    progress.update(1)
                    if self.step % tcfg["log_steps"] == 0:
                        self.log_train(progress)
                    if tcfg["eval_steps"] and self.step % tcfg["eval_steps"] == 0 and self.batch_in_epoch < len(batches):
                        self.validate()
                    if ckpt["save_steps"] and self.step % ckpt["save_steps"] == 0:
                        self.save_checkpoint()
                    if self.agree_to_stop():
                        self.save_checkpoint(reason="stop")
                        return None
                    if self.stop_early():
                        break
                if self.batch_in_epoch == len(batches):  # the epoch ran to its end
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self.validate()
                if ckpt["checkpoint"] and (self.stop_early() or self.paused() or ckpt["period"] and self.epoch % ckpt["period"] == 0):
                    self.save_checkpoint()  # nothing new is written if validation just saved this step
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            progress.close()
            if self.writer is not None:  # ends its writer thread, not left to interpreter exit
                self.writer.close()
        self.check_updates(int(self.skipped))
        return self.finish()

    def train_step(self, rank_indices, global_size):
        """One optimizer step over a global batch: accumulate micro-batches, clip, update."""
        tcfg, window = self.cfg["trainer"], self.window
        micro = micro_batches(rank_indices, self.grad_accum_steps)
        # each rank's summed loss is scaled so that DDP's mean over ranks is the mean over the
        # global batch: this weighs every example equally, also in a short last step
        scale = self.proc.world_size / global_size
        for i, indices in enumerate(micro):
            batch = {k: v.to(self.proc.device, non_blocking=True)
                     for k, v in collate(self.train_split.encoded, indices, self.tokenizer.pad_token_id,
                                         self.pad_to_multiple_of).items()}
            # gradients are all-reduced only on the last micro-batch; no_sync covers the forward too
            last = i == len(micro) - 1
            with nullcontext() if last or not self.proc.ddp else self.wrapped.no_sync():
                with autocast(self.proc, self.amp_dtype):
                    loss, terms = self.loss_fn(self.wrapped, batch, indices)
                self.scaler.scale(loss * scale).backward()
            window["loss"] += loss.detach()
            for name, value in terms.items():
                window["terms"][name] = window["terms"].get(name, 0) + value.detach()
        window["examples"] += len(rank_indices)  # summed over ranks at log time

        # the schedule counts updates made, not steps taken: a skipped update does not advance it
        self.lr.copy_(self.cfg["module"]["max_lr"] * lr_multiplier(self.updates, self.warmup_steps, self.total_steps))
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if tcfg["clip_grads"]:
            torch.nn.utils.clip_grads_with_norm_(params, tcfg["max_grad_norm"], grad_norm)
        # a non-finite loss or gradient must never reach the weights; the check stays on the
        # device (fused AdamW skips the update when found_inf is 1), so the host never waits here
        not_finite = ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # GradScaler finds the same infs and skips itself
            self.scaler.update()
        else:
            self.optimizer.found_inf = not_finite.float()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += ~not_finite
        self.skipped += not_finite

    def log_train(self, progress):
        """Mean loss over the window's examples (and ranks), learning rate, throughput."""
        window, device = self.window, self.proc.device
        sums = torch.stack([window["loss"].float(), torch.tensor(float(window["examples"]), device=device)]
                           + [v.float() for v in window["terms"].values()])
        if self.proc.ddp:
            dist.all_reduce(sums)
        # the one host sync of a log interval (lr and skipped are the same on every rank)
        lr, skipped, loss, examples, *terms = torch.cat([torch.stack([self.lr.float(), self.skipped.float()]), sums]).tolist()
        skipped = int(skipped)
        self.check_updates(skipped)
        elapsed = time.perf_counter() - window["start"]
        scalars = {"train/loss": loss / examples, "train/lr": lr, "train/examples_per_s": examples / elapsed}
        for name, value in zip(window["terms"], terms):
            scalars[f"train/{name}"] = value / examples
        if skipped:
            scalars["train/skipped_steps"] = skipped
        self.write_scalars(scalars)
        progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{lr:.2e}", ex_s=f"{scalars['train/examples_per_s']:.1f}")
        self.window = new_window(self.proc.device)

    def check_updates(self, skipped):
        """In float32 / bfloat16, a skipped update means a non-finite loss: stop (the weights never
        saw it). float16 skips are GradScaler finding its scale and only counted."""
        if skipped and not self.scaler.is_enabled():
            last = Path(self.cfg["ckpt"]["model_state_save_dir"]) / "last"
            raise TrainingError(f"by step {self.step}, {skipped} updates were skipped: the loss or its gradients "
                                f"were not finite; lower module.max_lr or check the data. Last good "
                                f"checkpoint: {last.resolve() if last.exists() else 'none'}")

    def validate(self):
        """Metrics on the validation file; saves and marks the best checkpoint. None without one."""
        if self.val_split is None:
            return None
        logits = predict_logits(classifier_of(self.model), self.val_split.encoded, self.cfg["trainer"]["val_batch_size"],
                                self.tokenizer.pad_token_id, self.proc, self.amp_dtype, desc="validate")
        # the main process has the logits; every rank gets the metrics, to agree on the best
        metrics = on_main(self.proc, split_metrics, logits, self.val_split, self.cfg, f"at step {self.step}")
        if self.cfg["data"]["multi_label"]:  # tuned (module.threshold tune) on this validation, or fixed
            self.thresholds = thresholds_of(metrics)
            if self.cfg["module"]["threshold"] == "tune":
                self.thresholds_chosen = (f"tuned on {self.cfg['data']['val_filepath']} (each label's F1-best) "
                                          f"at the validation of step {self.step}")
        self.write_scalars({f"val/{k}": v for k, v in scalar_metrics(metrics).items()})
        # the per-class table too: a minority class at F1 0.1 shows here, not only in a JSON file
        log(self.proc, f"validation at step {self.step} (epoch {self.epoch_number}): {format_report(metrics)}")
        value, ckpt, tcfg = metrics[self.cfg["module"]["metric"]], self.cfg["ckpt"], self.cfg["trainer"]
        improved = self.best is None or value > self.best["value"] + tcfg["early_stopping_min_delta"]
        self.bad_validations = 0 if improved else self.bad_validations + 1
        if self.best is None or value > self.best["value"]:
            # the new best is recorded before the save, so the checkpoint's state holds it
            path = Path(ckpt["model_state_save_dir"]) / self.checkpoint_name() if ckpt["checkpoint"] else None
            self.best = {"value": value, "metrics": metrics, "step": self.step,
                         "path": None if path is None else str(path)}
            if path is not None:
                self.save_checkpoint(reason="best")
        if self.stop_early():  # after the best is updated: a small gain still makes this step the best
            log(self.proc, f"early stopping at step {self.step}: module.metric {self.cfg['module']['metric']} has not "
                           f"improved by more than {tcfg['early_stopping_min_delta']} for {self.bad_validations} "
                           f"validations; the result is the best checkpoint, of step {self.best['step']}")
        return metrics

    def paused(self):
        """True once trainer.stop_after_epochs epochs are done: this launch ends, resumable."""
        stop_after = self.cfg["trainer"]["stop_after_epochs"]
        return stop_after is not None and self.epoch >= stop_after and self.epoch < self.cfg["trainer"]["epochs"]

    def stop_early(self):
        """True once trainer.early_stopping_patience validations in a row did not improve."""
        patience = self.cfg["trainer"]["early_stopping_patience"]
        return bool(patience) and self.bad_validations >= patience

    def finish(self):
        """Reload the best model for predictions and report: the final metrics of the run."""
        if self.best is None:
            return {"step": self.step}
        if self.best["path"] is not None and self.best["step"] != self.step:
            load_weights(classifier_of(self.model), str(Path(self.best["path"]) / "model.safetensors"))
        result = {**scalar_metrics(self.best["metrics"]), "best_step": self.best["step"],
                  "best_checkpoint": self.best["path"]}
        if self.cfg["data"]["multi_label"]:  # predictions after training decide as the best model did
            self.thresholds = thresholds_of(self.best["metrics"])
        if self.stop_early():
            result["stopped_early_at_step"] = self.step
        elif self.paused():
            result["paused_after_epoch"] = self.epoch
        on_main(self.proc, write_json, Path(self.run_dir) / "final_metrics.json", self.best["metrics"] | result)
        return result

    # -- stopping ------------------------------------------------------------------------------

    def request_stop(self, signum, frame):
        self.signals += 1
        if self.signals > 1:  # a second Ctrl-C: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name

    def agree_to_stop(self):
        """True when any rank was asked to stop, as agreed by all, so that none waits forever.

        Under DDP a one-number all-reduce over a CPU (gloo) group: it never waits for the GPU.
        """
        stop = self.stop_signal is not None
        if self.proc.ddp:
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.proc.cpu_group)
            stop = bool(flag.item())
        if stop and self.stop_signal is None:
            self.stop_signal = "a signal to another process"
        return stop

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

    # -- checkpoints and resume ----------------------------------------------------------------

    def open_save_dir(self):
        """Main process, before step 1: lock the save folder, choose the checkpoint to resume from."""
        self.digests = data_digests(self.cfg)
        self.save_dir = SaveDir(self.cfg, self.session, say=lambda message: log(self.proc, message))
        resume = self.save_dir.open(self.proc.world_size, self.digests)
        return None if resume is None else str(resume), self.session

    def check_shared_save_dir(self, main_session):
        """Every rank reads the checkpoints rank 0 writes (to resume, and the best at the end): on
        several machines the save folder must be one they share. Refuse before step 1 if not."""
        seen = torch.tensor([float(sees_lock_of(self.cfg["ckpt"]["model_state_save_dir"], main_session))])
        dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=self.proc.cpu_group)
        if not seen.item():
            raise ConfigError(f"ckpt.model_state_save_dir {self.cfg['ckpt']['model_state_save_dir']} is not "
                              f"shared by every machine of the run (some rank does not see rank 0's files); "
                              f"put it on a filesystem all machines share")

    def checkpoint_name(self):
        return checkpoint_name(self.cfg["ckpt"]["file_prefix"], self.epoch_number, self.step)

    def rank_state(self):
        """This rank's part of the training state: its RNG and its logging window."""
        w = self.window
        window = {"loss": w["loss"].cpu(), "examples": w["examples"], "terms": {k: v.cpu() for k, v in w["terms"].items()}}
        return {"rng": rng_state(self.proc.device), "window": window}

    def save_checkpoint(self, reason="period"):
        """Write a checkpoint of every rank's state; the main process writes it."""
        self.check_updates(int(self.skipped))  # never save past a skipped float32 update
        per_rank = [self.rank_state()]
        if self.proc.ddp:  # a collective: every rank calls save_checkpoint at the same step
            per_rank = [None] * self.proc.world_size
            dist.all_gather_object(per_rank, self.rank_state(), group=self.proc.cpu_group)
        return Path(on_main(self.proc, self.write_checkpoint, per_rank, reason))

    def write_checkpoint(self, per_rank, reason):
        ckpt = self.cfg["ckpt"]
        save_dir, name = Path(ckpt["model_state_save_dir"]), self.checkpoint_name()
        existing = read_manifest(save_dir / name)
        # this launch already saved this step (validation did); one saved just before the epoch's
        # closing validation (ckpt.save_steps) is saved again, so that it holds that validation's best
        if existing is not None and existing.get("session") == self.session and \
                (existing["epoch"], existing["batch_in_epoch"]) == (self.epoch, self.batch_in_epoch):
            path = save_dir / name
        else:
            state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "updates": self.updates.cpu(), "skipped": self.skipped.cpu(), "ranks": per_rank}
            if self.model is not classifier_of(self.model):  # e.g. distillation projections beside the student
                state["module"] = self.model.state_dict()

            def write_files(folder):
                save_pretrained(classifier_of(self.model), self.tokenizer, folder,
                                max_seq_len=self.cfg["module"]["max_seq_len"])  # truncates as trained
                if self.cfg["data"]["multi_label"]:  # the decisions that go with these weights
                    self.write_thresholds(folder)
                torch.save(state, folder / f"training_state{ckpt['file_ext']}")
            manifest = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                        "best": self.best, "bad_validations": self.bad_validations,
                        "run_dir": self.run_dir, "world_size": self.proc.world_size,
                        "config": self.cfg, "data": self.digests}
            path = write_checkpoint(save_dir, name, self.session, write_files, manifest)
            log(self.proc, f"checkpoint: {path}" + (f" ({reason})" if reason != "period" else ""))
        point_link(save_dir, "last", path)
        if reason == "best":
            point_link(save_dir, "best", path)
        if self.save_dir is not None:
            self.save_dir.wrote_checkpoint()
        if ckpt["keep_last"] is not None:
            prune(save_dir, ckpt["file_prefix"], ckpt["keep_last"], [self.best and self.best["path"], path])
        return str(path)

    def write_thresholds(self, folder):
        if self.thresholds is None:  # tune, before the first validation: the usual 0.5 for now
            save_thresholds(folder, label_names(self.cfg), [0.5] * len(label_names(self.cfg)),
                            "0.5, not yet tuned (no validation yet)")
        else:
            save_thresholds(folder, label_names(self.cfg), self.thresholds, self.thresholds_chosen)

    def resume_from(self, path):
        """Restore weights, optimizer, schedule, scaler, position, logging window and RNG."""
        state, manifest = load_checkpoint(path, self.cfg["ckpt"]["file_ext"])
        device = self.proc.device
        if "module" in state:
            self.model.load_state_dict(state["module"])
        else:
            load_weights(classifier_of(self.model), str(Path(path) / "model.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the loaded groups hold a copy of the saved rate
            group["lr"] = self.lr
        self.scaler.load_state_dict(state["scaler"])
        self.updates.copy_(state["updates"])
        self.skipped.copy_(state["skipped"])
        self.step, self.epoch, self.batch_in_epoch = manifest["step"], manifest["epoch"], manifest["batch_in_epoch"]
        self.best, self.run_dir = manifest["best"], manifest["run_dir"]
        self.bad_validations = manifest["bad_validations"]
        if self.cfg["data"]["multi_label"] and self.cfg["module"]["threshold"] == "tune":
            # those of the latest validation, and how they were chosen
            self.thresholds, self.thresholds_chosen = saved_thresholds(path, label_names(self.cfg), chosen=True)
        mine = state["ranks"][self.proc.rank]
        set_rng_state(mine["rng"], device)
        self.window = {**new_window(device), "loss": mine["window"]["loss"].to(device),
                       "examples": mine["window"]["examples"],
                       "terms": {k: v.to(device) for k, v in mine["window"]["terms"].items()}}
        # as in epoch_number, the batch of the last step: at an epoch's end its last, not the next's 0
        log(self.proc, f"resumed from {path} at step {self.step} (epoch {self.epoch_number}, "
                       f"batch {self.batch_in_epoch or self.steps_per_epoch} of {self.steps_per_epoch})")


def new_window(device):
    """Running sums of one logging interval: summed loss, examples, loss terms, its start time."""
    return {"loss": torch.zeros((), device=device), "examples": 0, "terms": {}, "start": time.perf_counter()}


def classifier_of(model):
    """The Hugging Face classifier in what the Trainer optimizes: itself, or a distillation student."""
    return getattr(model, "student", model)


# ---------------------------------------------------------------------------------------------
# schedule, optimizer, loss


def lr_multiplier(update, warmup_steps, total_steps):
    """Linear warmup to 1, then linear decay to 0, for the update with index `update` (from 0).

    The warmup counts from 1/warmup_steps, not from 0, so the first update already learns; the
    decay reaches 0 only after the last update. `update` may be a tensor on the device (the loop
    keeps its count of updates there); the result is a float64 tensor either way.
    """
    update = torch.as_tensor(update, dtype=torch.float64)
    warmup = (update + 1) / max(1, warmup_steps)
    decay = ((total_steps - update) / max(1, total_steps - warmup_steps)).clamp(min=0)
    return torch.where(update < warmup_steps, warmup, decay)


def build_optimizer(model, lr, weight_decay):
    """AdamW with weight decay on weight matrices only: biases and LayerNorm gains are exempt.

    fused: one kernel over all parameters, on CPU and CUDA; it also reads the learning rate from a
    tensor and skips an update on the device when told to (found_inf), which the loop relies on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def supervised_loss(model, batch, indices=None, class_weights=None):
    """Summed loss over the batch's examples (the caller divides by the step's example count).

    indices, the examples' rows in the training split, are for losses that cache by example
    (distillation's teacher logits); this one needs none. class_weights scale each example's
    cross-entropy by its class's weight; the sum is still divided by the number of examples, so a
    step weighs alike however it is split into micro-batches or ranks.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # losses in float32, also under autocast
    return task_loss(logits, batch["labels"], class_weights), {}


def task_loss(logits, labels, class_weights=None, known=None):
    """The loss of float32 logits, summed over examples: squared error (regression: one output),
    binary cross-entropy averaged over the labels (multi-label: labels are 0/1 rows; class_weights
    are then each label's positive weight), or cross-entropy (a label of -1 counts nothing).

    known (distillation's unlabelled rows): a bool per example, the rows that count; the others
    weigh 0 rather than being indexed out, since a boolean index reads its size back to the host.
    """
    if labels.dim() == 2:
        per_label = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=class_weights,
                                                       reduction="none")
        per_example = per_label.mean(dim=1)  # the mean over labels, as BCEWithLogitsLoss
        return (per_example if known is None else per_example * known).sum()
    if logits.shape[-1] == 1:
        if known is None:
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        return (F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none") * known).sum()
    return F.cross_entropy(logits, labels, weight=class_weights, reduction="sum", ignore_index=-1)


MAX_POS_WEIGHT = 100.0  # a label seen twice in 10,000 texts would otherwise weigh 5,000 times


def class_weights(cfg, train, device):
    """module.class_weights as a tensor on device: balanced = n / (k * count of each class) over the
    labelled training rows (multi-label: negatives / positives of each label, at most
    MAX_POS_WEIGHT); None when unset."""
    spec, names = cfg["module"]["class_weights"], label_names(cfg)
    if spec is None:
        return None
    if spec == "balanced" and cfg["data"]["multi_label"]:
        labels = train.encoded.labels[~np.isnan(train.encoded.labels).any(axis=1)]  # unlabelled rows are NaN
        positives = labels.sum(axis=0)
        spec = np.minimum((len(labels) - positives) / np.maximum(positives, 1), MAX_POS_WEIGHT).tolist()
    elif spec == "balanced":
        labels = train.encoded.labels[train.encoded.labels >= 0]  # unlabelled transfer rows are -1
        counts = np.bincount(labels, minlength=len(names))
        if not counts.all():
            missing = [name for name, count in zip(names, counts) if not count]
            raise DataError(f"module.class_weights balanced: no training example of {missing}; give the "
                            f"weights as a list, or check data.labels_list")
        spec = (len(labels) / (len(names) * counts)).tolist()
    return torch.tensor(spec, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class Process:
    """Where this process stands: its rank among world_size processes, and its device.

    cpu_group: a gloo group of all ranks for agreements the host makes (stop flags, checkpoint
    state, the main process's errors), so they never wait for the GPU; None without DDP.
    """
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool
    ddp: bool
    cpu_group: object = None


def log(proc, message):
    """Print on the main process only, keeping the progress bar intact."""
    if proc.is_main:
        tqdm.write(message, file=sys.stdout)


def uses_ddp(trainer_cfg):
    """DDP or not: trainer.backend auto follows torchrun (as nanoGPT does), sp / ddp insist.
    Several processes started without DDP would each train alone: refused."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    backend, world_size = trainer_cfg["backend"], int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    ddp = launched if backend == "auto" else backend.startswith("ddp")
    if world_size > 1 and not ddp:
        raise ConfigError(f"started with {world_size} processes but trainer.backend is {backend}; "
                          f"use auto (or ddp) under torchrun")
    return ddp


def setup_distributed(trainer_cfg):
    """Read torchrun's environment, pick the device, start the process group for DDP."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched else 1
    ddp = uses_ddp(trainer_cfg)
    use_cuda = trainer_cfg["device"] == "cuda" or (trainer_cfg["device"] == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("trainer.device is cuda but no CUDA GPU is visible; use auto or cpu")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU of its own: this machine shows "
                          f"{torch.cuda.device_count()}; start at most that many processes per machine "
                          f"(torchrun --nproc_per_node), or pass --trainer.device cpu")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # TF32 matmuls on Ampere and newer: float32 range, several times the speed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = trainer_cfg["tf32"]
    else:
        device = torch.device("cpu")
    # processes on one machine share its cores; oversubscribing them slows every process down
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(trainer_cfg["num_threads"] or max(1, cores // local_world_size))
    cpu_group = None
    if ddp and launched:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        cpu_group = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    proc = Process(rank, local_rank, world_size, device, rank == 0, ddp and launched, cpu_group)
    if ddp and not launched:
        log(proc, f"note: trainer.backend {trainer_cfg['backend']} without torchrun: running as a "
                  f"world of one process (launch with torchrun --nproc_per_node N for more)")
    return proc


def cleanup_distributed(proc, finished):
    """Leave the process group; after a finished run, first wait for every rank and free what DDP holds.

    The trainer sits in reference cycles, so without gc.collect() its DDP reducer (which holds the
    gloo group and its pending work) is freed only at interpreter exit, after the group is destroyed;
    then a rank can abort there with "terminate called without an active exception". The barrier
    keeps every rank alive until all are done with the group. After an error: no barrier, since
    another rank may be gone and it would wait for the group's timeout.
    """
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier(group=proc.cpu_group)
        gc.collect()
    dist.destroy_process_group()  # destroys every group, the extra cpu_group on CUDA too
    proc.cpu_group = None  # its last reference: freed now, while the interpreter is alive


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


def autocast_dtype(trainer_cfg, proc):
    """The autocast dtype of trainer.amp, or None for float32; said plainly at start."""
    if not uses_amp(trainer_cfg):
        return None
    choice, device = trainer_cfg["amp_dtype"], proc.device
    if device.type == "cuda":
        if choice == "auto":  # emulated bf16 (V100, T4) is slower than fp16 with a GradScaler
            choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        log(proc, f"mixed precision: autocast {choice} on {torch.cuda.get_device_name(device)}"
                  f"{' with GradScaler' if choice == 'fp16' else ''}")
        return torch.bfloat16 if choice == "bf16" else torch.float16
    if choice == "auto":
        # CPUs without native bf16 run a bf16 matmul far slower than fp32 (bench/README.md)
        log(proc, "mixed precision: off on a CPU; training in float32 (autocast there is bf16, "
                  "much slower than fp32 without native bf16; force with --trainer.amp_dtype bf16)")
        return None
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    log(proc, f"mixed precision: autocast {choice} on the CPU"
              f"{'' if native else ' (this CPU has no native bf16: expect it to be far slower than fp32)'}")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def autocast(proc, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(proc.device.type, dtype=amp_dtype)


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


# ---------------------------------------------------------------------------------------------
# data, evaluation and predictions


@dataclass
class Split:
    """One data file's token ids and labels (encoded.labels); its texts are not kept."""
    path: str
    encoded: object


def tokenize(cfg, proc, tokenizer, source):
    """The Split of one of read_splits' files: mapped from the token cache already, or its read
    and checked Examples tokenized through the cache (data.cache_dir), by one process per machine
    (cache.py)."""
    if isinstance(source, Split):
        split = source
    else:
        split = Split(source.path, cached_encode(cache_folder(cfg), tokenizer, source, cfg["data"],
                                                 cfg["module"]["max_seq_len"], proc, say=lambda message: log(proc, message)))
    encoded = split.encoded
    if encoded.documents is not None:
        stride = cfg["data"]["window_stride"]
        dropped = dropped_by_truncation(encoded, stride, tokenizer.num_special_tokens_to_add(cfg["data"]["text_b_col"] is not None))
        log(proc, f"windows: {split.path}: {encoded.num_documents} documents in {len(encoded)} windows of <= "
                  f"{cfg['module']['max_seq_len']} tokens (stride {stride}); truncation would have dropped "
                  f"{dropped:.1%} of their text tokens")
    return split


def read_split(cfg, proc, tokenizer, path, need_labels):
    """One file's Split mapped from the token cache, where every rank finds it there (proc given),
    without reading the file again: its checks passed when the entry was made from the same bytes
    and options. Otherwise its Examples, read and checked, for tokenize."""
    if proc is not None:
        encoded = mapped(cache_folder(cfg), tokenizer, path, cfg["data"], cfg["module"]["max_seq_len"], need_labels, proc)
        if encoded is not None:
            return Split(path, encoded)
    return read_examples(path, cfg["data"], cfg["data"]["labels_list"], need_labels)


def training_split(cfg, proc, split):
    """The training split with at most data.max_windows windows per document (windows only)."""
    capped = cap_windows(split.encoded, cfg["data"]["max_windows"])
    if capped is not split.encoded:
        log(proc, f"windows: {len(capped)} of the {len(split.encoded)} training windows kept, at most "
                  f"{cfg['data']['max_windows']} per document (data.max_windows)")
    return Split(split.path, capped)


def load_split(cfg, tokenizer, path, need_labels):
    """One file read, checked and tokenized in this process, without the cache (tests, tools)."""
    examples = read_examples(path, cfg["data"], cfg["data"]["labels_list"], need_labels)
    return Split(path, encode(tokenizer, examples, cfg["module"]["max_seq_len"], stride=window_stride(cfg["data"])))


def label_names(cfg):
    """The class (or label) names; None for regression."""
    if task_of(cfg["data"]) == "regression":
        return None
    return [str(label) for label in cfg["data"]["labels_list"]]


def fixed_thresholds(cfg):
    """Multi-label: module.threshold as one threshold per label; None for tune (or another task)."""
    threshold, names = cfg["module"]["threshold"], label_names(cfg)
    if not cfg["data"]["multi_label"] or threshold == "tune":
        return None
    return np.asarray(threshold if isinstance(threshold, list) else [threshold] * len(names), dtype=np.float64)


def thresholds_of(metrics):
    """The per-label thresholds that multi-label metrics were computed with."""
    return np.array([row["threshold"] for row in metrics["per_label"].values()])


@torch.inference_mode()
def predict_logits(model, encoded, batch_size, pad_token_id, proc, amp_dtype, desc="evaluate"):
    """Float32 logits of every example in input order, on the main process (None on the others);
    batches sorted by length, sharded by rank.

    Rank 0 shows a progress bar named desc, with the device, for it may take minutes.
    """
    was_training = model.training
    model.eval()
    indices, outputs = [], []
    batches = eval_batches(encoded.lengths, batch_size, proc.rank, proc.world_size)
    for batch_indices in tqdm(batches, desc=f"{desc} on {proc.device}", unit="batch", leave=False,
                              disable=not proc.is_main, dynamic_ncols=True, file=sys.stderr):
        batch = {k: v.to(proc.device, non_blocking=True)
                 for k, v in collate(encoded, batch_indices, pad_token_id).items() if k != "labels"}
        with autocast(proc, amp_dtype):
            outputs.append(model(**batch).logits.float())  # kept on the device: one copy at the end
        indices.append(batch_indices)
    model.train(was_training)
    shards = [(np.concatenate(indices), torch.cat(outputs).cpu().numpy())] if outputs else []
    if proc.ddp:  # every example was on exactly one rank: gather them on the main one, no duplicates
        gathered = [None] * proc.world_size if proc.is_main else None
        dist.gather_object(shards, gathered, dst=0, group=proc.cpu_group)
        if not proc.is_main:
            return None
        shards = [shard for rank_shards in gathered for shard in rank_shards]
    num_outputs = shards[0][1].shape[1] if shards else 1
    logits = np.zeros((len(encoded), num_outputs), dtype=np.float32)
    for shard_indices, values in shards:
        logits[shard_indices] = values
    return logits


def pool_windows(logits, documents, num_documents, how="mean"):
    """Per-document logits from per-window ones (data.long_texts windows): documents[i] is the
    document of window i; a document's logits are the mean or the max of its windows'."""
    pooled = np.zeros((num_documents, logits.shape[1]), dtype=np.float32)
    if how == "max":
        pooled[:] = -np.inf
        np.maximum.at(pooled, documents, logits)
    else:
        np.add.at(pooled, documents, logits)
        pooled /= np.bincount(documents, minlength=num_documents)[:, None]
    return pooled


def logits_to_predictions(logits, names):
    return logits[:, 0] if names is None else logits.argmax(axis=1)


def split_metrics(logits, split, cfg, where):
    """Metrics of a labelled split's logits (windows: pooled per document, so metrics count
    documents), and a warning line if the model predicts one class."""
    names, labels = label_names(cfg), split.encoded.document_labels()
    logits = document_logits(logits, split.encoded, cfg)
    if cfg["data"]["multi_label"]:
        return multilabel_split_metrics(logits, labels, names, fixed_thresholds(cfg))
    predictions = logits_to_predictions(logits, names)
    collapse = one_class_warning(predictions, names)
    if collapse:
        tqdm.write(f"warning: {where}, {collapse}", file=sys.stdout)  # the train bar stays intact
    return compute_metrics(predictions, labels, names)


def document_logits(logits, encoded, cfg):
    """One row of logits per document: its windows' pooled by data.window_pool (windows only)."""
    if encoded.documents is None:
        return logits
    return pool_windows(logits, encoded.documents, encoded.num_documents, cfg["data"]["window_pool"])


def multilabel_split_metrics(logits, labels, names, thresholds=None):
    """Multi-label metrics at the given per-label thresholds, or (None) at each label's F1-best
    threshold on these very examples (module.threshold tune); the thresholds go in per_label."""
    probabilities = sigmoid(logits)
    if thresholds is None:
        thresholds = best_thresholds(probabilities, labels)
    metrics = multilabel_metrics(probabilities >= thresholds, labels, names)
    for row, threshold in zip(metrics["per_label"].values(), thresholds):
        row["threshold"] = float(threshold)
    return metrics


def one_class_warning(predictions, names):
    """A warning when a classifier predicts the same class for every example (a collapsed run:
    MCC 0, macro F1 near 1 / classes), else None."""
    if names is None or len(predictions) < 2 or len(set(predictions.tolist())) > 1:
        return None
    return (f"every example is predicted as {names[int(predictions[0])]!r}: the model has collapsed to one "
            f"class; lower module.max_lr, train longer, or check the balance of the labels")


def sigmoid(logits):
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def scalar_metrics(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def prediction_header(names, thresholds=None):
    """The columns predictions add after the input columns (thresholds: multi-label's, per label)."""
    if names is None:
        return ["prediction"]
    return ["predicted_labels" if thresholds is not None else "predicted_label"] + [f"prob_{n}" for n in names]


def prediction_cells(logits, names, thresholds=None, sep="|"):
    """One list of output cells per row of logits (a chunk of examples), matching prediction_header:
    the score (regression), the likeliest class and each class's softmax probability, or (multi-label)
    the labels at or above their thresholds joined by sep, and each label's sigmoid probability."""
    if names is None:
        return [[f"{score:.6g}"] for score in logits[:, 0]]
    if thresholds is not None:
        probs = sigmoid(logits)
        return [[sep.join(n for n, p, t in zip(names, row, thresholds) if p >= t)] + [f"{p:.6f}" for p in row]
                for row in probs]
    probs = softmax(logits)
    return [[names[int(row.argmax())]] + [f"{p:.6f}" for p in row] for row in probs]


def write_prediction_rows(writer, examples, logits, names, thresholds=None, sep="|"):
    """A chunk's rows: the input columns, then the prediction and every class (label) probability."""
    for row, cells in zip(examples.rows, prediction_cells(logits, names, thresholds, sep)):
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in examples.columns] + cells)


# ---------------------------------------------------------------------------------------------
# log files


@contextmanager
def atomic_write(path, newline=None):
    """A text file open for writing under a temporary name of its own beside path, renamed onto
    path only once complete: a kill or a full disk never leaves half a file there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            yield f
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")


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
    with atomic_write(path) as f:
        f.write("".join(kept))


# ---------------------------------------------------------------------------------------------
# the run: check everything, then train, evaluate, predict


def read_splits(cfg, tokenizer, proc=None):
    """Read and check every file of the run up front, so a bad row fails before anything is
    loaded or written: (training, validation, prediction rows), None where there is no file; the
    first two each its Examples or, where the token cache holds it already (proc given), its Split
    (read_split). The predict file is read and checked too, but not kept (predict_file streams it):
    its row count sizes prediction's progress bar."""
    data = cfg["data"]
    # longer sequences than the model has positions would crash the first forward pass, mid-run
    if cfg["module"]["max_seq_len"] > tokenizer.model_max_length:
        # a checkpoint's tokenizer stops at the length it was trained at (model.save_pretrained)
        ours = (cfg["model"]["tokenizer_path"] is None and cfg["model"]["model_path"] is not None
                and read_manifest(cfg["model"]["model_path"]) is not None)
        hint = ("; to train it further on longer texts, pass --model.tokenizer_path with the encoder's own "
                "tokenizer (model.hf_model)" if ours else "; lower it")
        raise ConfigError(f"module.max_seq_len is {cfg['module']['max_seq_len']} but the "
                          f"{'checkpoint was trained at' if ours else 'model takes at most'} "
                          f"{tokenizer.model_max_length} tokens{hint}")
    read = lambda key: read_split(cfg, proc, tokenizer, data[key], need_labels=True) if data[key] else None
    train, val = read("train_filepath"), read("val_filepath")
    predict_rows = count_examples(data["predict_filepath"], data, data["labels_list"]) if data["predict_filepath"] else None
    return train, val, predict_rows


def load_splits(cfg, tokenizer, proc=None):
    """(training, validation) Splits, every file read and checked before any is tokenized;
    through the token cache when proc (the run's processes) is given."""
    examples = read_splits(cfg, tokenizer, proc)[:2]
    if proc is None:
        return [None if e is None else Split(e.path, encode(tokenizer, e, cfg["module"]["max_seq_len"],
                                                            stride=window_stride(cfg["data"])))
                for e in examples]
    return [None if e is None else tokenize(cfg, proc, tokenizer, e) for e in examples]


def per_rank_batch(tcfg, world_size):
    """Examples each rank takes per step; a global batch that does not divide among the ranks is
    a config error (checked again at the start of a run, before anything is written)."""
    if tcfg["train_batch_size"] % world_size:
        raise ConfigError(f"trainer.train_batch_size {tcfg['train_batch_size']} does not divide "
                          f"among {world_size} processes; use a multiple of {world_size}")
    return tcfg["train_batch_size"] // world_size


def check_outputs(cfg):
    """Every folder the run will write in, checked (and created) before the first step."""
    if cfg["data"]["train_filepath"]:  # before the token cache is written (SaveDir's other rules come later)
        check_writable_dir(cfg["ckpt"]["model_state_save_dir"], "ckpt.model_state_save_dir")
    check_writable_dir(cfg["trainer"]["log_dir"], "trainer.log_dir")
    if cache_folder(cfg) is not None:
        check_writable_dir(cache_folder(cfg), "data.cache_dir")
    if cfg["data"]["predict_filepath"] and cfg["data"]["predict_output"]:
        output = Path(cfg["data"]["predict_output"])
        if output.is_dir():
            raise CheckpointError(f"data.predict_output: {output} is a folder; name a file")
        check_writable_dir(output.resolve().parent, "data.predict_output")


def fit(cfg, proc, model, tokenizer, train, val, loss_fn=None):
    """Train fresh or resumed (ckpt.resume): (trainer, final metrics or None if stopped)."""
    trainer = Trainer(cfg, proc, model, tokenizer, train, val, loss_fn=loss_fn)
    failed = True
    try:
        resume, main_session = on_main(proc, trainer.open_save_dir)
        if proc.ddp:
            trainer.check_shared_save_dir(main_session)
        if resume is not None:
            trainer.resume_from(resume)
        result = trainer.train()
        failed = False
    finally:
        if trainer.save_dir is not None:
            trainer.save_dir.close(failed)
    if result is None:
        log(proc, f"stopped by {trainer.stop_signal} at step {trainer.step}; resume with --ckpt.resume auto")
    return trainer, result


def evaluate_only(cfg, proc, model, tokenizer, val):
    """Metrics of a fine-tuned model on a labelled file, with a per-class table."""
    # said before the wait, with the device, as training's first line is
    log(proc, f"evaluation of {cfg['model']['model_path']} on {cfg['data']['val_filepath']} "
              f"({val.encoded.num_documents} examples), device {proc.device}")
    logits = predict_logits(model, val.encoded, cfg["trainer"]["val_batch_size"],
                            tokenizer.pad_token_id, proc, autocast_dtype(cfg["trainer"], proc))
    metrics = on_main(proc, split_metrics, logits, val, cfg, f"on {cfg['data']['val_filepath']}")
    log(proc, format_report(metrics))
    return metrics


def write_eval_metrics(cfg, metrics):
    run_dir = new_run_dir(cfg["trainer"]["log_dir"], "eval")
    write_json(Path(run_dir) / "eval_metrics.json", metrics)
    print(f"metrics written to {Path(run_dir) / 'eval_metrics.json'}")
    return run_dir


def predict_output(cfg, run_dir):
    path = cfg["data"]["predict_output"]
    if path is None:
        run_dir = run_dir or new_run_dir(cfg["trainer"]["log_dir"], "predict")
        path = str(Path(run_dir) / "predictions.csv")
    return path


def predict_file(cfg, proc, model, tokenizer, run_dir, chunk_rows=None, thresholds=None, total_rows=None):
    """Label data.predict_filepath, a file of any size, chunk_rows rows (PREDICT_CHUNK) at a time:
    read, tokenize, run (sharded over the ranks, gathered on the main process) and write each
    chunk in turn, so memory follows the chunk, not the file. The output is written under a
    temporary name and renamed when complete; read_splits checked every row before, so no bad
    row can turn up after the first prediction is written. thresholds: multi-label's, per label.
    total_rows (read_splits counted them): a bar over the whole file, beside each chunk's.
    The output path (main process)."""
    data, names, dtype = cfg["data"], label_names(cfg), autocast_dtype(cfg["trainer"], proc)
    path = on_main(proc, predict_output, cfg, run_dir)
    log(proc, f"prediction of {data['predict_filepath']}, device {proc.device}")
    rows, chunk_rows = 0, chunk_rows or PREDICT_CHUNK
    whole = tqdm(total=total_rows, desc=f"predict {data['predict_filepath']}", unit="row", leave=False, position=1,
                 disable=not proc.is_main or (total_rows or 0) <= chunk_rows, dynamic_ncols=True, file=sys.stderr)
    with atomic_write(path, newline="") if proc.is_main else nullcontext() as f, whole:
        writer = csv.writer(f) if proc.is_main else None
        for examples in example_chunks(data["predict_filepath"], data, data["labels_list"], chunk_rows):
            if rows == 0 and writer is not None:
                writer.writerow([str(c) for c in examples.columns] + prediction_header(names, thresholds))
            # a predict file is read once: tokenized chunk by chunk, not cached
            encoded = encode(tokenizer, examples, cfg["module"]["max_seq_len"], stride=window_stride(data))
            logits = predict_logits(model, encoded, cfg["trainer"]["val_batch_size"], tokenizer.pad_token_id,
                                    proc, dtype, desc="predict")
            if writer is not None:  # one row per input row: a document's windows pooled
                logits = document_logits(logits, encoded, cfg)
                write_prediction_rows(writer, examples, logits, names, thresholds, data["label_sep"])
            rows += encoded.num_documents
            whole.update(encoded.num_documents)
    log(proc, f"predictions for {rows} texts written to {path}")
    return path if proc.is_main else None


def run(cfg, proc):
    """Everything a config asks for; returns the final metrics (main process)."""
    if cfg["data"]["train_filepath"]:
        per_rank_batch(cfg["trainer"], proc.world_size)  # a config error, before any folder is made
    seed_everything(cfg["trainer"]["seed"])
    # evaluate / predict as the checkpoint was trained (labels, task, max_seq_len); a training run
    # says here, on the main process, the metric that load_config fitted to its task
    note = use_checkpoint_settings(cfg) if cfg["data"]["train_filepath"] is None else fit_metric_to_task(cfg)
    if note is not None:
        log(proc, f"note: {note}")
    tokenizer = load_tokenizer(cfg["model"])
    train, val, predict_rows = read_splits(cfg, tokenizer, proc)
    model = build_model(cfg["model"], cfg["data"]["labels_list"], say=lambda message: log(proc, message),
                        multi_label=cfg["data"]["multi_label"])
    if cfg["trainer"]["speedups"]:
        speedups.apply(model, proc.device)  # the same arithmetic, less of it (speedups.py)
    on_main(proc, check_outputs, cfg)
    # tokenized once everything is checked: the token cache is the run's first write
    train, val = [None if e is None else tokenize(cfg, proc, tokenizer, e) for e in (train, val)]
    train = train and training_split(cfg, proc, train)
    # ranks draw different dropout masks; the initial weights were already the same on all
    seed_everything((cfg["trainer"]["seed"] + proc.rank) % 2**32)
    result, run_dir, thresholds = {}, None, fixed_thresholds(cfg)
    if train:
        weights = class_weights(cfg, train, proc.device)
        if weights is not None:
            kind = "positive weights per label" if cfg["data"]["multi_label"] else "class weights"
            log(proc, f"{kind}: " + ", ".join(f"{n} {w:.4g}" for n, w in zip(label_names(cfg), weights.tolist())))
        trainer, result = fit(cfg, proc, model, tokenizer, train, val,
                              loss_fn=functools.partial(supervised_loss, class_weights=weights))
        if result is None:
            return None
        model, run_dir, thresholds = classifier_of(trainer.model), trainer.run_dir, trainer.thresholds
    elif val:
        metrics = evaluate_only(cfg, proc, model.to(proc.device), tokenizer, val)
        result = scalar_metrics(metrics)
        run_dir = on_main(proc, write_eval_metrics, cfg, metrics)
        if cfg["data"]["multi_label"]:  # tune: predictions decide at the thresholds tuned on this file
            thresholds = thresholds_of(metrics)
    if cfg["data"]["predict_filepath"]:
        result["predictions"] = predict_file(cfg, proc, model.to(proc.device), tokenizer, run_dir,
                                             thresholds=thresholds, total_rows=predict_rows)
    return result


def main(argv=None, run_fn=run, doc=__doc__):
    """Command-line entry point: one clear line and exit status 2 on any user error.

    distill.py runs through here too, with its own run_fn and docstring.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print_help(doc)
        return 0
    cfg, shared = None, True  # an error every rank meets alike is printed by rank 0 alone
    try:
        cfg = load_config(argv)
        uses_ddp(cfg["trainer"])
        shared = False
        proc = setup_distributed(cfg["trainer"])
        finished = False
        try:
            result = run_fn(cfg, proc)
            finished = True
        finally:
            cleanup_distributed(proc, finished)
    except (ConfigError, DataError, ModelError, TrainingError, CheckpointError) as e:
        if cfg is not None and cfg["trainer"]["debug"]:
            raise
        if int(os.environ.get("RANK", 0)) == 0 or not (shared or isinstance(e, MainProcessFailed)):
            # one write: print writes the newline apart, and under torchrun ranks share one stderr
            sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: stopped at once by a second signal, without a new checkpoint; resume from "
                         "the last one with --ckpt.resume auto\n")
        return 130
    if result is None:
        return 1  # stopped by a signal; the checkpoint to resume from is written
    if proc.is_main:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
