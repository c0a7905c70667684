"""log P(continuation | context) for many pairs, tokenised and batched as lm-evaluation-harness does.

Token boundaries (lm_eval HFLM._encode_pair): trailing spaces of the context move to the
continuation, the whole string is encoded once and split at the length of the encoded context, so
the continuation's first token is the one the model would really see. Encoding uses the
tokenizer's default special tokens (lm-eval >= 0.4.9 with add_bos_token unset); an empty context
becomes the BOS (else EOS) token. The input is (context + continuation)[:-1], left-truncated to the
model's length; requests run longest first, right-padded (no attention mask is needed: a causal
model's real positions never see the padding after them).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import VaclmError


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def max_length(model) -> int:
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 2048


@torch.inference_mode()
def score_tokens(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16, progress: bool = True,
                 desc: str = "log-likelihood") -> list[float]:
    """Sum of log-probabilities of each continuation's tokens given its context (token-id pairs)."""
    if batch_size < 1:
        raise VaclmError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    limit = max_length(model)
    inputs, cont_lens = [], []
    for ctx, cont in requests:
        if not cont or len(cont) > limit:
            raise VaclmError(f"a continuation encodes to {len(cont)} tokens (model length {limit}); the task text is malformed")
        inputs.append((ctx + cont)[-(limit + 1) :][:-1])
        cont_lens.append(len(cont))
    # Longest first (as lm-eval), ties in request order: the same batches on every run.
    order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), i))
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores = [0.0] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(inputs[chunk[0]])
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, : len(inputs[i])] = torch.tensor(inputs[i])
        # The earliest position any continuation is predicted from; the lm_head skips the rest.
        first = min(len(inputs[i]) - cont_lens[i] for i in chunk)
        kwargs = {"logits_to_keep": width - first} if keep_kw else {}
        logits = model(input_ids=batch.to(device), use_cache=False, **kwargs).logits
        offset = width - logits.shape[1]  # position p's logits sit at column p - offset
        for row, i in enumerate(chunk):
            end = len(inputs[i])  # predictions for the continuation: positions end - len .. end - 1
            picked = logits[row, end - cont_lens[i] - offset : end - offset].float()
            targets = torch.tensor(requests[i][1][-cont_lens[i] :], device=picked.device)
            logprobs = F.log_softmax(picked, dim=-1).gather(-1, targets[:, None])
            scores[i] = float(logprobs.sum())
        bar.update(len(chunk))
    bar.close()
    return scores


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16, progress: bool = True,
                   desc: str = "log-likelihood") -> list[float]:
    """log P(continuation | context) for each (context, continuation) string pair."""
    if tokenizer is None:
        raise VaclmError("zero-shot evaluation needs the model's tokenizer; save one next to the model")
    requests = [encode_pair(tokenizer, c, x) for c, x in pairs]
    return score_tokens(model, requests, batch_size=batch_size, progress=progress, desc=desc)
