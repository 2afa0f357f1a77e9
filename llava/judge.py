"""LLaVA-Bench (in-the-wild) judge: score model answers against reference answers with a GPT judge.

Protocol (upstream LLaVA ``llava/eval/eval_gpt_review_bench.py``, kept as-is where it defines the benchmark):

* The judge sees the image's caption (``context.jsonl``; a list of captions is joined by newlines), the question,
  the reference answer as Assistant 1 and the model answer as Assistant 2, then the ``llava_bench_{category}``
  rule prompt from ``rule.json`` (see :func:`build_content`).
* System message "You are a helpful and precise assistant for checking the quality of the answer.",
  temperature 0.2, max tokens 1024.
* The first line of the reply, with commas turned into spaces, must hold exactly two numbers:
  (reference score, model score) (see :func:`parse_score`).

Where this script differs from upstream, on purpose:

* Inputs are joined on ``question_id`` (upstream zips files line by line); missing or extra ids are logged and only
  the intersection is judged. ``--answer-list`` takes exactly two files (upstream takes one or more and uses the
  first two).
* A reply that does not parse, or a 200 whose body is not a chat completion, is asked again (a fresh call) up to
  ``--max-parse-retries`` times; then a reply without scores is written as a failure line (``scores: null``).
  Upstream writes ``[-1, -1]``, which then drags the mean down; ``summarize.py`` excludes failures and reports
  their count (``--upstream-scoring`` averages them in as upstream does).
* ``--repeats N`` independent judgements of every question, one review line per (repeat, question_id).
* Transport faults are retried by the openai client (``max_retries`` = ``--max-retries``, ``timeout`` =
  ``--timeout``): 408, 409, 429 and 5xx after ``Retry-After``/``retry-after-ms`` when the server sends one of at
  most 120 s, else after 0.5 s doubling up to 8 s with jitter; timeouts and dropped connections alike. A question
  whose retries run out gets no line (a rerun redoes it) and the run exits with status 1.
* Resumable: each review is one appended, fsync'ed JSONL line, each (repeat, question_id) exactly once. On start,
  a last line cut short by a crash (``kill -9`` mid-write) is cut off and what is already there is skipped. An
  ``--output`` holding any line that is not one of ours (an upstream review file, say) is refused and left as it
  was: the judge never drops, rewrites or re-permissions lines it did not write.
* The API key is read from ``OPENAI_API_KEY`` only and is never printed or written.

Run ``python llava/judge.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sharelora_plugin.planning.files import read_jsonl as read_jsonl_file
from sharelora_plugin.planning.rules import PlanError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared JSONL module beside this script
from resumable_jsonl import ForeignFileError, JsonlAppender, resume_own_jsonl  # noqa: E402

LOG = logging.getLogger("llava.judge")

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
TEMPERATURE = 0.2
DEFAULT_MAX_TOKENS = 1024
# A dated snapshot, so that a rerun months later asks the same judge; the requested and the server-reported
# model names are both written to every review line.
DEFAULT_MODEL = "gpt-4o-2024-08-06"
RULE_PREFIX = "llava_bench_"
# Placeholder key for OpenAI-compatible servers that need none (vLLM, llama.cpp, ...).
PLACEHOLDER_KEY = "EMPTY"
# The key is wrong or the model does not exist: every further call would fail the same way.
FATAL_STATUS = frozenset({401, 403, 404})

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_INPUT_ERROR = 2


class InputError(ValueError):
    """An input file is missing something or disagrees with another one; the message says what and where."""


class TransportError(RuntimeError):
    """The judge server could not give a usable chat completion (after retries, or a non-retryable status)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class SkippedError(TransportError):
    """Not asked at all, because an earlier call failed in a way every call would."""


class MalformedReplyError(ValueError):
    """A 200 whose body is not a chat completion (a proxy's error page, say); it is asked again like a reply
    without scores, since the openai client does not retry a 200."""

    def __init__(self, message: str, *, transport_retries: int) -> None:
        super().__init__(message)
        self.transport_retries = transport_retries


# --------------------------------------------------------------------------------------------------------------
# Data that travels
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One entry of ``rule.json``: the role name used in the prompt's headers and the instruction text."""

    role: str
    prompt: str


@dataclass(frozen=True)
class JudgeItem:
    """Everything needed to judge one question: the prompt and the ids to write next to its scores."""

    question_id: Any
    category: str
    content: str
    answer_id: Any
    model_id: Any
    reference_answer_id: Any
    reference_model_id: Any


@dataclass(frozen=True)
class JudgeReply:
    """One successful chat completion: the reply text and what the server said about it."""

    content: str
    model: str | None
    finish_reason: str | None
    usage: dict[str, int] | None
    transport_retries: int


@dataclass
class RunTally:
    """Counts shared by the worker threads of one run."""

    written: int = 0
    parse_failures: int = 0
    missing: list[tuple[int, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of objects, skipping blank lines; a bad line raises with its line number."""
    try:
        records = read_jsonl_file(path)
    except PlanError as error:
        raise InputError(str(error)) from error
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {number}: expected a JSON object, got {type(record).__name__}")
    return records


def require_keys(record: Mapping[str, Any], keys: Sequence[str], source: str) -> None:
    """Raise :class:`InputError` naming the file and the missing keys if ``record`` lacks any of ``keys``."""
    missing = [key for key in keys if key not in record]
    if missing:
        raise InputError(f"{source}: record {dict(record)!r:.200} lacks key(s) {missing}")


def index_by(records: Iterable[dict[str, Any]], key: str, source: str) -> dict[str, dict[str, Any]]:
    """Index records by ``str(record[key])``; a repeated id is an error (which of the two would be meant?)."""
    index: dict[str, dict[str, Any]] = {}
    for record in records:
        require_keys(record, [key], source)
        name = str(record[key])
        if name in index:
            raise InputError(f"{source}: {key} {record[key]!r} appears more than once")
        index[name] = record
    return index


def load_rules(path: str | Path) -> dict[str, Rule]:
    """Load ``rule.json`` (``{name: {"role": ..., "prompt": ...}}``)."""
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object of rules")
    rules = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise InputError(f"{path}: rule {name!r} needs a string 'prompt'")
        rules[name] = Rule(role=str(entry.get("role", "Assistant")), prompt=entry["prompt"])
    return rules


def caption_text(caption: str | Sequence[str]) -> str:
    """The context block: a caption string as-is, a list of captions joined by newlines.

    Upstream always calls ``'\\n'.join(caption)``, which would put a newline between the characters of a plain
    string; lmms-eval's port uses a string as-is, and so do we.
    """
    if isinstance(caption, str):
        return caption
    return "\n".join(str(line) for line in caption)


def build_content(caption: str, question: str, reference: str, answer: str, rule: Rule) -> str:
    """The judge's user message, byte for byte as upstream builds it; the reference is always Assistant 1."""
    role = rule.role
    return (
        f"[Context]\n{caption}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule.prompt}\n\n"
    )


def build_messages(content: str) -> list[dict[str, str]]:
    """The two chat messages sent to the judge."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def _report_id_mismatch(name: str, ids: set[str], question_ids: set[str]) -> None:
    missing = sorted(question_ids - ids)
    extra = sorted(ids - question_ids)
    if missing:
        LOG.warning(
            "%s: no answer for %d question id(s), not judged: %s", name, len(missing), ", ".join(missing)
        )
    if extra:
        LOG.warning("%s: %d id(s) not in the questions file, ignored: %s", name, len(extra), ", ".join(extra))


def join_inputs(
    questions: list[dict[str, Any]],
    contexts: list[dict[str, Any]],
    references: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    rules: Mapping[str, Rule],
    *,
    sources: Sequence[str] = ("questions", "context", "reference answers", "model answers"),
) -> list[JudgeItem]:
    """Join the four inputs on ``question_id`` (context on ``image``) and build one :class:`JudgeItem` each.

    Ids missing from or extra in an answer file are logged and left out; the result follows the questions'
    order. An unknown category or a question whose image has no context raises :class:`InputError`.
    """
    q_src, c_src, r_src, a_src = sources
    by_question = index_by(questions, "question_id", q_src)
    for record in questions:
        require_keys(record, ["question_id", "image", "text", "category"], q_src)
    valid = sorted(name[len(RULE_PREFIX) :] for name in rules if name.startswith(RULE_PREFIX))
    for record in questions:
        if RULE_PREFIX + str(record["category"]) not in rules:
            raise InputError(
                f"{q_src}: question {record['question_id']!r} has category {record['category']!r}, "
                f"which has no '{RULE_PREFIX}{record['category']}' rule; valid categories: {valid}"
            )
    by_image: dict[str, dict[str, Any]] = {}
    for record in contexts:
        require_keys(record, ["image", "caption"], c_src)
        by_image[str(record["image"])] = record
    no_context = sorted({str(r["image"]) for r in questions if str(r["image"]) not in by_image})
    if no_context:
        raise InputError(f"{c_src}: no caption for image(s) {no_context} used by the questions")

    by_reference = index_by(references, "question_id", r_src)
    by_answer = index_by(answers, "question_id", a_src)
    _report_id_mismatch(r_src, set(by_reference), set(by_question))
    _report_id_mismatch(a_src, set(by_answer), set(by_question))

    items = []
    for key, question in by_question.items():
        if key not in by_reference or key not in by_answer:
            continue
        reference, answer = by_reference[key], by_answer[key]
        require_keys(reference, ["text"], r_src)
        require_keys(answer, ["text"], a_src)
        rule = rules[RULE_PREFIX + str(question["category"])]
        content = build_content(
            caption_text(by_image[str(question["image"])]["caption"]),
            question["text"],
            reference["text"],
            answer["text"],
            rule,
        )
        items.append(
            JudgeItem(
                question_id=question["question_id"],
                category=str(question["category"]),
                content=content,
                answer_id=answer.get("answer_id"),
                model_id=answer.get("model_id"),
                reference_answer_id=reference.get("answer_id"),
                reference_model_id=reference.get("model_id"),
            )
        )
    return items


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------

# A plain decimal number; float() alone would also take "nan", "inf" and "1_0".
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_score(review: str | None) -> tuple[float, float] | None:
    """(reference score, model score) from the judge's reply, or None when it does not parse.

    As upstream: take the first line, turn commas into spaces, split into tokens. Unlike upstream, the line
    may hold words as well ("Score: 8 7" gives (8, 7)) and runs of spaces are fine ("8, 7"), but it must hold
    exactly two numeric tokens: "8", "" and "8 7 9" do not parse.
    """
    if not review:
        return None
    first_line = review.split("\n", 1)[0].replace(",", " ")
    numbers = [float(token) for token in first_line.split() if _NUMBER.fullmatch(token)]
    if len(numbers) != 2:
        return None
    return numbers[0], numbers[1]


# --------------------------------------------------------------------------------------------------------------
# Review lines: the one validator that judge.py (resuming) and summarize.py (reading) share
# --------------------------------------------------------------------------------------------------------------

# Every review line starts with this (``question_id`` is the first key judge_item writes); a last line without
# its newline that starts so is a write cut short by a crash.
REVIEW_LINE_START = b'{"question_id": '


def valid_scores(scores: Any) -> tuple[float, float] | None:
    """(reference, model) from a review's scores, or None unless they are exactly two finite numbers.

    Strict on purpose: booleans (``true`` is an int to Python), strings, NaN and infinities are not scores.
    """
    if not isinstance(scores, list | tuple) or len(scores) != 2:
        return None
    values = []
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, int | float):
            return None
        try:
            value = float(score)
        except OverflowError:  # an integer too large for a float
            return None
        if not math.isfinite(value):
            return None
        values.append(value)
    return values[0], values[1]


def is_review_line(record: Any) -> bool:
    """Whether ``record`` is a review line as :func:`judge_item` writes it: ``question_id``, a ``repeat`` that
    is an int ≥ 0, a string ``category`` and ``scores`` that are null (a failure) or :func:`valid_scores`."""
    if not isinstance(record, dict) or "question_id" not in record or "scores" not in record:
        return False
    repeat = record.get("repeat")
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 0:
        return False
    if not isinstance(record.get("category"), str):
        return False
    return record["scores"] is None or valid_scores(record["scores"]) is not None


def explain_foreign_line(record: Any) -> str:
    """Why ``record`` is not a review line, in words for the person whose ``--output`` it is."""
    if isinstance(record, dict) and "tuple" in record and "scores" not in record:
        return (
            "an upstream LLaVA review line (eval_gpt_review_bench.py's 'tuple' format), not one of judge.py's; "
            "summarize it with `python llava/summarize.py FILE`"
        )
    return "not a judge.py review line (needs question_id, an int repeat >= 0, a string category and scores)"


# --------------------------------------------------------------------------------------------------------------
# Talking to the judge
# --------------------------------------------------------------------------------------------------------------


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    usage = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = raw.get(key)
        usage[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return usage if any(value is not None for value in usage.values()) else None


def reply_from_body(body: str, transport_retries: int = 0) -> JudgeReply:
    """Check that ``body`` is a chat completion and pull out the reply; ValueError when it is not one."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError(f"body is JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("body has no 'choices'")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ValueError("first choice has no 'message'")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"message content is {type(content).__name__}, not a string")
    model = data.get("model")
    finish_reason = choices[0].get("finish_reason")
    return JudgeReply(
        # A null content (a refusal, a tool call) is a reply that does not parse, not a transport fault.
        content=content or "",
        model=model if isinstance(model, str) else None,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        usage=_usage(data.get("usage")),
        transport_retries=transport_retries,
    )


def _describe(error: BaseException) -> str:
    # Never str(error) on a connection error's request: keep to the type and the status/message.
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}"
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        return f"connection error ({type(cause).__name__ if cause else 'unknown'})"
    return f"{type(error).__name__}: {error}"


def request_judgement(
    client: openai.OpenAI, messages: list[dict[str, str]], *, model: str, max_tokens: int, label: str = ""
) -> JudgeReply:
    """One chat completion; transport faults are retried by the openai client (``client.max_retries``).

    Raises :class:`TransportError` when the client gives up or gets a status it does not retry (401/403/404
    marked fatal, since every other call would fail the same way), and :class:`MalformedReplyError` for a 200
    whose body is not a chat completion.
    """
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, temperature=TEMPERATURE, max_tokens=max_tokens
        )
    except openai.APIStatusError as error:
        status = error.status_code
        raise TransportError(f"{label}: {_describe(error)}", fatal=status in FATAL_STATUS) from None
    except openai.APIConnectionError as error:  # timeouts included
        raise TransportError(f"{label}: {_describe(error)}") from None
    try:
        return reply_from_body(raw.text, transport_retries=raw.retries_taken)
    except ValueError as error:
        raise MalformedReplyError(str(error), transport_retries=raw.retries_taken) from None


def _sum_usage(replies: Sequence[JudgeReply]) -> dict[str, int] | None:
    reported = [reply.usage for reply in replies if reply.usage is not None]
    if not reported:
        return None
    return {
        key: sum(usage[key] or 0 for usage in reported)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def judge_item(
    client: openai.OpenAI,
    item: JudgeItem,
    repeat: int,
    *,
    model: str,
    max_tokens: int,
    max_parse_retries: int,
) -> dict[str, Any]:
    """Judge one question once and return its review line; raises :class:`TransportError` if the server fails.

    A reply that does not parse, or a body that is not a chat completion, is asked for again (a fresh call) up to
    ``max_parse_retries`` times. If the last reply still has no scores, the line is a failure (``scores`` null,
    ``status`` "parse_failure") with every raw reply kept; if the last body was not a chat completion at all,
    no line is written (:class:`TransportError`) and a rerun asks again.
    """
    label = f"repeat {repeat} question {item.question_id}"
    started = utc_now()
    messages = build_messages(item.content)
    replies: list[JudgeReply] = []
    scores = None
    malformed = retries = 0
    last_malformed: str | None = None
    for attempt in range(1, max_parse_retries + 2):
        try:
            reply = request_judgement(client, messages, model=model, max_tokens=max_tokens, label=label)
        except MalformedReplyError as error:
            malformed += 1
            retries += error.transport_retries
            last_malformed = f"reply {attempt} is not a chat completion ({error})"
            LOG.warning("%s: %s", label, last_malformed)
            continue
        last_malformed = None
        replies.append(reply)
        retries += reply.transport_retries
        scores = parse_score(reply.content)
        if scores is not None:
            break
        LOG.warning(
            "%s: reply %d does not start with two scores: %r",
            label,
            attempt,
            reply.content.split("\n", 1)[0][:80],
        )
    if last_malformed is not None:
        raise TransportError(f"{label}: {last_malformed}, the last of {malformed + len(replies)} call(s)")
    return {
        "question_id": item.question_id,
        "repeat": repeat,
        "category": item.category,
        "scores": list(scores) if scores is not None else None,
        "status": "ok" if scores is not None else "parse_failure",
        "judge_model": model,
        "judge_model_reported": replies[-1].model,
        "review": replies[-1].content,
        "replies": [
            {"content": r.content, "model": r.model, "finish_reason": r.finish_reason, "usage": r.usage}
            for r in replies
        ],
        "attempts": len(replies) + malformed,
        "malformed_replies": malformed,
        "transport_retries": retries,
        "usage": _sum_usage(replies),
        "temperature": TEMPERATURE,
        "max_tokens": max_tokens,
        "started_at": started,
        "finished_at": utc_now(),
        "answer_id": item.answer_id,
        "model_id": item.model_id,
        "reference_answer_id": item.reference_answer_id,
        "reference_model_id": item.reference_model_id,
    }


# --------------------------------------------------------------------------------------------------------------
# The output file: append-only, one fsync'ed line per review, only ever our own lines
# --------------------------------------------------------------------------------------------------------------


def review_key(repeat: Any, question_id: Any) -> tuple[int, str]:
    """The resume key of a review: ids compare as strings so that 7 and "7" are the same question."""
    return int(repeat), str(question_id)


def recover_reviews(path: str | Path) -> dict[tuple[int, str], dict[str, Any]]:
    """The reviews already in ``path`` by :func:`review_key`, to be skipped on resume.

    A last line cut short by a crash is cut off (and redone); a second line for a (repeat, question_id) is
    ignored. A file with any other line that is not a review line raises
    :class:`~resumable_jsonl.ForeignFileError` and is left exactly as it was (bytes, mode, inode).
    """
    return resume_own_jsonl(
        path,
        is_valid=is_review_line,
        key_of=lambda r: review_key(r["repeat"], r["question_id"]),
        line_start=REVIEW_LINE_START,
        explain=explain_foreign_line,
        what="review",
    )


ReviewWriter = JsonlAppender


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def pending_work(
    items: Sequence[JudgeItem], repeats: int, done: Mapping[tuple[int, str], Any]
) -> list[tuple[int, JudgeItem]]:
    """(repeat, item) pairs still to judge, repeat by repeat in question order."""
    return [
        (repeat, item)
        for repeat in range(repeats)
        for item in items
        if review_key(repeat, item.question_id) not in done
    ]


def make_client(base_url: str | None, timeout: float, max_retries: int) -> openai.OpenAI:
    """An OpenAI client that retries transport faults ``max_retries`` times per call (honouring ``Retry-After``)
    and waits ``timeout`` seconds per HTTP call; the key comes from ``OPENAI_API_KEY`` only."""
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if base_url is None:
            raise InputError("OPENAI_API_KEY is not set (or pass --base-url for a server that needs no key)")
        api_key = PLACEHOLDER_KEY
    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)


def run_judge(
    client: openai.OpenAI,
    work: Sequence[tuple[int, JudgeItem]],
    writer: ReviewWriter,
    *,
    model: str,
    max_tokens: int,
    max_parse_retries: int,
    concurrency: int,
) -> RunTally:
    """Judge ``work`` with at most ``concurrency`` calls in flight, writing each review as it completes.

    A fatal status (bad key, unknown model) stops new calls; the work not done is counted as missing.
    """
    tally = RunTally()
    stop = threading.Event()

    def task(repeat: int, item: JudgeItem) -> None:
        if stop.is_set():
            raise SkippedError("not started: an earlier call failed fatally")
        try:
            record = judge_item(
                client, item, repeat, model=model, max_tokens=max_tokens, max_parse_retries=max_parse_retries
            )
        except TransportError as error:
            if error.fatal:
                stop.set()  # here, not in the main thread, so that this worker's next task already sees it
            raise
        writer.write(record)
        with tally.lock:
            tally.written += 1
            tally.parse_failures += record["scores"] is None

    with (
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge") as pool,
        tqdm(total=len(work), desc="judging", unit="review", dynamic_ncols=True) as bar,
    ):
        futures: dict[Future[None], tuple[int, JudgeItem]] = {
            pool.submit(task, repeat, item): (repeat, item) for repeat, item in work
        }
        remaining = set(futures)
        try:
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    _record_outcome(future, *futures[future], tally)
                    bar.update(1)
        except KeyboardInterrupt:
            # Lines already written are complete and durable; a rerun continues from them.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return tally


def _record_outcome(future: Future[None], repeat: int, item: JudgeItem, tally: RunTally) -> None:
    error = future.exception()
    if error is None:
        return
    tally.missing.append((repeat, item.question_id))
    if isinstance(error, SkippedError):
        return
    if not isinstance(error, TransportError):
        LOG.error("repeat %d question %s: %s", repeat, item.question_id, _describe(error))
    elif error.fatal:
        LOG.error("%s; stopping: every other call would fail the same way", error)
    else:
        LOG.error("%s; no review written, a rerun will redo it", error)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Judge LLaVA-Bench (in-the-wild) answers with a GPT judge, upstream LLaVA protocol.",
        epilog="The key is read from OPENAI_API_KEY only; OPENAI_BASE_URL is used when --base-url is not given.",
    )
    parser.add_argument(
        "-q", "--question", required=True, help="questions.jsonl (question_id, image, text, category)"
    )
    parser.add_argument("-c", "--context", required=True, help="context.jsonl (image, caption)")
    parser.add_argument(
        "-a",
        "--answer-list",
        nargs="+",  # as upstream's command line; exactly two are required (checked below)
        required=True,
        metavar="FILE",
        help="two files: the reference answers (Assistant 1, e.g. answers_gpt4.jsonl), then the model's answers "
        "(Assistant 2)",
    )
    parser.add_argument("-r", "--rule", default=str(Path(__file__).with_name("rule.json")), help="rule.json")
    parser.add_argument("-o", "--output", required=True, help="reviews JSONL; appended to and resumed")
    parser.add_argument(
        "--repeats", type=int, default=3, help="independent judgements per question (default 3)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"judge model (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight at once (default 4)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP call (default 120)")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=6,
        help="transport retries per call, done by the openai client: 408/409/429/5xx (after Retry-After when "
        "<= 120 s, else 0.5 s doubling to 8 s), timeouts, dropped connections (default 6)",
    )
    parser.add_argument(
        "--max-parse-retries",
        type=int,
        default=3,
        help="fresh calls after a reply without two scores or a body that is not a chat completion (default 3)",
    )
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="judge reply limit (1024)")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only, not every retry")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.answer_list) != 2:
        parser.error(
            f"--answer-list needs exactly two files, the reference answers (Assistant 1, e.g. answers_gpt4.jsonl) "
            f"then the model's answers (Assistant 2); got {len(args.answer_list)}: {' '.join(args.answer_list)}"
        )
    positive = {"--repeats": args.repeats, "--concurrency": args.concurrency, "--max-tokens": args.max_tokens}
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    for flag, value in {
        "--max-retries": args.max_retries,
        "--max-parse-retries": args.max_parse_retries,
    }.items():
        if value < 0:
            parser.error(f"{flag} must be 0 or more, got {value}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the judge; returns 0 when every (repeat, question) has a review line, 1 if some are missing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; the openai client logs each retry it makes at INFO.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("openai").setLevel(logging.WARNING if args.quiet else logging.INFO)

    # "~" is expanded as upstream does, for a path given in quotes.
    question, context, rule, output_name = (
        os.path.expanduser(p) for p in (args.question, args.context, args.rule, args.output)
    )
    reference_path, answer_path = (os.path.expanduser(p) for p in args.answer_list)
    output = Path(output_name)
    try:
        rules = load_rules(rule)
        items = join_inputs(
            read_jsonl(question),
            read_jsonl(context),
            read_jsonl(reference_path),
            read_jsonl(answer_path),
            rules,
            sources=(question, context, reference_path, answer_path),
        )
        if not items:
            raise InputError("no question has both a reference and a model answer; nothing to judge")
        client = make_client(args.base_url, args.timeout, args.max_retries)
        done = recover_reviews(output)
    except ForeignFileError as error:
        LOG.error(
            "%s. judge.py appends only to its own review files and has left this one as it was; "
            "choose another --output",
            error,
        )
        return EXIT_INPUT_ERROR
    except (InputError, OSError, json.JSONDecodeError) as error:
        LOG.error("%s", error)
        return EXIT_INPUT_ERROR

    output.parent.mkdir(parents=True, exist_ok=True)
    work = pending_work(items, args.repeats, done)
    LOG.info(
        "%d question(s) x %d repeat(s): %d already reviewed in %s, %d to judge with %s",
        len(items),
        args.repeats,
        len(items) * args.repeats - len(work),
        output,
        len(work),
        args.model,
    )
    with ReviewWriter(output) as writer, logging_redirect_tqdm():
        tally = run_judge(
            client,
            work,
            writer,
            model=args.model,
            max_tokens=args.max_tokens,
            max_parse_retries=args.max_parse_retries,
            concurrency=args.concurrency,
        )
    LOG.info("%d review(s) written, %d of them parse failures", tally.written, tally.parse_failures)
    if tally.missing:
        listed = ", ".join(
            f"r{repeat}/q{qid}" for repeat, qid in sorted(tally.missing, key=lambda m: review_key(*m))
        )
        LOG.error("%d review(s) missing, rerun the same command to finish: %s", len(tally.missing), listed)
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
