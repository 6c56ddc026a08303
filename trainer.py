r"""Fine-tune a Hugging Face encoder for text sequence classification: the training loop and the CLI.

One process (CPU or one GPU), or several through torchrun: the same config either way.
    python trainer.py                                        # the default job in config.yaml
    python trainer.py --trainer.epochs 3 --module.max_lr 3e-5
    torchrun --nproc_per_node 2 trainer.py                   # DDP: 2 GPUs, or 2 CPU processes
    torchrun --nproc_per_node 8 trainer.py --trainer.amp true        # mixed precision
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint host:29500 trainer.py
Evaluate a checkpoint, or label new texts:
    python trainer.py --data.train_filepath null --data.val_filepath test.csv --model.model_path checkpoints/best
    python trainer.py --data.train_filepath null --data.val_filepath null \
        --data.predict_filepath new.csv --model.model_path checkpoints/best
Resume after a crash:
    python trainer.py --ckpt.resume auto
Every run in trainer.log_dir as a table, newest first (and as runs.csv there):
    python trainer.py --runs

The loop is written out by hand to be read: global batch = micro-batches x accumulation x ranks,
the loss scaled by the true number of examples in each step, no gradient sync on non-final
micro-steps, GradScaler for float16 only, a linear warmup / decay schedule, exact resume. A step
never waits for the GPU: the host reads the device once per log interval.
Read Trainer first, then the schedule and losses, the process group, run and main. The other jobs
have modules of their own: processes, splits, evaluation, runlog, checkpoint, files, config, data, model,
progress, lora (adapters, model.lora_rank).
"""
import sys

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

import functools
import gc
import json
import re
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

# no tqdm monitor thread: a daemon thread writing to stderr on its own can still be running while
# the interpreter of a torchrun worker shuts down; the bars update without it
tqdm.monitor_interval = 0
# torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers, which older torch (2.11 on
# our GPU machine) lacks: its FutureWarning, once per rank, says nothing to a user
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)

import lora
from card import checkpoint_facts, write_card
from checkpoint import SaveDir, checkpoint_path, load_checkpoint, open_save_dir
from config import ConfigError, answer_help, fit_metric_to_task, load_config
from data import DataError, collate, micro_batches, train_batches
from evaluation import (
    Calibration,
    Decisions,
    Thresholds,
    curves_of,
    evaluate_and_predict,
    predict_file,
    predict_logits,
    scalar_metrics,
    split_metrics,
)
from files import OutputError, new_session
from metrics import format_report
from model import (
    ModelError,
    build_classifier,
    check_artifact,
    check_attention_device,
    classifier_of,
    is_export_dir,
    load_module_weights,
    load_trained_weights,
    module_rest,
    save_pretrained,
)
from processes import (
    MainProcessFailed,
    TrainingError,
    agree,
    autocast,
    gather,
    launch_rank,
    on_main,
    per_rank_batch,
    rng_state,
    set_rng_state,
    this_process,
    uses_ddp,
)
from progress import progress_bar
from runlog import RunLog, log_interval, print_runs, record_run, resume_command, script_name
from splits import class_weights, first_rows, prepare_run, training_split


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
        self.model = model.to(device)
        self.wrapped = self.model
        if proc.ddp:  # no BatchNorm here: the buffers (position ids) never change, so none are broadcast
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
        if tcfg["compile"]:
            self.wrapped = torch.compile(self.wrapped, dynamic=True)
        # free sequence lengths would recompile a compiled model often: pad to multiples of 8 then
        self.pad_to_multiple_of = 8 if tcfg["compile"] else 1

        # batches: global batch = world_size ranks x grad_accum_steps micro-batches of <= the limit
        self.epoch_batches = functools.partial(train_batches, train.encoded.lengths, tcfg["train_batch_size"],
                                               tcfg["seed"], rank=proc.rank, world_size=proc.world_size)
        per_rank = per_rank_batch(tcfg, proc.world_size)
        self.grad_accum_steps = -(-per_rank // tcfg["gpu_batch_size_limit"])  # ceiling division
        self.steps_per_epoch = len(self.epoch_batches(0))
        self.total_steps = max(1, self.steps_per_epoch * tcfg["epochs"])
        self.warmup_steps = round(cfg["module"]["warmup_prop"] * self.total_steps)
        self.log_steps = log_interval(tcfg["log_steps"], self.total_steps)

        # the optimizer reads its learning rates from tensors on the device, set before each update:
        # each parameter group's (group_lrs) and module.max_lr's (lr), which the logs show
        self.lr = torch.zeros((), device=device)
        self.optimizer = build_optimizer(self.model, cfg["module"])
        self.group_lrs, self.peak_lrs = group_rates(self.optimizer, device)
        # loss scaling guards float16 gradients from underflow; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=proc.amp_dtype == torch.float16)

        # where the run stands: all of it goes into a checkpoint
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.updates = torch.zeros((), dtype=torch.int64, device=device)  # steps whose update was made
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # non-finite gradients
        self.best = None  # {"value", "path", "metrics", "step"} of the best validation so far
        self.bad_validations = 0  # in a row, without an improvement of more than min_delta
        self.thresholds = Thresholds(cfg)  # multi-label decisions
        self.calibration = Calibration(cfg, say=proc.say)  # the temperature
        self.validation = None  # (step, metrics) of the latest validation: what a model card reports
        self.interval = new_interval(device)  # sums of the current logging interval
        self.run_dir, self.runlog = None, None  # the log folder; its writers on the main process
        self.save_dir = SaveDir(cfg, new_session(), proc.say)  # on disk through the main process only
        self.signals, self.stop_signal = 0, None
        self.train_seconds = 0.0  # this launch's time in the loop: steps, validations, checkpoints

    @property
    def epoch_number(self):
        """The epoch (from 1) that the last step belongs to: what logs and checkpoint names say."""
        return self.epoch + (self.batch_in_epoch > 0)

    # -- setup and cleanup: the save folder is the run's from the first step to the last -------

    def setup(self, notes=()):
        """Open the save folder (rank 0 locks it and finds the checkpoint to resume from), then
        resume, or say the notes of building a fresh model (such as its new head)."""
        resume = open_save_dir(self.save_dir, self.proc)
        if resume is not None:
            self.resume_from(resume)
        for note in notes if resume is None else ():
            self.proc.say(note)

    def cleanup(self, failed):
        """Release the save folder: a failed run puts back the checkpoints it moved aside."""
        self.save_dir.close(failed)

    # -- the loop -------------------------------------------------------------------------------

    def train(self):
        """Epochs of steps, each followed by logging, validation and checkpoints at their cadence."""
        tcfg, ckpt = self.cfg["trainer"], self.cfg["ckpt"]
        if self.epoch >= tcfg["epochs"] or self.stop_early():  # resumed complete: nothing left to train
            return self.finish(already_complete=True)
        self.run_dir = on_main(self.proc, self.open_runlog)
        start = time.perf_counter()
        self.model.train()
        # off a terminal, a plain line at each log interval (log_train sets the postfix)
        progress = progress_bar(desc="train", unit="step", total=self.total_steps, initial=self.step,
                                disable=not self.proc.is_main, every=None, dynamic_ncols=True)
        # SIGTERM / SIGINT end the current step; then a checkpoint is written and the run stops
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.epoch < tcfg["epochs"] and not self.stop_early() and not self.paused():
                batches = self.epoch_batches(self.epoch)
                for rank_indices, global_size in batches[self.batch_in_epoch:]:
                    self.train_step(rank_indices, global_size)
                    self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                    progress.update(1)
                    if self.step % self.log_steps == 0:
                        self.log_train(progress)
                    if tcfg["eval_steps"] and self.step % tcfg["eval_steps"] == 0 and self.batch_in_epoch < len(batches):
                        self.validate()
                    if ckpt["save_steps"] and self.step % ckpt["save_steps"] == 0:
                        self.save_checkpoint()
                    # any rank asked to stop, as agreed by all, so that none waits forever
                    if agree(self.proc, self.stop_signal is not None, "max"):
                        self.stop_signal = self.stop_signal or "a signal to another process"
                        self.save_checkpoint(reason="stop")
                        return None
                    if self.stop_early():
                        break
                if self.batch_in_epoch == len(batches):  # the epoch ran to its end
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self.validate()
                period_end = ckpt["period"] and self.epoch % ckpt["period"] == 0
                if ckpt["checkpoint"] and (self.stop_early() or self.paused() or period_end):
                    self.save_checkpoint()  # nothing new is written if validation just saved this step
        finally:
            self.train_seconds = time.perf_counter() - start
            for s, handler in previous.items():
                signal.signal(s, handler)
            progress.close()
            if self.runlog is not None:
                self.runlog.close()
        self.raise_if_skipped(int(self.skipped))
        return self.finish()

    def train_step(self, rank_indices, global_size):
        """One optimizer step over a global batch: accumulate micro-batches, clip, update."""
        tcfg, interval = self.cfg["trainer"], self.interval
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
                with autocast(self.proc):
                    loss, terms = self.loss_fn(self.wrapped, batch, indices)
                self.scaler.scale(loss * scale).backward()
            interval["loss"] += loss.detach()
            for name, value in terms.items():
                interval["terms"][name] = interval["terms"].get(name, 0) + value.detach()
        interval["examples"] += len(rank_indices)  # summed over ranks at log time

        # the schedule counts updates made, not steps taken: a skipped update does not advance it
        multiplier = lr_multiplier(self.updates, self.warmup_steps, self.total_steps)
        self.lr.copy_(self.cfg["module"]["max_lr"] * multiplier)
        torch.mul(self.peak_lrs, multiplier, out=self.group_lrs)  # each group's peak x the schedule, one kernel
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
        """Mean loss over the interval's examples (and ranks), learning rate, throughput."""
        interval, device = self.interval, self.proc.device
        sums = torch.stack([interval["loss"].float(), torch.tensor(float(interval["examples"]), device=device)]
                           + [v.float() for v in interval["terms"].values()])
        if self.proc.ddp:
            dist.all_reduce(sums)
        # the one host sync of a log interval (lr and skipped are the same on every rank)
        lr, skipped, loss, examples, *terms = torch.cat([torch.stack([self.lr.float(), self.skipped.float()]), sums]).tolist()
        skipped = int(skipped)
        self.raise_if_skipped(skipped)
        elapsed = time.perf_counter() - interval["start"]
        scalars = {"train/loss": loss / examples, "train/lr": lr, "train/examples_per_s": examples / elapsed}
        for name, value in zip(interval["terms"], terms):
            scalars[f"train/{name}"] = value / examples
        if skipped:
            scalars["train/skipped_steps"] = skipped
        self.log_scalars(scalars)
        progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{lr:.2e}", ex_s=f"{scalars['train/examples_per_s']:.1f}")
        self.interval = new_interval(self.proc.device)

    def raise_if_skipped(self, skipped):
        """In float32 / bfloat16, a skipped update means a non-finite loss: stop (the weights never
        saw it). float16 skips are GradScaler finding its scale and only counted."""
        if skipped and not self.scaler.is_enabled():
            last = self.save_dir.path / "last"
            raise TrainingError(f"by step {self.step}, {skipped} updates were skipped: the loss or its gradients "
                                f"were not finite; lower module.max_lr or check the data. Last good "
                                f"checkpoint: {last.resolve() if last.exists() else 'none'}")

    def validate(self):
        """Metrics on the validation file; saves and marks the best checkpoint. None without one."""
        if self.val_split is None:
            return None
        logits = predict_logits(classifier_of(self.model), self.val_split.encoded, self.cfg["trainer"]["val_batch_size"],
                                self.tokenizer.pad_token_id, self.proc, desc="validate")
        # the main process has the logits; every rank gets the metrics, to agree on the best
        metrics = on_main(self.proc, split_metrics, logits, self.val_split, self.cfg, f"at step {self.step}")
        self.thresholds.validated(metrics, self.step)
        self.calibration.validated(metrics, self.step)
        self.validation = (self.step, metrics)
        self.log_scalars({f"val/{k}": v for k, v in scalar_metrics(metrics).items()}, metrics, logits)
        value, ckpt, tcfg = metrics[self.cfg["module"]["metric"]], self.cfg["ckpt"], self.cfg["trainer"]
        improved = self.best is None or value > self.best["value"] + tcfg["early_stopping_min_delta"]
        self.bad_validations = 0 if improved else self.bad_validations + 1
        new_best = self.best is None or value > self.best["value"]
        last = self.epoch >= tcfg["epochs"] or self.stop_early() or self.paused()
        # the per-class table too (a minority class at F1 0.1 shows here, not only in a JSON file),
        # when it is news: at a new best and at the end, not at every one of frequent validations
        report = format_report(metrics) if new_best or last else (
            format_report(metrics).splitlines()[0] + f"  (best {self.best['value']:.4f}, at step {self.best['step']})")
        self.proc.say(f"validation at step {self.step} (epoch {self.epoch_number}): {report}")
        if new_best:
            # the new best is recorded before the save, so the checkpoint's state holds it
            path = checkpoint_path(ckpt, self.epoch_number, self.step) if ckpt["checkpoint"] else None
            self.best = {"value": value, "metrics": metrics, "step": self.step,
                         "path": None if path is None else str(path)}
            if path is not None:
                self.save_checkpoint(reason="best")
        if self.stop_early():  # after the best is updated: a small gain still makes this step the best
            self.proc.say(f"early stopping at step {self.step}: module.metric {self.cfg['module']['metric']} has not "
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

    def finish(self, already_complete=False):
        """Reload the best model for predictions and report: the final metrics of the run.
        already_complete: resumed from the end of a run, this launch trained nothing."""
        if already_complete:
            self.proc.say(f"the resumed run is already complete (step {self.step}, epoch {self.epoch} of "
                          f"{self.cfg['trainer']['epochs']}{', stopped early' * self.stop_early()}): nothing to "
                          f"train; pass a larger --trainer.epochs to train it further")
        times = {"train_s": round(self.train_seconds, 1)}
        # a run resumed complete: its run folder keeps the record of the launch that trained it
        times.update({"already_complete": True} if already_complete else {"run_dir": self.run_dir})
        if self.best is None:
            return {"step": self.step, **times}
        if self.best["path"] is not None and self.best["step"] != self.step:
            load_trained_weights(self.model, self.best["path"])
        result = {**scalar_metrics(self.best["metrics"]), "best_step": self.best["step"],
                  "best_checkpoint": self.best["path"]}
        self.thresholds.of_best(self.best["metrics"])
        self.calibration.of_best(self.best["metrics"])
        if self.stop_early():
            result["stopped_early_at_step"] = self.step
        elif self.paused():
            result["paused_after_epoch"] = self.epoch
        # the runlog is None for a run resumed complete: its folder keeps the final metrics it has
        on_main(self.proc, lambda: self.runlog is not None and self.runlog.write_final(self.best["metrics"] | result))
        return {**result, **times}

    # -- stopping, logs ------------------------------------------------------------------------

    def request_stop(self, signum, frame):
        self.signals += 1
        if self.signals > 1:  # a second Ctrl-C: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name

    def open_runlog(self):
        """Main process: the run's log folder (a resumed run's own, where it may write); then say
        what the run will do."""
        tcfg, kind = self.cfg["trainer"], "train" if classifier_of(self.model) is self.model else "distil"
        self.runlog = RunLog.open(self.cfg, self.step, self.run_dir, say=self.proc.say, kind=kind)
        self.proc.say(f"logs: {self.runlog.run_dir}")
        self.proc.say(f"training: {len(self.train_split.encoded)} examples{first_rows(self.cfg['data'])}, "
                      f"{tcfg['epochs']} epochs x {self.steps_per_epoch} steps, global batch {tcfg['train_batch_size']} = "
                      f"{self.proc.world_size} processes x {self.grad_accum_steps} micro-batches "
                      f"of <= {tcfg['gpu_batch_size_limit']}, warmup {self.warmup_steps} steps, "
                      f"logging every {self.log_steps} steps, device {self.proc.device}")
        self.proc.say(describe_optimizer(self.optimizer, self.model))
        return self.runlog.run_dir

    def log_scalars(self, scalars, metrics=None, logits=None):
        """Scalars into the run's log folder (and a validation's figures, drawn from its metrics and
        logits), by the main process: a failure there (a full disk) ends every rank."""
        def write():
            self.runlog.write(self.step, self.epoch_number, scalars)
            if metrics is not None:
                self.runlog.write_figures(self.step, metrics, curves_of(logits, self.val_split, self.cfg, metrics))
        on_main(self.proc, write)

    # -- checkpoints and resume: the state; checkpoint.py writes and finds the folders ----------

    def save_checkpoint(self, reason="period"):
        """A checkpoint of every rank's state, written by the main process (every rank calls it)."""
        self.raise_if_skipped(int(self.skipped))  # never save past a skipped float32 update
        # this rank's part: its RNG and its logging interval (kept under the key "window" on disk)
        mine = {"rng": rng_state(self.proc.device),
                "window": {"loss": self.interval["loss"].cpu(), "examples": self.interval["examples"],
                           "terms": {k: v.cpu() for k, v in self.interval["terms"].items()}}}
        path = checkpoint_path(self.cfg["ckpt"], self.epoch_number, self.step)
        card = checkpoint_facts(self, path)  # the model card's facts, kept in checkpoint.json too (export's card)
        write_files = functools.partial(self.write_files, per_rank=gather(self.proc, mine), card=card)
        manifest = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "best": self.best, "bad_validations": self.bad_validations,
                    "run_dir": self.run_dir, "world_size": self.proc.world_size, "card": card}
        return on_main(self.proc, self.save_dir.save, path, write_files, manifest, reason)

    def write_files(self, folder, per_rank, card):
        """A checkpoint's files: the classifier as save_pretrained writes it, with its tokenizer
        (truncating as trained), decisions (thresholds, temperature) and model card, and the
        training state of every rank."""
        cfg, classifier = self.cfg, classifier_of(self.model)
        save_pretrained(classifier, self.tokenizer, folder, max_seq_len=cfg["module"]["max_seq_len"])
        self.thresholds.write(folder)
        self.calibration.write(folder)
        write_card(folder, card, cfg)  # README.md, renamed into place with the rest
        state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "updates": self.updates.cpu(), "skipped": self.skipped.cpu(), "ranks": per_rank}
        if self.model is not classifier:  # distillation: what the module holds beside the student
            state["module_rest"] = module_rest(self.model)
        if lora.adapted(self.model):  # what trained, unmerged: resume loads it onto the frozen weights
            lora.save_adapter(self.model, folder)
        torch.save(state, folder / f"training_state{cfg['ckpt']['file_ext']}")

    def resume_from(self, path):
        """Restore weights, optimizer, schedule, scaler, position, logging interval and RNG."""
        state, manifest = load_checkpoint(path, self.cfg["ckpt"]["file_ext"])
        device = self.proc.device
        load_module_weights(self.model, path, state)
        built = [{"peak_lr": group["peak_lr"], "parts": group["parts"]} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, rates in zip(self.optimizer.param_groups, built):  # the config's rates: a checkpoint from
            group.update(rates)                                       # before optimizer groups holds none
        self.group_lrs, self.peak_lrs = group_rates(self.optimizer, device)  # the loaded groups hold copies
        self.scaler.load_state_dict(state["scaler"])
        self.updates.copy_(state["updates"])
        self.skipped.copy_(state["skipped"])
        self.step, self.epoch, self.batch_in_epoch = manifest["step"], manifest["epoch"], manifest["batch_in_epoch"]
        self.best, self.run_dir = manifest["best"], manifest["run_dir"]
        if self.best is not None and self.best["path"] is not None:  # beside the checkpoint, however spelled or moved
            self.best["path"] = str(Path(path).parent / Path(self.best["path"]).name)
        self.bad_validations = manifest["bad_validations"]
        self.thresholds.resumed(path)
        self.calibration.resumed(path)
        mine = state["ranks"][self.proc.rank]
        set_rng_state(mine["rng"], device)
        saved = mine["window"]
        self.interval = {**new_interval(device), "loss": saved["loss"].to(device), "examples": saved["examples"],
                         "terms": {k: v.to(device) for k, v in saved["terms"].items()}}
        # as in epoch_number, the batch of the last step: at an epoch's end its last, not the next's 0
        self.proc.say(f"resumed from {path} at step {self.step} (epoch {self.epoch_number}, "
                      f"batch {self.batch_in_epoch or self.steps_per_epoch} of {self.steps_per_epoch})")


def new_interval(device):
    """Running sums of one logging interval: summed loss, examples, loss terms, its start time."""
    return {"loss": torch.zeros((), device=device), "examples": 0, "terms": {}, "start": time.perf_counter()}


def fit(trainer, notes=()):
    """Set up, train and clean up a Trainer, fresh or resumed (ckpt.resume): the final metrics, or
    None if a signal stopped it. notes (of building a fresh model, such as its new head) are said
    only if the run does not resume."""
    failed = True
    try:
        trainer.setup(notes)
        result = trainer.train()
        failed = False
    finally:
        trainer.cleanup(failed)
    if result is None:
        trainer.proc.say(f"stopped by {trainer.stop_signal} at step {trainer.step}, with a checkpoint to resume from")
    return result


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


def build_optimizer(model, module_cfg):
    """AdamW over the parameters that train, in the parameter_groups of module.weight_decay,
    module.max_lr, module.head_lr and module.layer_lr_decay; group_rates then gives each group
    the rate tensor that the schedule sets.

    fused: one kernel over all parameters, on CPU and CUDA; it also reads the learning rate from a
    tensor and skips an update on the device when told to (found_inf), which the loop relies on.
    """
    groups = parameter_groups(model, module_cfg["weight_decay"], module_cfg["max_lr"], module_cfg["head_lr"],
                              module_cfg["layer_lr_decay"])
    return torch.optim.AdamW(groups, lr=module_cfg["max_lr"], fused=True)


LAYER_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # encoder.layer.3. (BERT), layers.3. (ModernBERT)


def encoder_parts(model, per_layer):
    """({id(parameter): (part, depth)} of the pretrained encoder's (model.base_model) parameters,
    the number of layers): depth 0 the embeddings, i + 1 layer i, and the number of layers for
    what sits above them (a pooler, a final norm), which goes with the top layer. Not per_layer:
    all one part, the encoder, at the top."""
    classifier = classifier_of(model)
    encoder = getattr(classifier, "base_model", classifier)  # a plain torch module: all encoder
    named = list(encoder.named_parameters())
    layers = 1 + max((int(m.group(1)) for name, _ in named if (m := LAYER_INDEX.search(name))), default=-1)
    parts = {}
    for name, p in named:
        match = LAYER_INDEX.search(name)
        depth = int(match.group(1)) + 1 if match else 0 if name.startswith("embeddings.") else layers
        if not per_layer:
            parts[id(p)] = ("encoder", layers)
        else:
            parts[id(p)] = ("embeddings" if depth == 0 else f"layer {depth - 1}", depth)
    return parts, layers


def parameter_groups(model, weight_decay, max_lr, head_lr=None, layer_lr_decay=1.0):
    """AdamW's groups of the parameters that train, each with its weight decay, its peak learning
    rate (peak_lr, which the schedule multiplies) and the parts of the model it holds.

    Weight decay on weight matrices only: biases and LayerNorm gains are exempt. The head
    (whatever is not the pretrained encoder: the classifier, a distillation projection) peaks at
    head_lr (None: max_lr). With layer-wise decay, layer i of L peaks at max_lr * layer_lr_decay **
    (L - 1 - i) and the embeddings at max_lr * layer_lr_decay ** L: the top layer at max_lr, each
    one below at a fraction of the rate above it. Parameters of one rate and weight decay share a group.
    """
    parts, layers = encoder_parts(model, per_layer=layer_lr_decay != 1)
    groups = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part, depth = parts.get(id(p), ("head", None))
        if depth is None:
            peak = max_lr if head_lr is None else head_lr
        else:
            peak = max_lr * layer_lr_decay ** (layers - depth)
        decays = p.ndim >= 2
        group = groups.setdefault((peak, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                   "peak_lr": peak, "parts": []})
        group["params"].append(p)
        if part not in group["parts"]:
            group["parts"].append(part)
    return list(groups.values())


def group_rates(optimizer, device):
    """(rates, peaks): each parameter group's learning rate as one element of a float32 tensor on
    the device, the "lr" fused AdamW reads (a view, so one kernel sets them all), and the groups'
    peak rates (float64, as the schedule's multiplier)."""
    peaks = torch.tensor([group["peak_lr"] for group in optimizer.param_groups], dtype=torch.float64, device=device)
    rates = torch.zeros(len(peaks), device=device)
    for group, rate in zip(optimizer.param_groups, rates):  # iterating a tensor gives views of it
        group["lr"] = rate
    return rates, peaks


def describe_optimizer(optimizer, model):
    """The start-up line of the optimizer: its groups, each part's peak rate, what trains."""
    peaks = {part: group["peak_lr"] for group in optimizer.param_groups for part in group["parts"]}
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    total = sum(p.numel() for p in model.parameters())
    rates = ", ".join(f"{part} {peak:.2e}" for part, peak in peaks.items())
    if len(set(peaks.values())) == 1:
        rates = f"all {next(iter(peaks.values())):.2e}"
    return (f"optimizer: AdamW, {len(optimizer.param_groups)} parameter groups, peak learning rates {rates}; "
            f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train")


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


# ---------------------------------------------------------------------------------------------
# the process group


def setup_distributed(trainer_cfg):
    """This process among torchrun's (processes.this_process) and, for DDP, the process group:
    NCCL between GPUs, and gloo for what the host agrees on (stop flags, checkpoint state)."""
    proc = this_process(trainer_cfg)
    if proc.ddp:
        cuda = proc.device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=proc.device if cuda else None)
        proc.cpu_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return proc


def cleanup_distributed(proc, finished):
    """Leave the process group; after a finished run, first wait for every rank and free what DDP holds.

    gc.collect() frees the DDP reducer (in the trainer's reference cycles, holding the gloo group)
    while the group exists; freed at interpreter exit instead, a rank can abort with "terminate called
    without an active exception". After an error, no barrier: another rank may be gone.
    """
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier(group=proc.cpu_group)
        gc.collect()
    dist.destroy_process_group()  # destroys every group, the extra cpu_group on CUDA too
    proc.cpu_group = None  # its last reference: freed now, while the interpreter is alive


# ---------------------------------------------------------------------------------------------
# the run: check everything, then train, evaluate, predict


def run(cfg, proc):
    """Everything a config asks for; returns the final metrics (main process)."""
    if not cfg["data"]["train_filepath"]:  # a fine-tuned model evaluates and / or predicts (evaluation.py)
        return evaluate_and_predict(cfg, proc)
    per_rank_batch(cfg["trainer"], proc.world_size)  # a config error, before any folder is made
    check_artifact(cfg)  # an export folder, whose model it would pick, is refused next: it does not train
    if is_export_dir(cfg["model"]["model_path"]):
        raise ConfigError(f"model.model_path {cfg['model']['model_path']} is an export folder (ONNX): it evaluates "
                          f"and predicts only; train from the checkpoint it came from (its export.json's source)")
    check_attention_device(cfg, proc.device)
    note = fit_metric_to_task(cfg)  # said here, on the main process: load_config fitted it to the task
    if note is not None:
        proc.say(f"note: {note}")
    notes = []  # of building the model: fit says them unless the run resumes
    inputs = prepare_run(cfg, proc, lambda tokenizer: build_classifier(cfg, proc.device, say=notes.append, adapters=True))
    train = training_split(cfg, proc, inputs.train)
    weights = class_weights(cfg, train, proc.device, say=proc.say)
    trainer = Trainer(cfg, proc, inputs.built, inputs.tokenizer, train, inputs.val,
                      loss_fn=functools.partial(supervised_loss, class_weights=weights))
    result = fit(trainer, notes)
    if result is not None and cfg["data"]["predict_filepath"]:
        decisions = Decisions(trainer.thresholds.values, trainer.calibration.temperature or 1.0)  # the best model's
        result["predictions"] = predict_file(cfg, proc, classifier_of(trainer.model), inputs.tokenizer, trainer.run_dir,
                                             total_rows=inputs.predict_rows, decisions=decisions)
    return result


def main(argv=None, run_fn=run, doc=__doc__):
    """Command-line entry point: one clear line and exit status 2 on any user error.

    distill.py runs through here too, with its own run_fn and docstring.
    """
    argv = sys.argv[1:] if argv is None else argv
    if answer_help(argv, doc):
        return 0
    started = time.perf_counter()
    cfg, shared = None, True  # an error every rank meets alike is printed by rank 0 alone
    try:
        if "--runs" in argv:  # the table of runs in trainer.log_dir, of this config (--trainer.log_dir)
            return print_runs(load_config([a for a in argv if a != "--runs"])["trainer"]["log_dir"])
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
        if result is not None and proc.is_main:  # a failure to record it is one error line too
            result["wall_s"] = round(time.perf_counter() - started, 1)
            if result.get("run_dir"):
                record_run(result["run_dir"], cfg, argv, result, script_name(run_fn is run))
    except (ConfigError, DataError, ModelError, TrainingError, OutputError) as e:
        if cfg is not None and cfg["trainer"]["debug"]:
            raise
        if launch_rank() == 0 or not (shared or isinstance(e, MainProcessFailed)):
            # one write: print writes the newline apart, and under torchrun ranks share one stderr
            sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: stopped at once by a second signal, without a new checkpoint; resume from "
                         "the last one with --ckpt.resume auto\n")
        return 130
    if result is None:  # stopped by a signal; the checkpoint to resume from is written
        if proc.is_main:
            print(f"resume with: {resume_command(argv, script_name(run_fn is run), proc)}")
        return 1
    if proc.is_main:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
