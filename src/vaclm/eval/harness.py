"""The same tasks through lm-evaluation-harness itself (optional extra `harness`; datasets from the hub)."""

from __future__ import annotations

from ..errors import VaclmError


def harness_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate_with_harness(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16) -> dict:
    """lm_eval.simple_evaluate on the in-memory model: {task: {metric: value}}."""
    if not harness_available():
        raise VaclmError("--harness needs lm-evaluation-harness: pip install lm-eval (or pip install 'vaclm[harness]')")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise VaclmError("--harness needs the model's tokenizer; save one next to the model")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit)
    except Exception as exc:  # hub unreachable, unknown task, ...: lm-eval raises many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise VaclmError(f"lm-evaluation-harness failed ({type(exc).__name__}: {first}); without hub access use vaclm's own scorer (drop --harness)") from exc
    results = {}
    for task, metrics in out["results"].items():
        # lm-eval names metrics "acc,none", "acc_stderr,none": keep the metric part of numeric entries.
        results[task] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k}
    return results
