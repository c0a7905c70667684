"""Distillation loss as tensor functions: KL on logits at a temperature, plus, optionally, the
student's own next-token cross-entropy on the training text.

The KL is computed a chunk of positions at a time from the two models' final hidden states, so
only `chunk` rows of full-vocabulary logits exist at once; its gradient comes back as a gradient
on the student's hidden states, which one backward pass through the student's body then uses.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Head = Callable[[torch.Tensor], torch.Tensor]


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(p_teacher || p_student) at temperature T, times T^2 (Hinton et al. 2015):
    the T^2 keeps gradient magnitudes comparable across temperatures."""
    t = float(temperature)
    if t != 1.0:  # a division over the full vocabulary is not free
        student_logits, teacher_logits = student_logits / t, teacher_logits / t
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") * (t * t)


def chunked_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: Head, teacher_head: Head,
               temperature: float, chunk: int, grad_scale: float | None = None,
               labels: torch.Tensor | None = None, ce_weight: float = 0.0) -> tuple[float, torch.Tensor | None, float]:
    """(KL summed over positions, d(grad_scale * (KL + ce_weight * NLL))/d student_hidden or None,
    student NLL summed over labels).

    Hidden states are (..., d); positions are flattened. With grad_scale None no gradient is built
    (validation). `labels` (same leading shape, -100 = ignore) adds the student's next-token NLL,
    which enters the gradient only with ce_weight > 0.
    """
    if ce_weight > 0 and labels is None:
        raise ValueError("a cross-entropy weight needs labels")
    d = student_hidden.shape[-1]
    hs = student_hidden.detach().reshape(-1, d)
    ht = teacher_hidden.reshape(-1, d)
    flat_labels = labels.reshape(-1) if labels is not None else None
    grad = torch.empty_like(hs) if grad_scale is not None else None
    total, nll = 0.0, 0.0
    for start in range(0, hs.shape[0], chunk):
        rows = slice(start, start + chunk)
        with torch.no_grad():
            teacher_logits = teacher_head(ht[rows])
        building = grad is not None
        piece = hs[rows].clone().requires_grad_(True) if building else hs[rows]
        with torch.enable_grad() if building else torch.no_grad():
            student_logits = student_head(piece)
            loss = kl_sum(student_logits, teacher_logits, temperature)
            # one cross-entropy over the vocabulary per chunk: reported as NLL and, when weighted, trained
            ce = (F.cross_entropy(student_logits.float(), flat_labels[rows], ignore_index=-100, reduction="sum")
                  if flat_labels is not None else None)
        if building:
            objective = loss + ce_weight * ce if ce_weight > 0 else loss
            (grad[rows],) = torch.autograd.grad(objective * grad_scale, piece)
        total += loss.item()
        if ce is not None:
            nll += ce.item()
    return total, (grad.view_as(student_hidden) if grad is not None else None), nll


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[:, i] = input_ids[:, i + 1]; the last position predicts nothing (-100)."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
