"""Scoring a trained adapter (or the base model): rule-task accuracy with the LLM-Adapters protocol, the held-out
answer loss, Lee test perplexity, and the distinct LoRA parameters of a saved adapter (ties checked)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

from bench.commonsense import build_prompt, evaluate_tasks
from bench.embedded import model_dir
from bench.reproduce_small.settings import Budget


def count_adapter_parameters(adapter_dir: Path) -> dict:
    """Distinct LoRA parameters of a saved adapter. A ShareLoRA adapter is saved as a plain LoRA with equal
    copies in every member of a share set; the copies are checked equal and counted once."""
    from safetensors.torch import load_file

    from sharelora_plugin.planning import SharePlan

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    plan_path = adapter_dir / "sharelora_plan.json"
    leader_of: dict[int, int] = {}
    if plan_path.is_file():
        plan = SharePlan.load(plan_path)
        leader_of = {m: s[0] for s in plan.share_sets for m in s[1:]}
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    total = distinct = 0
    for key, tensor in tensors.items():
        total += tensor.numel()
        match = layer_re.search(key)
        layer = int(match.group(1)) if match else None
        if layer in leader_of:
            lead_key = layer_re.sub(f".layers.{leader_of[layer]}.", key, count=1)
            if not (tensors[lead_key].shape == tensor.shape and bool((tensors[lead_key] == tensor).all())):
                raise RuntimeError(f"{adapter_dir}: {key} differs from its share-set leader {lead_key}")
            continue
        distinct += tensor.numel()
    return {"saved_params": total, "trainable_params": distinct, "ties_verified": bool(leader_of)}


def response_loss(model, tokenizer, rows: Sequence[dict], batch_size: int = 16) -> float:
    """Mean NLL per response token (``output`` + eos) given the alpaca prompt, over held-out rows. The LM head
    runs on the response positions only (the 49k-word vocabulary projection of every prompt token would
    cost as much as the rest of the model)."""
    import torch

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, labels = [], []
            for row in chunk:
                prompt = tokenizer(build_prompt(row["instruction"], row.get("input")))["input_ids"]
                answer = tokenizer(row["output"])["input_ids"] + [tokenizer.eos_token_id]
                ids.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            target = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
            hidden = causal.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
            scored = target[:, 1:] != -100
            logits = causal.lm_head(hidden[scored]).float()
            total_nll += float(
                torch.nn.functional.cross_entropy(logits, target[:, 1:][scored], reduction="sum")
            )
            total_tokens += int(scored.sum())
    return total_nll / max(1, total_tokens)


def text_loss(model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 4) -> float:
    """Token-weighted mean NLL of ``texts`` (first ``max_length`` tokens each); perplexity is its exp."""
    import torch

    total_nll, total_tokens = 0.0, 0
    model.eval()
    tokenizer.padding_side = "right"
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            logits = model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int((target != -100).sum())
    return total_nll / max(1, total_tokens)


def evaluate_model(adapter_dir: Path | None, tests: dict, lee_texts: list[str], budget: Budget) -> dict:
    """Accuracy (LLM-Adapters protocol, greedy), held-out response loss and Lee perplexity of base (+ adapter)."""
    from bench.commonsense import load_model_and_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        str(model_dir()), str(adapter_dir) if adapter_dir else None, device="cpu", dtype="float32"
    )
    report = evaluate_tasks(
        model,
        tokenizer,
        tests,
        batch_size=budget.eval_batch_size,
        num_beams=1,
        max_new_tokens=budget.max_new_tokens,
        progress=False,
    )
    all_rows = [row for rows in tests.values() for row in rows]
    answer_loss = response_loss(model, tokenizer, all_rows, batch_size=budget.eval_batch_size)
    lee_loss = text_loss(model, tokenizer, lee_texts)
    return {
        "accuracy": {name: round(r.accuracy, 6) for name, r in report.tasks.items()},
        "average_accuracy": round(report.average, 6),
        "unanswered": sum(r.unanswered for r in report.tasks.values()),
        "num_test": sum(r.total for r in report.tasks.values()),
        "heldout_answer_loss": round(answer_loss, 6),
        "lee_loss": round(lee_loss, 6),
        "lee_ppl": round(math.exp(lee_loss), 4),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "sample_outputs": {
            name: [r.predictions[0]["output_pred"]] for name, r in list(report.tasks.items())[:2]
        },
    }
