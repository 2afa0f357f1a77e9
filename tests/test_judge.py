"""Tests of llava/judge.py against a real chat-completions server on 127.0.0.1 (tests/judge_server.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "judge"
JUDGE_SCRIPT = ROOT / "llava" / "judge.py"


judge = load_script(JUDGE_SCRIPT, "llava_judge_under_test")
judge_server = load_script(ROOT / "tests" / "judge_server.py", "judge_server_under_test")
resumable_jsonl = load_script(ROOT / "llava" / "resumable_jsonl.py", "llava_resumable_jsonl_under_test")
summarize = load_script(ROOT / "llava" / "summarize.py", "llava_summarize_under_test")
JudgeServer = judge_server.JudgeServer

QUESTIONS = [json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines()]
TEXT = {q["question_id"]: q["text"] for q in QUESTIONS}
ID_OF = {q["text"]: q["question_id"] for q in QUESTIONS}
# The openai client retries transport faults; a scripted status with ":S" sends Retry-After: S, which it honours,
# so most faults here cost milliseconds. A bare one costs its default backoff (0.5 s, doubling).
FAST = ["--timeout", "0.5"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def judge_args(output: Path, base_url: str, *extra: str, answers: Path | None = None) -> list[str]:
    return [
        "--question",
        str(FIXTURES / "questions.jsonl"),
        "--context",
        str(FIXTURES / "context.jsonl"),
        "--answer-list",
        str(FIXTURES / "answers_gpt4.jsonl"),
        str(answers or FIXTURES / "answers_model.jsonl"),
        "--rule",
        str(ROOT / "llava" / "rule.json"),
        "--output",
        str(output),
        "--base-url",
        base_url,
        *extra,
    ]


def read_reviews(path: Path) -> list[dict]:
    data = path.read_text(encoding="utf-8")
    assert data == "" or data.endswith("\n")
    return [json.loads(line) for line in data.splitlines()]


def keys(reviews: list[dict]) -> list[tuple[int, int]]:
    return sorted((r["repeat"], r["question_id"]) for r in reviews)


def all_keys(repeats: int) -> list[tuple[int, int]]:
    return sorted((repeat, qid) for repeat in range(repeats) for qid in TEXT)


# ----------------------------------------------------------------------------------------------- prompt


@pytest.mark.parametrize(
    ("question_id", "fixture"), [(0, "conv_q0.txt"), (4, "detail_q4.txt"), (5, "complex_q5.txt")]
)
def test_prompt_is_byte_for_byte_the_spec(question_id: int, fixture: str) -> None:
    items = judge.join_inputs(
        judge.read_jsonl(FIXTURES / "questions.jsonl"),
        judge.read_jsonl(FIXTURES / "context.jsonl"),
        judge.read_jsonl(FIXTURES / "answers_gpt4.jsonl"),
        judge.read_jsonl(FIXTURES / "answers_model.jsonl"),
        judge.load_rules(ROOT / "llava" / "rule.json"),
    )
    item = next(i for i in items if i.question_id == question_id)
    expected = (FIXTURES / "expected_prompts" / fixture).read_bytes()
    assert item.content.encode("utf-8") == expected
    assert item.category == fixture.split("_")[0]


def test_request_sent_to_the_server(tmp_path: Path) -> None:
    with JudgeServer() as server:
        assert judge.main(judge_args(tmp_path / "r.jsonl", server.base_url, "--repeats", "1")) == 0
        requests = server.requests
    assert len(requests) == len(TEXT)
    by_id = {ID_OF[r.question]: r for r in requests}
    for question_id, fixture in [(0, "conv_q0.txt"), (4, "detail_q4.txt"), (5, "complex_q5.txt")]:
        body = by_id[question_id].body
        assert body["model"] == "gpt-4o-2024-08-06"
        assert body["temperature"] == 0.2
        assert body["max_tokens"] == 1024
        assert body["messages"] == [
            {
                "role": "system",
                "content": "You are a helpful and precise assistant for checking the quality of the answer.",
            },
            {
                "role": "user",
                "content": (FIXTURES / "expected_prompts" / fixture).read_text(encoding="utf-8"),
            },
        ]
    assert {r.authorization for r in requests} == {"Bearer EMPTY"}


def test_rule_file_has_the_three_bench_rules() -> None:
    rules = judge.load_rules(ROOT / "llava" / "rule.json")
    assert {"llava_bench_conv", "llava_bench_detail", "llava_bench_complex"} <= set(rules)
    for name in ("llava_bench_conv", "llava_bench_detail", "llava_bench_complex"):
        assert rules[name].role == "Assistant"
        assert rules[name].prompt.startswith(
            "We would like to request your feedback on the performance of two AI"
        )
        assert "represented with a few sentences describing the image. \nPlease rate" in rules[name].prompt


def test_caption_string_kept_list_joined() -> None:
    assert judge.caption_text("one line.\nsecond") == "one line.\nsecond"
    assert judge.caption_text(["a.", "b.", "c."]) == "a.\nb.\nc."


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("8 7", (8.0, 7.0)),
        ("8,7", (8.0, 7.0)),
        ("8, 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
        ("Score: 8 7", (8.0, 7.0)),
        ("8", None),
        ("", None),
        (None, None),
        ("8.5 7.5", (8.5, 7.5)),
        ("8 7 9", None),
        ("Assistant 1: 8, Assistant 2: 7", (8.0, 7.0)),  # "1:" is a word, not a number
        ("Assistant 1 8 Assistant 2 7", None),
        ("\n8 7", None),
        ("10 10\n1 2 3", (10.0, 10.0)),
        ("8\t7\r\nmore", (8.0, 7.0)),
        ("nan inf", None),
        ("8/10 7/10", None),
    ],
)
def test_parse_score(reply: str | None, expected: tuple[float, float] | None) -> None:
    assert judge.parse_score(reply) == expected


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([8, 7], (8.0, 7.0)),
        ((8.5, 7), (8.5, 7.0)),
        ([True, 7], None),  # a boolean is an int to Python; both judge.py and summarize.py refuse it
        ([8], None),
        (["8", "7"], None),
        ([float("nan"), 7], None),
        ([float("inf"), 7], None),
        ([10**400, 7], None),
        (None, None),
    ],
)
def test_valid_scores_is_strict(scores: object, expected: tuple[float, float] | None) -> None:
    assert judge.valid_scores(scores) == expected
    line = {"question_id": 0, "repeat": 0, "category": "conv", "scores": scores}
    assert judge.is_review_line(line) == (expected is not None or scores is None)


# ----------------------------------------------------------------------------------------------- faults


def test_faults_every_question_judged_exactly_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = {
        TEXT[0]: ["429:0.3", "429"],
        TEXT[1]: ["500", "502:0.01", "503:0.01"],
        TEXT[2]: ["hang"],
        TEXT[3]: ["garbage", "badshape"],
        TEXT[4]: ["drop", "drop"],
        TEXT[5]: ["nousage"],
    }
    replies = {TEXT[qid]: f"9, {qid + 3}\nExplanation for question {qid}." for qid in TEXT}
    output = tmp_path / "reviews.jsonl"
    caplog.set_level(logging.INFO)
    with JudgeServer(script=script, replies=replies) as server:
        rc = judge.main(judge_args(output, server.base_url, "--repeats", "2", "--concurrency", "3", *FAST))
        requests = server.requests
    assert rc == 0
    reviews = read_reviews(output)
    assert keys(reviews) == all_keys(2)
    for review in reviews:
        assert review["scores"] == [9.0, review["question_id"] + 3.0]
        assert review["status"] == "ok"
    faults = sum(len(actions) for actions in script.values()) - 1  # "nousage" is a good reply
    assert len(requests) == 12 + faults
    # the client retried the transport faults; the two 200s that were no chat completion were asked again by us
    assert sum(r["transport_retries"] for r in reviews) == faults - 2
    assert sum(r["malformed_replies"] for r in reviews if r["question_id"] == 3) == 2
    assert sum(r["attempts"] for r in reviews) == 12 + 2
    usage = sorted(r["usage"] is None for r in reviews if r["question_id"] == 5)
    assert usage == [False, True]  # the reply without usage is recorded as null, the other is kept
    assert "Retrying request in 0.300000 seconds" in caplog.text  # Retry-After: 0.3 honoured by the client


def test_unparseable_reply_retried_then_failure_line(tmp_path: Path) -> None:
    script = {
        TEXT[1]: ["reply:I cannot rate these.", "reply:8", "reply:Both good."],
        TEXT[2]: ["reply:Score?"],
    }
    output = tmp_path / "reviews.jsonl"
    with JudgeServer(script=script) as server:
        args = judge_args(
            output, server.base_url, "--repeats", "1", "--concurrency", "1", "--max-parse-retries", "2"
        )
        assert judge.main([*args, *FAST]) == 0
        first_run_requests = len(server.requests)
        assert judge.main([*args, *FAST]) == 0  # resume: failures count as done
        assert len(server.requests) == first_run_requests
    reviews = {r["question_id"]: r for r in read_reviews(output)}
    assert keys(list(reviews.values())) == all_keys(1)
    failed = reviews[1]
    assert failed["scores"] is None and failed["status"] == "parse_failure"
    assert failed["attempts"] == 3
    assert [r["content"] for r in failed["replies"]] == ["I cannot rate these.", "8", "Both good."]
    recovered = reviews[2]
    assert recovered["scores"] == [8.0, 7.0] and recovered["attempts"] == 2
    assert first_run_requests == len(TEXT) + 2 + 1


def test_exhausted_retries_write_nothing_and_exit_nonzero(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    with JudgeServer(script={TEXT[2]: ["500:0.01"] * 3}) as server:
        args = [*judge_args(output, server.base_url, "--repeats", "1", "--max-retries", "2"), *FAST]
        assert judge.main(args) == 1
        assert keys(read_reviews(output)) == [k for k in all_keys(1) if k != (0, 2)]
        before = len(server.requests)
        assert judge.main(args) == 0  # the server has recovered: only the missing one is asked for
        assert [ID_OF[r.question] for r in server.requests[before:]] == [2]
    assert keys(read_reviews(output)) == all_keys(1)


def test_retry_after_beyond_two_minutes_is_not_waited_for(tmp_path: Path) -> None:
    # The openai client honours Retry-After up to 120 s; a longer one (a quota spent for the day, say) ends that
    # call at once: no line, exit 1, and a rerun later asks again.
    output = tmp_path / "reviews.jsonl"
    with JudgeServer(script={TEXT[4]: ["429:600"]}) as server:
        args = [*judge_args(output, server.base_url, "--repeats", "1"), *FAST]
        assert judge.main(args) == 1
        assert [ID_OF[r.question] for r in server.requests].count(4) == 1
        assert (0, 4) not in keys(read_reviews(output))
        assert judge.main(args) == 0
    assert keys(read_reviews(output)) == all_keys(1)


def test_bodies_that_are_no_chat_completion_are_asked_again_then_no_line(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    script = {TEXT[1]: ["garbage", "reply:no scores", "badshape"], TEXT[2]: ["reply:still none", "garbage"]}
    with JudgeServer(script=script) as server:
        args = judge_args(output, server.base_url, "--repeats", "1", "--max-parse-retries", "2", *FAST)
        assert judge.main(args) == 1  # question 1 ended on a body that is no chat completion: nothing written
        reviews = {r["question_id"]: r for r in read_reviews(output)}
        assert 1 not in reviews
        # question 2: a real reply without scores, then garbage, then "8 7" (the default) within the 3 calls
        assert reviews[2]["scores"] == [8.0, 7.0]
        assert reviews[2]["attempts"] == 3 and reviews[2]["malformed_replies"] == 1
        assert [r["content"] for r in reviews[2]["replies"]][0] == "still none"
        assert judge.main(args) == 0  # the rerun asks question 1 again
    assert keys(read_reviews(output)) == all_keys(1)


def test_bad_key_stops_early(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    with JudgeServer(script={"*": ["401"]}) as server:
        rc = judge.main([*judge_args(output, server.base_url, "--concurrency", "1"), *FAST])
        assert len(server.requests) == 1
    assert rc == 1
    assert read_reviews(output) == []


# ----------------------------------------------------------------------------------------------- resume


def test_kill_mid_run_then_resume(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with JudgeServer(script={"*": ["slow:0.15"] * 100}) as server:
        args = judge_args(output, server.base_url, "--repeats", "2", "--concurrency", "1", *FAST)
        process = subprocess.Popen(
            [sys.executable, str(JUDGE_SCRIPT), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                if output.exists() and output.read_bytes().count(b"\n") >= 3:
                    break
                time.sleep(0.02)
            assert process.poll() is None, "judge finished before it could be killed"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        survived = read_reviews(output)
        assert 3 <= len(survived) < 12
        # What a kill during a write leaves behind: half a line.
        victim = next(k for k in all_keys(2) if k not in keys(survived))
        partial = json.dumps(
            {"question_id": victim[1], "repeat": victim[0], "category": "conv", "scores": [8, 7]}
        )
        with output.open("ab") as handle:
            handle.write(partial[:40].encode())
        server.state.script.clear()
        before = len(server.requests)
        assert judge.main(judge_args(output, server.base_url, "--repeats", "2", *FAST)) == 0
        redone = [ID_OF[r.question] for r in server.requests[before:]]
    final = read_reviews(output)
    assert keys(final) == all_keys(2)  # each (repeat, question_id) exactly once
    assert len(redone) == 12 - len(survived)  # nothing already done was asked again
    assert victim in keys(final)


def test_recover_cuts_only_a_crashed_tail_in_place(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    good = [{"question_id": q, "repeat": 0, "category": "conv", "scores": [8, 7]} for q in (0, 1)]
    duplicate = good[0] | {"scores": [1, 1]}
    lines = [json.dumps(good[0]), json.dumps(good[1]), json.dumps(duplicate)]
    output.write_text("\n".join(lines) + "\n" + '{"question_id": 2, "rep')
    output.chmod(0o640)
    before = output.stat()
    kept = judge.recover_reviews(output)
    assert set(kept) == {(0, "0"), (0, "1")}
    assert kept[(0, "0")]["scores"] == [8, 7]  # the first copy wins; the second stays in the file, ignored
    assert output.read_text() == "\n".join(lines) + "\n"  # only the half-written line is gone
    after = output.stat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


FOREIGN = {
    "upstream review file": (FIXTURES / "upstream_reviews.jsonl").read_text(),
    "text": "hello\nworld\n",
    "a bad line among ours": '{"question_id": 0, "repeat": 0, "category": "conv", "scores": [8, 7]}\n{not json\n',
    "boolean scores": '{"question_id": 0, "repeat": 0, "category": "conv", "scores": [true, 7]}\n',
    "a foreign unterminated last line": '{"question_id": 0, "repeat": 0, "category": "conv", "scores": null}\nhi',
    "one line, no newline": '{"id": 1, "question_id": 0, "tuple": [8.0, 7.0]}',
}


@pytest.mark.parametrize("content", FOREIGN.values(), ids=FOREIGN.keys())
def test_foreign_output_is_refused_and_left_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    output = tmp_path / "reviews.jsonl"
    output.write_text(content)
    output.chmod(0o644)
    before = output.stat()
    with JudgeServer() as server:
        assert judge.main([*judge_args(output, server.base_url, "--repeats", "1"), *FAST]) == 2
        assert server.requests == []
    after = output.stat()
    assert output.read_text() == content
    assert (after.st_mode, after.st_ino, after.st_mtime_ns) == (
        before.st_mode,
        before.st_ino,
        before.st_mtime_ns,
    )
    assert "has left this one as it was; choose another --output" in caplog.text
    if content.startswith('{"id": 1'):
        assert "upstream LLaVA review line" in caplog.text and "reviews.jsonl:1:" in caplog.text


def test_new_output_gets_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    old = os.umask(0o007)
    try:
        with JudgeServer() as server:
            assert judge.main([*judge_args(output, server.base_url, "--repeats", "1"), *FAST]) == 0
    finally:
        os.umask(old)
    assert output.stat().st_mode & 0o777 == 0o660  # 0666 minus the umask, not mkstemp's 0600


def test_shared_jsonl_repair_keeps_the_file_mode(tmp_path: Path) -> None:
    # answer.py's reader drops invalid lines and rewrites the file; the rewritten file keeps the old mode
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 0}\n{broken\n{"question_id": 1}\n')
    path.chmod(0o664)
    kept = resumable_jsonl.recover_jsonl(
        path, is_valid=lambda r: isinstance(r, dict), key_of=lambda r: r["question_id"], what="answer"
    )
    assert set(kept) == {0, 1}
    assert path.read_text() == '{"question_id": 0}\n{"question_id": 1}\n'
    assert path.stat().st_mode & 0o777 == 0o664


def test_recover_keeps_a_clean_file_untouched(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    output.write_text(
        json.dumps({"question_id": "a", "repeat": 1, "category": "conv", "scores": None}) + "\n"
    )
    stat = output.stat()
    assert set(judge.recover_reviews(output)) == {(1, "a")}
    assert output.stat().st_ino == stat.st_ino and output.stat().st_mtime_ns == stat.st_mtime_ns
    assert judge.recover_reviews(tmp_path / "absent.jsonl") == {}


# ----------------------------------------------------------------------------------------------- inputs


def test_missing_and_extra_ids_are_reported_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    answers = [json.loads(line) for line in (FIXTURES / "answers_model.jsonl").read_text().splitlines()]
    answers = [a for a in answers if a["question_id"] != 3]
    answers.append({"question_id": 99, "text": "stray", "answer_id": "x", "model_id": "m"})
    answer_file = tmp_path / "answers.jsonl"
    answer_file.write_text("".join(json.dumps(a) + "\n" for a in answers))
    output = tmp_path / "reviews.jsonl"
    with JudgeServer() as server:
        rc = judge.main([*judge_args(output, server.base_url, "--repeats", "1", answers=answer_file), *FAST])
    assert rc == 0
    assert keys(read_reviews(output)) == [(0, q) for q in sorted(TEXT) if q != 3]
    assert "no answer for 1 question id(s), not judged: 3" in caplog.text
    assert "1 id(s) not in the questions file, ignored: 99" in caplog.text


def test_unknown_category_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    questions = tmp_path / "questions.jsonl"
    lines = (
        (FIXTURES / "questions.jsonl")
        .read_text()
        .replace('"category": "detail"', '"category": "describe"', 1)
    )
    questions.write_text(lines)
    args = judge_args(tmp_path / "r.jsonl", "http://127.0.0.1:9/v1")
    args[1] = str(questions)
    assert judge.main(args) == 2
    assert "'describe'" in caplog.text and "['complex', 'conv', 'detail']" in caplog.text
    assert not (tmp_path / "r.jsonl").exists()


def test_no_key_and_no_base_url_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = judge_args(tmp_path / "r.jsonl", "unused")
    args = args[: args.index("--base-url")]
    assert judge.main(args) == 2
    assert "OPENAI_API_KEY is not set" in caplog.text


def test_key_from_env_only_and_never_written(tmp_path: Path) -> None:
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    output = tmp_path / "reviews.jsonl"
    with JudgeServer(
        script={"*": ["429:0.01", "500:0.01", "drop"], TEXT[0]: ["reply:no scores here"]}
    ) as server:
        args = judge_args(output, server.base_url, "--repeats", "1", *FAST)
        args = args[: args.index("--base-url")] + args[args.index("--base-url") + 2 :]
        env = {**os.environ, "OPENAI_API_KEY": secret, "OPENAI_BASE_URL": server.base_url}
        done = subprocess.run(
            [sys.executable, str(JUDGE_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120
        )
        authorizations = {r.authorization for r in server.requests}
    assert done.returncode == 0, done.stderr
    assert authorizations == {f"Bearer {secret}"}
    assert secret not in done.stdout + done.stderr
    assert secret not in output.read_text()
    assert (
        "--api-key"
        not in subprocess.run(
            [sys.executable, str(JUDGE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60
        ).stdout
    )


def test_review_line_records_what_was_asked(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    with JudgeServer() as server:
        args = judge_args(output, server.base_url, "--repeats", "1", "--model", "judge-x")
        assert judge.main(args) == 0
    review = next(r for r in read_reviews(output) if r["question_id"] == 4)
    assert review["category"] == "detail"
    assert review["judge_model"] == "judge-x"
    assert review["judge_model_reported"] == "gpt-4o-2024-08-06-test"
    assert review["review"].startswith("8 7\n") and review["scores"] == [8.0, 7.0]
    assert review["usage"] == {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    assert review["answer_id"] == "ans-4" and review["model_id"] == "llava-v1.5-7b-sharelora"
    assert review["reference_answer_id"] == "ref-4"
    assert review["started_at"].endswith("+00:00") and review["started_at"] <= review["finished_at"]


def test_answer_list_takes_two_files_as_upstream_and_says_so_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = judge_args(tmp_path / "r.jsonl", "http://127.0.0.1:9/v1")
    at = args.index("--answer-list")
    for answers in ([args[at + 1]], [args[at + 1], args[at + 2], args[at + 2]]):
        with pytest.raises(SystemExit) as stop:
            judge.main(args[: at + 1] + answers + args[at + 3 :])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "--answer-list needs exactly two files" in err and f"got {len(answers)}" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_paths_in_quotes_with_a_tilde_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(FIXTURES / "answers_model.jsonl", tmp_path / "answers.jsonl")
    with JudgeServer() as server:
        args = judge_args(Path("~/reviews.jsonl"), server.base_url, "--repeats", "1", *FAST)
        args[args.index("--answer-list") + 2] = "~/answers.jsonl"
        assert judge.main(args) == 0
    assert keys(read_reviews(tmp_path / "reviews.jsonl")) == all_keys(1)


def test_judge_reviews_export_to_upstream_format(tmp_path: Path) -> None:
    output = tmp_path / "reviews.jsonl"
    replies = {TEXT[qid]: f"{8 + qid % 2} {4 + qid}\nwhy" for qid in TEXT}
    with JudgeServer(script={TEXT[2]: ["reply:cannot"]}, replies=replies) as server:
        args = judge_args(output, server.base_url, "--repeats", "2", "--max-parse-retries", "0", *FAST)
        assert judge.main(args) == 0
    exported = tmp_path / "upstream"
    assert summarize.main([str(output), "--export-upstream", str(exported)]) == 0
    first = [json.loads(line) for line in (exported / "reviews_repeat0.jsonl").read_text().splitlines()]
    assert [line["question_id"] for line in first] == sorted(TEXT)
    line4 = first[4]
    assert (line4["answer1_id"], line4["answer2_id"]) == ("ref-4", "ans-4")  # reference first, as upstream
    assert line4["category"] == "llava_bench_detail" and line4["content"] == "8 8\nwhy"
    assert line4["tuple"] == [8.0, 8.0] and first[2]["tuple"] == [-1, -1]
    # our scoring of the export equals our scoring of the judge's file
    ours = summarize.summarize(summarize.group_runs([output]))
    back = summarize.summarize(summarize.group_runs(sorted(exported.glob("*.jsonl"))))
    assert {c: (e["relative"], e["n"], e["failures"]) for c, e in ours.items()} == {
        c: (e["relative"], e["n"], e["failures"]) for c, e in back.items()
    }
