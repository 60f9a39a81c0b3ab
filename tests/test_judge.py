"""LLM judge client, score parsing and resumable JSONL log (pipeline/judge.py).

A local ThreadingHTTPServer on 127.0.0.1 plays the OpenAI-compatible endpoint; no other network.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import localhost_server

from pipeline.evaluation.judge import (
    DEFAULT_TEMPLATES_DIR,
    REASK_PROMPT,
    JudgeClient,
    JudgeConfig,
    JudgeItem,
    JudgeLog,
    JudgeRequestError,
    chat_completions_url,
    judge_all,
    load_templates,
    parse_score,
)


class FakeJudge:
    """Scripted chat-completions server state: `script` holds (status, text) answers in order."""

    def __init__(self):
        self.script: list[tuple[int, str]] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def next_answer(self, record: dict) -> tuple[int, str]:
        with self.lock:
            self.requests.append(record)
            return self.script.pop(0) if self.script else (200, "Looks right.\nScore: 50")


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        record = {"path": self.path, "headers": dict(self.headers), "body": body}
        status, text = self.server.fake.next_answer(record)
        if not self.path.endswith("/chat/completions"):
            status, text = 404, f"no route {self.path}"
        if status == 200:
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        else:
            payload = {"error": {"message": text}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        """Keep test output quiet."""


@pytest.fixture(scope="module")
def server():
    with localhost_server(_Handler) as server:
        yield server


@pytest.fixture
def fake(server, monkeypatch):
    """A fresh script and request record on the shared local server."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.fake = FakeJudge()
    server.fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return server.fake


def _client(url, **overrides):
    return JudgeClient(JudgeConfig(url=url, model="judge-model", backoff_s=0.01, timeout_s=5, **overrides))


def _score(client, key="k1", capability="perception"):
    return client.score(key, capability, "Is the light red?", "Yes, it is red.", "Yes.")


def test_good_reply(fake):
    fake.script = [(200, "1. Answer correctness: 50\nTotal Score: 85")]
    result = _score(_client(fake.url))
    assert (result.key, result.score, result.attempts, result.error) == ("k1", 85.0, 1, None)
    assert result.reply.endswith("Total Score: 85")
    (request,) = fake.requests
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    prompt = body["messages"][-1]["content"]
    assert "Is the light red?" in prompt and "Yes, it is red." in prompt and "PERCEPTION" in prompt
    assert "Authorization" not in request["headers"]


@pytest.mark.parametrize("status", [500, 502, 429])
def test_transient_status_is_retried(fake, status):
    fake.script = [(status, "busy"), (200, "Score: 70")]
    result = _score(_client(fake.url))
    assert (result.score, result.attempts, result.error) == (70.0, 2, None)
    assert len(fake.requests) == 2


def test_reply_without_score_is_reasked(fake):
    fake.script = [(200, "The answer is fine."), (200, "Score: 9/10")]
    result = _score(_client(fake.url))
    assert (result.score, result.attempts) == (90.0, 2)
    messages = fake.requests[1]["body"]["messages"]
    assert messages[-2] == {"role": "assistant", "content": "The answer is fine."}
    assert messages[-1] == {"role": "user", "content": REASK_PROMPT}


def test_client_error_raises_at_once_with_server_message(fake):
    fake.script = [(400, "model 'judge-model' does not exist")]
    with pytest.raises(JudgeRequestError, match=r"HTTP 400: .*model 'judge-model' does not exist"):
        _score(_client(fake.url))
    assert len(fake.requests) == 1


def test_retries_are_bounded_and_result_unscored(fake):
    fake.script = [(500, "down")] * 3
    result = _score(_client(fake.url, max_retries=2))
    assert (result.score, result.attempts, result.reply) == (None, 3, "")
    assert "HTTP 500" in result.error and "down" in result.error
    assert len(fake.requests) == 3


def test_never_scored_reply_is_unscored_not_guessed(fake):
    fake.script = [(200, "Good answer.")] * 2
    result = _score(_client(fake.url, max_retries=1))
    assert (result.score, result.attempts, result.reply) == (None, 2, "Good answer.")
    assert "Score: N" in result.error


def test_connection_error_is_retried_then_unscored(fake):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _score(_client(f"http://127.0.0.1:{port}/v1", max_retries=1))
    assert (result.score, result.attempts) == (None, 2)
    assert "failed" in result.error


def test_auth_header_from_env(fake, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-123")
    _score(_client(fake.url, api_key_env="JUDGE_TEST_KEY"))
    assert fake.requests[0]["headers"]["Authorization"] == "Bearer sk-test-123"


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/", "/v1/chat/completions"])
def test_url_forms_reach_the_endpoint(fake, suffix):
    base = fake.url.removesuffix("/v1")
    assert _score(_client(base + suffix)).score == 50.0
    assert fake.requests[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:8000", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1", "http://h:8000/v1/chat/completions"),
        ("https://api.example.com/api/paas/v4/", "https://api.example.com/api/paas/v4/chat/completions"),
        ("http://h/v1/chat/completions", "http://h/v1/chat/completions"),
    ],
)
def test_chat_completions_url(url, expected):
    assert chat_completions_url(url) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Score: 85", 85.0),
        ("Total Score: 85\n\nBrief summary: fine.", 85.0),
        ("score = 85/100", 85.0),
        ("**Score:** 7/10", 70.0),
        ("**Score: 7/10**", 70.0),
        ("Score is 8.5 out of 10.", 85.0),
        ("Score: 0", 0.0),
        ("Criterion score: 40\nScore: 60", 60.0),
        ("Score: 30\nOn reflection...\nScore: 45", 45.0),
        ("SCORE:100", 100.0),
        ("No verdict.", None),
        ("Score: N", None),
        ("The answer scored well.", None),
        ("Score: 150", None),
        ("Score: 5/0", None),
        ("", None),
    ],
)
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


def test_templates_render_braces_in_values_verbatim(fake):
    client = _client(fake.url)
    question = "Is {x} at <c1,CAM_FRONT,0.46,0.67>? {0} {} {{y}}"
    for capability in ("perception", "reasoning", "planning"):
        prompt = client.render(capability, question, "ref {a}", "pred {b}")
        assert question in prompt and "ref {a}" in prompt and "pred {b}" in prompt
        assert prompt.rstrip().endswith("Score: N")
    with pytest.raises(ValueError, match="capability 'driving' has no judge template"):
        client.render("driving", "q", "r", "p")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{question} {reference} {prediction} {extra}", r"unknown fields \['extra'\]"),
        ("{question} {prediction}", r"missing fields \['reference'\]"),
        ("{question} {reference} {prediction} {'a': 1}", r"unknown fields"),
        ("{question} {reference} {prediction:>10}", r"format specs"),
        ("{question} {reference} {prediction} }", r"literal braces"),
    ],
)
def test_bad_templates_are_rejected(tmp_path, text, message):
    for capability in ("perception", "reasoning", "planning"):
        (tmp_path / f"judge_{capability}.txt").write_text("{question} {reference} {prediction} {{ok}}")
    load_templates(tmp_path)
    (tmp_path / "judge_planning.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_templates(tmp_path)


def test_shipped_templates_load():
    templates = load_templates(DEFAULT_TEMPLATES_DIR)
    assert set(templates) == {"perception", "reasoning", "planning", "behavior"}
    assert all(text.rstrip().endswith("Total Score: N") and "0 to 100" in text for text in templates.values())


def test_category_template_wins_over_the_capability_one(fake, tmp_path):
    client = _client(fake.url)
    assert "BEHAVIOR (DriveBench)" in client.render("planning", "q", "r", "p", category="Behavior")
    assert "Capability under test: PLANNING" in client.render("planning", "q", "r", "p", category="planning")
    assert "Capability under test: REASONING" in client.render("reasoning", "q", "r", "p", category="prediction")
    fake.script = [(200, "1. Behaviour correctness: 50\n2. Evidence: 20\n3. Clarity: 10\nTotal Score: 80")]
    item = JudgeItem("b1", "planning", "What is the ego doing?", "Going straight.", "Straight.", category="behavior")
    (result,) = judge_all(client, [item], JudgeLog(tmp_path / "log.jsonl"), workers=1).values()
    assert result.score == 80.0 and "BEHAVIOR (DriveBench)" in fake.requests[0]["body"]["messages"][-1]["content"]


def test_config_reports_all_problems(tmp_path):
    with pytest.raises(ValueError) as error:
        JudgeConfig(url="host:8000", model=" ", max_retries=-1, timeout_s=0, templates_dir=tmp_path / "none")
    for problem in ("url must be", "model must", "max_retries", "timeout_s", "templates_dir"):
        assert problem in str(error.value)


def _items(n=3):
    return [JudgeItem(f"k{i}", "planning", f"Question {i}?", "Stop.", f"Answer {i}.") for i in range(n)]


def test_judge_all_resumes_from_log_without_requests(fake, tmp_path):
    fake.script = [(200, "Score: 10"), (200, "Score: 20"), (200, "Score: 30")]
    client, path = _client(fake.url), tmp_path / "judge" / "log.jsonl"
    first = judge_all(client, _items(), JudgeLog(path))
    assert [result.score for result in first.values()] == [10.0, 20.0, 30.0]
    assert len(path.read_text().splitlines()) == 3
    before = len(fake.requests)
    second = judge_all(client, _items(), JudgeLog(path))
    assert len(fake.requests) == before
    assert second == first


def test_unscored_entries_are_asked_again(fake, tmp_path):
    fake.script = [(200, "Score: 10"), (500, "down"), (500, "down")]
    client, path = _client(fake.url, max_retries=1), tmp_path / "log.jsonl"
    first = judge_all(client, _items(2), JudgeLog(path))
    assert first["k1"].score is None and "HTTP 500" in first["k1"].error
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    assert logged[1]["key"] == "k1" and logged[1]["score"] is None and logged[1]["version"] == 1
    fake.script = [(200, "Score: 80")]
    second = judge_all(client, _items(2), JudgeLog(path))
    assert (second["k0"].score, second["k1"].score) == (10.0, 80.0)
    assert len(fake.requests) == 4
    assert JudgeLog(path).scored(_items(2)[1]).score == 80.0


def test_log_refuses_scores_for_other_inputs(fake, tmp_path):
    path = tmp_path / "log.jsonl"
    judge_all(_client(fake.url), _items(1), JudgeLog(path))
    changed = [JudgeItem("k0", "planning", "Question 0?", "Stop.", "A different answer.")]
    with pytest.raises(ValueError, match="scored key 'k0' for different inputs"):
        judge_all(_client(fake.url), changed, JudgeLog(path))


def test_judge_all_concurrent_workers(fake, tmp_path):
    results = judge_all(_client(fake.url), _items(12), JudgeLog(tmp_path / "log.jsonl"), workers=4)
    assert list(results) == [f"k{i}" for i in range(12)]
    assert all(result.score == 50.0 for result in results.values())
    assert len(fake.requests) == 12
    assert len(JudgeLog(tmp_path / "log.jsonl")) == 12


def test_judge_all_raises_client_errors_and_rejects_repeated_keys(fake, tmp_path):
    fake.script = [(401, "invalid api key")]
    with pytest.raises(JudgeRequestError, match="invalid api key"):
        judge_all(_client(fake.url), _items(1), JudgeLog(tmp_path / "log.jsonl"))
    with pytest.raises(ValueError, match=r"repeated: \['k0'\]"):
        judge_all(_client(fake.url), _items(1) * 2, JudgeLog(tmp_path / "log.jsonl"))


def test_log_drops_an_unterminated_last_line(fake, tmp_path):
    path = tmp_path / "log.jsonl"
    judge_all(_client(fake.url), _items(1), JudgeLog(path))
    with open(path, "a") as handle:
        handle.write('{"version": 1, "key": "k1", "sco')
    log = JudgeLog(path)
    assert len(log) == 1
    assert path.read_text().endswith("\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"version": 2, "key": "k", "fingerprint": "f", "score": 1, "reply": "", "attempts": 1, "error": null}',
         "line 1 .*version 2"),
        ("not json", "line 1 is not a judge record"),
        ('{"version": 1, "key": "k"}', "line 1 is not a judge record"),
    ],
)
def test_log_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "log.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        JudgeLog(path)
