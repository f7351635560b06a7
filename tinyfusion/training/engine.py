"""The training engine: one loop under `train`, the learnable search and `finetune`.

A trainer is a `Task`: its model, the module DDP wraps, its parameter groups and learning rates, its
EMA pairs, the per-step inputs it draws from the engine's seeded generator, and its loss. The engine
does everything else, once, for all three: device placement, precision (bf16/fp16 autocast over fp32
master weights, TF32), DDP, fused AdamW, gradient accumulation, clipping, the non-finite-step skip,
the EMA, checkpoint cadence by step and by wall time, resume, logging and progress.

The step never waits for the host: the non-finite decision is a device tensor handed to the fused
optimizer (`found_inf`, as the AMP grad scaler does) and folded into the EMA weight; losses accumulate
on the device. The host syncs at log points (and every `max_bad_steps` steps to bound an abort).
Randomness comes from one generator on the training device, drawn over the global batch and sliced
per rank and per micro-batch, so K ranks, K accumulation steps and a resumed run reproduce one
uninterrupted process.
"""
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError
from ..models.stack import block_stack
from .runlog import progress
from . import fsdp
from . import precision as amp
from .blocks import wrap_blocks
from .state import AsyncSaver, load, to_cpu


# Set to N, a run SIGKILLs itself right after writing step N's state: kill-and-resume tests resume from a
# known 0 < N < steps instead of racing a kill against the run.
KILL_AFTER_STATE = "TINYFUSION_TEST_KILL_AFTER_STATE"


@dataclass
class RunOptions:
    """How a run executes; none of these changes what is being trained."""

    precision: str = "auto"  # bf16 on CUDA, fp32 elsewhere
    tf32: bool = True
    grad_accum: int = 1
    grad_checkpoint: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    ckpt_minutes: float = 30.0  # also save when this much wall time passed since the last save (0: off)
    async_save: bool = True
    fsdp: bool = False  # FSDP2: blocks and root sharded over the ranks, instead of DDP (training/fsdp.py)
    fsdp_offload: bool = False  # parameters and optimizer state on the host (CUDA)
    fsdp_teacher: str = "shard"  # the KD teacher: "shard" like the student, or "replicate" (whole on every rank)


class Task:
    """What a trainer states. `cfg` carries steps, global_batch_size, seed, log_every, ckpt_every,
    max_bad_steps; `model` is the network whose blocks get checkpointed or compiled, `net` the module
    DDP wraps (the model plus gates or a recording wrapper)."""

    name = "train"
    hint = "lower --lr"
    grad_clip = 1.0
    weight_decay = 0.0

    def param_groups(self):
        raise NotImplementedError

    def clip_params(self):
        """Parameters whose global norm is clipped (default: all trainable)."""
        return [p for g in self.param_groups() for p in g["params"]]

    def lrs(self, step):
        """Learning rates per parameter group at `step`; None keeps the groups' own (constant) rates."""
        return None

    def ema_pairs(self):
        """(EMA tensors, the tensors they follow); empty for no EMA. Under FSDP the engine keeps sharded
        clones of the followed tensors instead (`Engine.ema`), so a task reads its EMA from there."""
        return [], []

    def ema_module(self):
        """The module whose parameters are the EMA tensors (what gets saved), or None."""
        return None

    def teacher_nets(self):
        """(root module, its blocks) of frozen nets the loss runs (a KD teacher): FSDP shards them like the
        trained net unless --fsdp-teacher replicate."""
        return []

    def ema_decay(self, step):
        return 0.9999

    def inputs(self, gen, step):
        """This rank's batch for `step` as a list of tensors on the device, batch first."""
        raise NotImplementedError

    def loss(self, net, inputs, step):
        """(scalar loss, {name: scalar}) of one micro-batch; runs under the engine's autocast."""
        raise NotImplementedError

    def settings(self):
        """What a resumed run must share with the saved one."""
        return {}

    def state(self):
        return {}

    def load_state(self, state):
        pass

    def on_log(self, step, entry):
        """Called at every log point with the synced means; may add keys to `entry`."""

    # --- for a task that builds its own engine as self.engine ----------------------------------------
    @property
    def step(self):
        return self.engine.step

    @property
    def curve(self):
        return self.engine.curve

    @property
    def skipped(self):
        return self.engine.skipped_steps

    def resume(self, path):
        self.engine.resume(path)


def adamw(groups, weight_decay, device):
    """AdamW, fused where the device supports it (one kernel for all parameters, and it takes the
    non-finite flag on the device); the foreach implementation otherwise."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, weight_decay=weight_decay), False


class Engine:
    def __init__(self, task, options=None, rank=0, world=1, device="cpu", log=None, show_progress=True):
        self.task, self.opts = task, options or RunOptions()
        cfg = task.cfg
        self.rank, self.world, self.device, self.log = rank, world, torch.device(device), log
        self.show_progress = show_progress and rank == 0
        self.precision = amp.resolve(self.opts.precision, self.device)
        amp.configure_tf32(self.device, self.opts.tf32)
        local = cfg.global_batch_size // world
        if self.opts.grad_accum < 1 or local % self.opts.grad_accum:
            raise UserError(f"--grad-accum {self.opts.grad_accum} does not divide the per-rank batch {local}")
        if self.opts.grad_checkpoint or self.opts.compile:
            wrap_blocks(task.model, self.opts.grad_checkpoint, self.opts.compile, self.opts.compile_backend)
        task.net.to(self.device)
        if self.opts.fsdp:
            fsdp.check_supported(task.model, self.opts.fsdp_offload, self.device)
            nets = [(task.net, block_stack(task.model).blocks)]
            nets += task.teacher_nets() if self.opts.fsdp_teacher == "shard" else []
            for root, blocks in nets:  # new (DTensor) parameters: the task's lists are read after
                fsdp.shard(root, blocks, self.precision, self.opts.fsdp_offload)
            self.net = task.net
        elif world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(task.net, device_ids=ids, gradient_as_bucket_view=True)
        else:
            self.net = task.net
        groups = task.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.clip = task.clip_params() if task.grad_clip else []
        self.opt, self.fused = adamw(groups, task.weight_decay, self.device)
        self.scaler = amp.grad_scaler(self.device, self.precision)
        self.ema, ema_src = task.ema_pairs()
        if self.opts.fsdp:  # the EMA sharded like its model; the task's own EMA module waits on the meta device
            self.ema = [p.detach().clone() for p in ema_src]
            if task.ema_module() is not None:
                task.ema_module().to("meta")
        # the EMA update runs on this rank's shards (views: in-place updates reach the DTensors)
        self.ema_local = [fsdp.local(e) for e in self.ema]
        self.ema_src = [fsdp.local(p.detach()) for p in ema_src]
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step, self.curve, self.names = 0, [], None
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.skipped, self.bad_run, self.max_run, self.count = z(), z(), z(), z()
        self.sums = None
        self.window_start, self.window_t = 0, None
        self.saver = AsyncSaver(self.opts.async_save)
        self.last_save = time.time()
        self.step_times, self.skipped_steps = [], 0

    # --- state ---------------------------------------------------------------------------------
    def settings(self):
        c = self.task.cfg
        return {"task": self.task.name, "global_batch_size": c.global_batch_size, "seed": c.seed, **self.task.settings()}

    def state_dict(self):
        return {"params": [p.detach() for p in self.params], "ema": list(self.ema), "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "step": self.step,
                "counters": torch.stack([self.skipped, self.bad_run, self.max_run, self.count]),
                "sums": self.sums if self.sums is not None else torch.zeros(0), "names": json.dumps(self.names),
                "window_start": self.window_start, "gen": self.gen.get_state(), "curve": json.dumps(self.curve),
                "settings": json.dumps(self.settings(), default=list), "task": self.task.state()}

    def load_state_dict(self, s, tensors_loaded=False):
        """`tensors_loaded`: parameters, EMA and optimizer state were read in place already (FSDP)."""
        if not isinstance(s, dict) or "settings" not in s:
            raise UserError("--resume: this state was written before the training engine (or is not a training "
                            "state) and cannot be resumed; start the run again")
        saved, mine = json.loads(s["settings"]), json.loads(json.dumps(self.settings(), default=list))
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise UserError(f"--resume: the saved run used different settings ({', '.join(diff)})")
        if s["step"] > self.task.cfg.steps:
            raise UserError(f"--resume: the saved run is at step {s['step']}, past --steps {self.task.cfg.steps}")
        if not tensors_loaded:
            if len(s["params"]) != len(self.params) or len(s["ema"]) != len(self.ema):
                raise UserError("--resume: the saved state holds a different set of parameters")
            with torch.no_grad():
                for p, v in zip(self.params, s["params"]):
                    p.copy_(v)
                for e, v in zip(self.ema, s["ema"]):
                    e.copy_(v)
            self.opt.load_state_dict(s["opt"])
        if self.scaler is not None and s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        self.step = int(s["step"])
        self.skipped, self.bad_run, self.max_run, self.count = (v.to(self.device).clone() for v in s["counters"])
        self.names = json.loads(s["names"])
        self.sums = s["sums"].to(self.device).clone() if self.names else None
        self.window_start = int(s["window_start"])
        self.gen.set_state(s["gen"])
        self.curve = json.loads(s["curve"])
        self.task.load_state(s["task"])

    def resume(self, path):
        if self.opts.fsdp:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            tensors = self.sharded_tensors()
            meta = fsdp.load_sharded(path, tensors)
            set_state_dict(self.net, self.opt, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
            self.load_state_dict(meta, tensors_loaded=True)
        else:
            self.load_state_dict(load(path))

    def sharded_tensors(self):
        """What an FSDP state holds as shards: the net's parameters, the optimizer state, the EMA."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.net, self.opt)
        return {"model": model, "optim": optim, "ema": {str(i): e for i, e in enumerate(self.ema)}}

    def save(self, path):
        """The resumable state: rank 0 writes one file in the background; under FSDP every rank writes its
        shards (torch.distributed.checkpoint), so every rank calls this."""
        if self.opts.fsdp:
            state = {k: v for k, v in self.state_dict().items() if k not in ("params", "ema", "opt")}
            fsdp.save_sharded(path, self.sharded_tensors(), {**to_cpu(state), "world_size": self.world}, self.rank)
        elif self.rank == 0:
            self.saver.save(path, self.state_dict())

    def ema_model(self):
        """The task's EMA module with the EMA values; under FSDP gathered whole from the shards (every rank
        calls it; the module lands on the host)."""
        module = self.task.ema_module()
        if self.opts.fsdp and module is not None:
            fsdp.gather_into(module, self.ema, buffers_from=self.task.model)
        return module

    # --- one step ------------------------------------------------------------------------------
    def train_step(self):
        task, k = self.task, self.opts.grad_accum
        step = self.step
        lrs = task.lrs(step)
        for g, lr in zip(self.opt.param_groups, lrs if lrs is not None else []):
            g["lr"] = lr
        inputs = task.inputs(self.gen, step)
        micro = list(zip(*[x.chunk(k) for x in inputs])) if k > 1 else [inputs]
        total = None
        for i, batch in enumerate(micro):
            sync = self.world == 1 or i == k - 1
            if self.opts.fsdp:
                self.net.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or self.opts.fsdp else self.net.no_sync()):
                with amp.autocast(self.device, self.precision):
                    loss, parts = task.loss(self.net, batch, step)
                if self.names is None:
                    self.names = ["loss", *parts]
                values = torch.stack([loss.detach().float(), *[v.detach().float() for v in parts.values()]]) / k
                total = values if total is None else total + values
                scaled = loss.float() / k
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        bad = ~torch.isfinite(total[0])
        if self.clip:
            bad = bad | ~torch.isfinite(fsdp.full(torch.nn.utils.clip_grad_norm_(self.clip, task.grad_clip)))
        bad = bad.float().reshape(1)
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # a device tensor: NCCL and gloo both reduce it
        bad = bad.reshape(())
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        elif self.fused:
            self.opt.grad_scale, self.opt.found_inf = None, bad
            self.opt.step()
            del self.opt.grad_scale, self.opt.found_inf
        elif not bool(bad):  # an optimizer without a device-side skip: one host sync
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema:
            with torch.no_grad():
                keep = 1.0 - (1.0 - task.ema_decay(step + 1)) * (1.0 - bad)  # 1 on a skipped step: no update
                torch._foreach_mul_(self.ema_local, keep)
                torch._foreach_add_(self.ema_local, torch._foreach_mul(self.ema_src, 1.0 - keep))
        if self.sums is None:
            self.sums = torch.zeros(len(self.names), device=self.device)
        self.sums += torch.where(bad > 0, torch.zeros_like(total), total)
        self.count += 1.0 - bad
        self.skipped += bad
        self.bad_run = (self.bad_run + 1.0) * bad
        self.max_run = torch.maximum(self.max_run, self.bad_run)
        self.step += 1

    # --- the loop ------------------------------------------------------------------------------
    def check_bad(self, max_run):
        limit = self.task.cfg.max_bad_steps
        if max_run >= limit:
            raise UserError(f"{limit} non-finite losses in a row at step {self.step} "
                            f"({int(self.skipped.item())} skipped in all); {self.task.hint}")

    def log_point(self, bar):
        sums = self.sums.clone()
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        values = torch.cat([sums, torch.stack([self.count, self.max_run, self.skipped])]).tolist()
        *sums, count, max_run, skipped = values
        self.check_bad(max_run)
        now, steps = time.perf_counter(), self.step - self.window_start
        entry = {"step": self.step}
        if count:
            entry.update({name: v / count for name, v in zip(self.names, sums)})
        if self.window_t is not None and steps:
            dt = (now - self.window_t) / steps
            self.step_times.append(dt)
            entry.update(step_s=round(dt, 5), images_per_s=round(self.task.cfg.global_batch_size / dt, 2))
        if self.device.type == "cuda":
            entry["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)
        self.task.on_log(self.step, entry)
        if count:
            self.curve.append(entry)
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in entry.items()
                             if k in ("loss", "images_per_s", "tau", "min_conf")}, refresh=False)  # shown at the next draw
            if self.log is not None:
                self.log.write(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
                                        if not isinstance(v, (list, dict))), echo=False)
        self.sums.zero_()
        self.count.zero_()
        self.max_run.zero_()
        self.max_run += self.bad_run
        self.window_start, self.window_t = self.step, time.perf_counter()
        self.skipped_steps = int(skipped)

    def run(self, state_path=None, on_step=None):
        """Train to cfg.steps; on_step(step) runs after every step (snapshots)."""
        cfg = self.task.cfg
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = progress(total=cfg.steps, initial=self.step, desc=self.task.name, enabled=self.show_progress)
        self.window_start, self.window_t = self.step, time.perf_counter()
        self.skipped_steps = int(self.skipped.item())
        try:
            while self.step < cfg.steps:
                self.train_step()
                bar.update(1)
                done, last = self.step, self.step == cfg.steps
                logged = done % cfg.log_every == 0 or last
                if logged:
                    self.log_point(bar)
                elif done % cfg.max_bad_steps == 0:
                    self.check_bad(self.max_run.item())
                timed = bool(self.opts.ckpt_minutes) and time.time() - self.last_save >= 60 * self.opts.ckpt_minutes
                if self.opts.fsdp and self.world > 1:  # every rank saves its shards together: rank 0's clock decides
                    timed = logged and self.agree(timed)
                due = done % cfg.ckpt_every == 0 or last or timed
                if on_step is not None:
                    on_step(done)
                if state_path and due:
                    self.save(state_path)
                    self.last_save = time.time()
                    if os.environ.get(KILL_AFTER_STATE) == str(done):  # tests: die mid-run, state N on disk
                        self.saver.wait()
                        os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
            self.saver.wait()
        return self

    def agree(self, flag):
        """Rank 0's boolean, on every rank (one small collective)."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def summary(self):
        """What a run's metrics.json records about the run itself."""
        times = sorted(self.step_times[1:] or self.step_times)  # the first window holds compilation
        out = {"precision": self.precision, "grad_accum": self.opts.grad_accum, "world_size": self.world,
               "skipped_steps": self.skipped_steps, "fused_adamw": self.fused,
               "grad_checkpoint": self.opts.grad_checkpoint, "compile": self.opts.compile, "fsdp": self.opts.fsdp}
        if times:
            dt = times[len(times) // 2]
            out.update(median_step_s=round(dt, 5), images_per_s=round(self.task.cfg.global_batch_size / dt, 2))
        if self.device.type == "cuda":
            out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)
        return out
