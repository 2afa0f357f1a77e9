"""Scoring one model (the base, or base + a saved adapter) on the test rows: per item, so that the statistics can
pair items across arms.

Per test row: the log-loss of every token of prompt + answer + end token after the first (the primary metric,
reported as perplexity), the log-loss of the answer and end tokens, and whether it is answered right — the argmax
of the choices' summed log-likelihoods for rows with choices, else exact match (every answer token and the end
token are the model's top prediction, which equals greedy decoding). Plus Lee news perplexity as a drift check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from bench.quality.data import Task


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + end token, and where the answer starts. Prompt and answer are tokenized
    separately (as in training), so an answer's tokens never merge with the prompt's."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def _forward_log_probs(model, tokenizer, sequences: Sequence[list[int]]):
    """Log-probabilities ``[B, T-1, V]`` of each next token for right-padded ``sequences`` (float32)."""
    import torch

    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1), ids


def score_task(model, tokenizer, task: Task, batch_size: int) -> dict:
    """Per-item numbers of one task's test rows (lists aligned with ``task.test``)."""
    import torch

    nll, tokens, answer_nll, answer_tokens, correct = [], [], [], [], []
    # scored in order of length (little padding), reported in the task's order
    order = sorted(range(len(task.test)), key=lambda i: len(task.test[i]["prompt"]))
    rows = [task.test[i] for i in order]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            encoded = [encode(tokenizer, r["prompt"], r["answer"]) for r in chunk]
            log_probs, ids = _forward_log_probs(model, tokenizer, [e[0] for e in encoded])
            chunk_correct: list[int | None] = [None] * len(chunk)
            for b, (sequence, answer_start) in enumerate(encoded):
                n = len(sequence)
                target = ids[b, 1:n]
                token_lp = log_probs[b, : n - 1].gather(1, target[:, None])[:, 0]
                nll.append(-float(token_lp.sum()))
                tokens.append(n - 1)
                answer_lp = token_lp[answer_start - 1 :]
                answer_nll.append(-float(answer_lp.sum()))
                answer_tokens.append(int(answer_lp.numel()))
                if "choices" not in chunk[b]:
                    top = log_probs[b, answer_start - 1 : n - 1].argmax(dim=-1)
                    chunk_correct[b] = int(bool((top == target[answer_start - 1 :]).all()))
                elif (single := _single_token_choices(tokenizer, chunk[b]["choices"])) is not None:
                    # one token per choice: its log-likelihood is read at the prompt's last position
                    scores = log_probs[b, answer_start - 1, single].tolist()
                    chunk_correct[b] = _is_unique_best(scores, chunk[b])
            multi = [b for b, value in enumerate(chunk_correct) if value is None]
            if multi:
                for b, value in zip(
                    multi,
                    _choice_correct(model, tokenizer, [chunk[b] for b in multi], batch_size),
                    strict=True,
                ):
                    chunk_correct[b] = value
            correct.extend(chunk_correct)
    position = {original: k for k, original in enumerate(order)}
    back = [position[i] for i in range(len(order))]
    return {
        "nll": [nll[k] for k in back],
        "tokens": [tokens[k] for k in back],
        "answer_nll": [answer_nll[k] for k in back],
        "answer_tokens": [answer_tokens[k] for k in back],
        "correct": [correct[k] for k in back],
    }


def _choice_correct(model, tokenizer, rows: Sequence[dict], batch_size: int) -> list[int]:
    """1 where the answer has the highest summed log-likelihood among the row's choices (ties count as wrong)."""
    sequences, spans, owners = [], [], []
    for i, row in enumerate(rows):
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for choice in row["choices"]:
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            sequences.append(prompt_ids + choice_ids)
            spans.append((len(prompt_ids), len(prompt_ids) + len(choice_ids)))
            owners.append(i)
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        log_probs, ids = _forward_log_probs(model, tokenizer, batch)
        for b, (first, end) in enumerate(spans[start : start + batch_size]):
            target = ids[b, first:end]
            scores.append(float(log_probs[b, first - 1 : end - 1].gather(1, target[:, None]).sum()))
    result = []
    cursor = 0
    for row in rows:
        result.append(_is_unique_best(scores[cursor : cursor + len(row["choices"])], row))
        cursor += len(row["choices"])
    return result


def _is_unique_best(scores: Sequence[float], row: dict) -> int:
    best = max(scores)
    return int(scores.count(best) == 1 and row["choices"][scores.index(best)] == row["answer"])


def _single_token_choices(tokenizer, choices: Sequence[str]) -> list[int] | None:
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def summarize_items(items: dict) -> dict:
    """Task-level numbers from per-item ones: perplexity, answer log-loss, accuracy."""
    loss = sum(items["nll"]) / max(1, sum(items["tokens"]))
    answer = sum(items["answer_nll"]) / max(1, sum(items["answer_tokens"]))
    return {
        "loss": round(loss, 6),
        "ppl": round(math.exp(loss), 5),
        "answer_loss": round(answer, 6),
        "accuracy": round(sum(items["correct"]) / max(1, len(items["correct"])), 6),
        "num_test": len(items["correct"]),
    }


def evaluate_model(
    model_path: Path,
    adapter_dir: Path | None,
    tasks: Sequence[Task],
    lee_texts: Sequence[str],
    batch_size: int,
) -> dict:
    """Every task's per-item numbers and summary, the pooled primary metric, and Lee perplexity."""
    from bench.commonsense import load_model_and_tokenizer
    from bench.reproduce_small.evaluation import text_loss

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        str(model_path), str(adapter_dir) if adapter_dir else None, device="cpu", dtype="float32"
    )
    model.eval()
    tokenizer.padding_side = "right"
    per_task = {}
    for task in tasks:
        items = score_task(model, tokenizer, task, batch_size)
        per_task[task.name] = {"summary": summarize_items(items), "items": items}
    pooled_nll = sum(sum(t["items"]["nll"]) for t in per_task.values())
    pooled_tokens = sum(sum(t["items"]["tokens"]) for t in per_task.values())
    lee_loss = text_loss(model, tokenizer, list(lee_texts)) if lee_texts else float("nan")
    return {
        "loss": round(pooled_nll / pooled_tokens, 6),
        "ppl": round(math.exp(pooled_nll / pooled_tokens), 5),
        "tasks": per_task,
        "lee_loss": round(lee_loss, 6),
        "lee_ppl": round(math.exp(lee_loss), 5) if lee_texts else None,
        "eval_seconds": round(time.perf_counter() - start, 2),
    }
