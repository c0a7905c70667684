"""The healing loop: distil a teacher's logits into a compressed student's factors.

Per optimizer step: `grad_accum` forward passes of `batch_size` windows; each runs the teacher's
body under inference_mode, the student's body with autograd, the chunked KL on the two final
hidden states (plus, optionally, the student's cross-entropy on the text), and one backward
pass. AdamW, linear warm-up then cosine decay, gradient clipping. Validation (KL to the teacher on
held-out windows, plus ce_weight x the student's NLL there when that is trained) at step 0,
every `eval_every` steps and at the end; the best validated parameters are what the run returns,
and `patience` validations without improvement stop it. With a checkpoint, the full state is saved
every `checkpoint_every` steps and a resumed run continues to the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import VaclmError
from ..model.heads import head_logits, run_body, vocab_size
from .checkpoint import HealCheckpoint, pack_optimizer, unpack_optimizer
from .config import HealConfig
from .distill import chunked_kl, next_token_labels
from .params import balance_factors, freeze_all_but, restore_flags, trainable_parameters

# files of the compressed folder that still describe the healed one (ranks are unchanged)
CARRIED_FILES = ("vaclm_report.json", "allocation.json", "allocation.png")


@dataclass
class HealResult:
    config: HealConfig
    total_steps: int
    steps: int = 0  # optimizer steps taken
    best_step: int = 0  # the step whose parameters the model holds at the end (0: the input model)
    completed: bool = False  # False when stopped by `stop_after` (the run can be resumed)
    stopped_early: bool = False
    tokens: int = 0  # training tokens processed
    train_seconds: float = 0.0  # forward + backward + optimizer time, without validation and checkpoints
    losses: list[dict] = field(default_factory=list)  # per step: step, loss, kl, ce, lr, grad_norm, tokens
    val: list[dict] = field(default_factory=list)  # per validation: step, kl, ppl, objective
    windows: dict = field(default_factory=dict)
    teacher: str = ""
    source: str | None = None  # the compressed folder the student came from
    resumed_from: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        best = next((v for v in self.val if v["step"] == self.best_step), None)
        return {"config": self.config.to_dict(), "teacher": self.teacher, "source": self.source,
                "total_steps": self.total_steps, "steps": self.steps, "best_step": self.best_step,
                "best_val": best, "completed": self.completed, "stopped_early": self.stopped_early,
                "tokens": self.tokens, "train_seconds": round(self.train_seconds, 2),
                "tokens_per_second": round(self.tokens_per_second, 2), "windows": self.windows,
                "resumed_from": self.resumed_from, "losses": self.losses, "val": self.val}

    def write_files(self, folder: Path) -> None:
        """heal_report.json, plus the compression reports of the source folder (still valid)."""
        if self.source is not None:
            for name in CARRIED_FILES:
                if (Path(self.source) / name).is_file():
                    shutil.copy2(Path(self.source) / name, Path(folder) / name)
        (Path(folder) / "heal_report.json").write_text(json.dumps(self.to_dict(), indent=1))


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR factor for optimizer step k (0-based): linear warm-up, then cosine down to min_ratio."""
    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / (warmup_steps + 1)
        progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    def __init__(self, student, teacher, params: dict[str, torch.nn.Parameter], train: torch.Tensor,
                 val: torch.Tensor, config: HealConfig, device: torch.device, compute_dtype: torch.dtype,
                 progress: bool):
        self.student, self.teacher, self.params, self.config = student, teacher, params, config
        self.train, self.val = train, val
        self.device, self.progress = device, progress
        self.autocast = (lambda: torch.autocast(device.type, dtype=compute_dtype)) \
            if compute_dtype != torch.float32 else contextlib.nullcontext
        self.heads = functools.partial(head_logits, student), functools.partial(head_logits, teacher)
        self.per_step = config.batch_size * config.grad_accum
        self.total_steps = math.ceil(len(train) * config.epochs / self.per_step)
        self.eval_every = config.eval_every or max(1, math.ceil(self.total_steps / 8))
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr, betas=(0.9, 0.95),
                                           weight_decay=config.weight_decay)
        warmup = math.ceil(config.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, warmup, config.min_lr_ratio))
        # one fixed permutation per epoch: the data position is just the step number
        self.order = torch.cat([torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + e))
                                for e in range(config.epochs)])
        self.best_val = math.inf
        self.bad_evals = 0
        self.best_params: dict[str, torch.Tensor] | None = None
        self._val_teacher: list[torch.Tensor] | None = None

    # one optimizer step ------------------------------------------------------------------------
    def step(self, k: int) -> dict:
        cfg = self.config
        seqs = self.order[k * self.per_step:(k + 1) * self.per_step]
        step_tokens = len(seqs) * cfg.seq_len
        kl_sum, nll_sum = 0.0, 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(seqs), cfg.batch_size):  # one forward + backward per micro-batch
            ids = self.train[seqs[start:start + cfg.batch_size]].to(self.device)
            labels = next_token_labels(ids) if cfg.ce_weight > 0 else None
            with torch.inference_mode(), self.autocast():
                t_last = run_body(self.teacher, ids)
            with self.autocast():
                s_last = run_body(self.student, ids)
                kl, grad, nll = chunked_kl(s_last, t_last, *self.heads, cfg.temperature, cfg.kl_chunk,
                                           grad_scale=1.0 / step_tokens, labels=labels, ce_weight=cfg.ce_weight)
            s_last.backward(grad)
            kl_sum += kl
            nll_sum += nll
        params = list(self.params.values())
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        kl, nll = kl_sum / step_tokens, nll_sum / step_tokens
        return {"step": k + 1, "loss": kl + cfg.ce_weight * nll, "kl": kl, "ce": nll, "lr": lr,
                "grad_norm": norm, "tokens": step_tokens}

    # validation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self, step: int) -> dict:
        """KL to the teacher and the student's perplexity on held-out windows; `objective` (KL, plus
        ce_weight x the student's NLL when that is trained) is the early-stopping metric."""
        was_training = self.student.training
        self.student.eval()
        batches = [self.val[i:i + self.config.batch_size].to(self.device)
                   for i in range(0, len(self.val), self.config.batch_size)]
        if self._val_teacher is None:  # the teacher never changes: its hidden states are computed once
            with self.autocast():
                self._val_teacher = [run_body(self.teacher, ids) for ids in batches]
        kl, nll, labels = 0.0, 0.0, 0
        with self.autocast():
            for ids, t_last in zip(batches, self._val_teacher):
                s_last = run_body(self.student, ids)
                target = next_token_labels(ids)
                k, _, n = chunked_kl(s_last, t_last, *self.heads, self.config.temperature, self.config.kl_chunk,
                                     labels=target)
                kl, nll, labels = kl + k, nll + n, labels + int((target >= 0).sum())
        self.student.train(was_training)
        kl, nll = kl / self.val.numel(), nll / labels
        return {"step": step, "kl": kl, "ppl": math.exp(nll), "objective": kl + self.config.ce_weight * nll}

    def record_validation(self, result: HealResult, step: int) -> None:
        v = self.validate(step)
        result.val.append(v)
        if v["objective"] < self.best_val:
            self.best_val, self.bad_evals, result.best_step = v["objective"], 0, step
            self.best_params = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self.bad_evals += 1

    # checkpoints -------------------------------------------------------------------------------
    def save(self, checkpoint: HealCheckpoint, result: HealResult) -> None:
        tensors, groups = pack_optimizer(self.optimizer)
        tensors.update({f"param.{n}": p.detach() for n, p in self.params.items()})
        if self.best_params is not None:
            tensors.update({f"best.{n}": t for n, t in self.best_params.items()})
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"step": result.steps, "tokens": result.tokens, "train_seconds": result.train_seconds,
                 "losses": result.losses, "val": result.val, "best_step": result.best_step,
                 "best_val": self.best_val if math.isfinite(self.best_val) else None, "bad_evals": self.bad_evals,
                 "scheduler": self.scheduler.state_dict(), "param_groups": groups}
        checkpoint.save(tensors, state)

    def restore(self, tensors: dict[str, torch.Tensor], state: dict, result: HealResult) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"])
        if f"best.{next(iter(self.params))}" in tensors:
            self.best_params = {n: tensors[f"best.{n}"].to(self.device) for n in self.params}
        unpack_optimizer(self.optimizer, tensors, state["param_groups"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        result.steps, result.tokens, result.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        result.losses, result.val, result.best_step = state["losses"], state["val"], state["best_step"]
        self.best_val = state["best_val"] if state["best_val"] is not None else math.inf
        self.bad_evals = state["bad_evals"]
        result.resumed_from = state["step"]

    # the loop ----------------------------------------------------------------------------------
    def run(self, result: HealResult, checkpoint: HealCheckpoint | None, stop_after: int | None) -> HealResult:
        cfg = self.config
        validating = len(self.val) > 0
        if validating and not result.val:
            self.record_validation(result, 0)
        bar = tqdm(total=len(self.order) * cfg.seq_len, initial=result.tokens, desc="heal",
                   unit="tok", unit_scale=True, disable=not self.progress)
        while result.steps < self.total_steps:
            k = result.steps
            start = time.perf_counter()
            record = self.step(k)
            result.train_seconds += time.perf_counter() - start
            result.steps, result.tokens = k + 1, result.tokens + record["tokens"]
            result.losses.append(record)
            last = result.steps == self.total_steps
            if validating and (result.steps % self.eval_every == 0 or last):
                self.record_validation(result, result.steps)
                result.stopped_early = self.bad_evals >= cfg.patience and not last
            bar.update(record["tokens"])
            bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{self.best_val:.4f}" if validating else "-",
                            lr=f"{record['lr']:.2e}", tok_s=f"{result.tokens_per_second:.0f}")
            if result.stopped_early:
                break
            due = result.steps % cfg.checkpoint_every == 0 or result.steps == stop_after
            if checkpoint is not None and due and not last:
                self.save(checkpoint, result)
            if stop_after is not None and result.steps >= stop_after and not last:
                bar.close()
                return result  # completed stays False: the checkpoint continues from here
        bar.close()
        if self.best_params is not None and result.best_step != result.steps:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.best_params[n])
        result.completed = True
        return result


def heal_model(student, teacher, train: torch.Tensor, val: torch.Tensor, config: HealConfig, *,
               device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32, progress: bool = True,
               checkpoint: HealCheckpoint | None = None, stop_after: int | None = None, teacher_name: str = "",
               source: str | None = None) -> HealResult:
    """Heal `student` in place (its factors, optionally the matrices kept dense) by distilling `teacher`."""
    device = torch.device(device)
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:  # the teacher's logits must index the student's vocabulary
        raise VaclmError(f"the teacher has a vocabulary of {vt} tokens and the student {vs}; "
                         "choose a teacher that shares the student's tokenizer (e.g. the model it was compressed from)")
    trainable = trainable_parameters(student, config.train_dense)
    original_dtype = next(iter(trainable.values())).dtype
    student.to(device=device, dtype=torch.float32)  # fp32 master weights; bf16 only inside autocast
    teacher.to(device)
    teacher.eval()
    if config.balance:
        balance_factors(student)
    flags = freeze_all_but(student, trainable)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()  # transformers checkpoints only in training mode
    else:
        student.eval()  # no dropout: healing is deterministic, and resuming gives the same result
    trainer = Trainer(student, teacher, trainable, train, val, config, device, compute_dtype, progress)
    result = HealResult(config=config, total_steps=trainer.total_steps, teacher=teacher_name, source=source,
                        windows={"train": len(train), "val": len(val), "seq_len": config.seq_len,
                                 "eval_every": trainer.eval_every})
    try:
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            trainer.restore(*saved, result)
        trainer.run(result, checkpoint, stop_after)
    finally:
        if config.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        student.eval()
        restore_flags(student, flags)
        student.to(dtype=original_dtype)
    return result
