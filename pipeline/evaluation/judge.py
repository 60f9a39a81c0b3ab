"""LLM judge for open-ended answers, through any OpenAI-compatible chat-completions endpoint.

The judge sees the question, the reference answer and the model's answer, rendered into the rubric
template of the sample's source category when the folder has one (`templates/judge_{category}.txt`,
e.g. DriveBench's `judge_behavior.txt`), else of its capability (`templates/judge_{capability}.txt`),
and must end its reply with a line `Total Score: N` (0-100, read as DriveBench reads it: the first
such line; without one, the last `Score: N`). Templates are plain `str.format` strings with exactly the fields
`{question}`, `{reference}` and `{prediction}`; any other literal brace in a template must be
doubled (`{{` / `}}`). Braces inside the substituted values (questions, answers) need no escaping.

Transport errors (connection failures, timeouts, HTTP 429 and 5xx) are retried with exponential
backoff; a reply without a score is re-asked, showing the judge its reply. Both share the budget
of `max_retries`. Any other HTTP 4xx raises `JudgeRequestError` at once with the server's message.
A sample that never yields a score is recorded as unscored with the last error, never guessed.

`JudgeLog` is a JSONL file with one line per judged sample; `judge_all` skips samples the log has
already scored, so an interrupted run resumes without asking the judge again.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.method import CAPABILITIES

logger = logging.getLogger(__name__)

TEMPLATE_FIELDS = frozenset({"question", "reference", "prediction"})
"""The `str.format` fields every judge template must use, and the only ones it may use.
There is one template per capability of `schemas.qa.CAPABILITIES`: `judge_{capability}.txt`; any other
`judge_{category}.txt` serves the items of that source category (lower case)."""

DEFAULT_TEMPLATES_DIR = Path(__file__).parent / "templates"

SYSTEM_PROMPT = "You are a strict, fair evaluator who rates answers by their agreement with a correct reference answer."
REASK_PROMPT = (
    "Your reply did not end with a total score. Reply again, ending with a last line of exactly the form "
    "'Total Score: N' where N is the total from 0 to 100."
)
MAX_RETRY_AFTER_S = 60.0
"""Longest wait honoured from a server's Retry-After header."""

LOG_VERSION = 1

_SCORE = re.compile(
    r"\bscore\**\s*(?:[:=]|is)\s*\**\s*(\d+(?:\.\d+)?)\s*\**\s*(?:(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?",
    re.I,
)
_TOTAL_SCORE = re.compile(r"Total Score:\s*(\d{1,3})\b")
"""DriveBench's own reading of a judge reply (worldbench/DriveBench evaluate/request.py): the first match wins."""


@dataclass
class JudgeConfig:
    """Where the judge is and how patiently to ask it."""

    url: str
    """Endpoint: a base url (http://host:port, http://host:port/v1, https://api.example.com/v4) or
    the full .../chat/completions url. A bare host gets /v1/chat/completions, a url with a path
    gets /chat/completions appended."""
    model: str
    """Model name sent in each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key, sent as `Authorization: Bearer`; unset = no header."""
    max_retries: int = 4
    """Requests after the first for one sample (transport errors and unscored replies together)."""
    backoff_s: float = 1.0
    """Wait before the first transport retry; doubles after each."""
    timeout_s: float = 60.0
    """Socket timeout of one request."""
    temperature: float = 0.0
    templates_dir: Path = DEFAULT_TEMPLATES_DIR
    """Folder with judge_perception.txt, judge_reasoning.txt and judge_planning.txt."""

    def __post_init__(self) -> None:
        self.templates_dir = Path(self.templates_dir)
        problems = []
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(f"url must be an http(s) url like http://127.0.0.1:8000/v1, got {self.url!r}")
        if not self.model.strip():
            problems.append("model must name the judge model, got an empty string")
        if self.max_retries < 0:
            problems.append(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.backoff_s >= 0:
            problems.append(f"backoff_s must be >= 0, got {self.backoff_s}")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.temperature <= 2:
            problems.append(f"temperature must be in [0, 2], got {self.temperature}")
        if not self.templates_dir.is_dir():
            problems.append(f"templates_dir {self.templates_dir} is not a folder")
        if problems:
            raise ValueError("invalid JudgeConfig:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge."""

    key: str
    capability: str
    question: str
    reference: str
    prediction: str
    category: str = ""
    """The item's source category (e.g. DriveBench's "behavior"); its template is used when there is one."""

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the judged inputs, to catch a log reused for other answers."""
        content = json.dumps([self.capability, self.question, self.reference, self.prediction])
        return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class JudgeResult:
    """The judge's verdict on one sample."""

    key: str
    score: float | None
    """0-100, or None when no reply yielded a score."""
    reply: str
    """The judge's last reply ("" if no request succeeded)."""
    attempts: int
    """Requests made for this sample."""
    error: str | None
    """Why the sample is unscored; None when scored."""


class JudgeRequestError(RuntimeError):
    """The judge endpoint rejected a request in a way retrying cannot fix (HTTP 4xx other than 429)."""


class _TransientError(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_score(reply: str) -> float | None:
    """The judge's score as a percentage from its reply, or None when absent or out of range.

    A reply with a line ``Total Score: N`` is read as DriveBench reads it: the first such N (an integer;
    above 100 counts as no score). Otherwise: "Score: 85", "score = 85/100", "**Score:** 7/10" (-> 70.0)
    and "Score is 8.5 out of 10" (-> 85.0) are accepted and the last score in the reply wins. A score
    outside 0-100 (after scaling) counts as no score, so the judge is asked again.
    """
    total = _TOTAL_SCORE.search(reply)
    if total is not None:
        score = float(total.group(1))
        return score if score <= 100.0 else None
    matches = list(_SCORE.finditer(reply))
    if not matches:
        return None
    value, scale = matches[-1].groups()
    score = float(value)
    if scale is not None:
        if float(scale) <= 0:
            return None
        score = score / float(scale) * 100.0
    return score if 0.0 <= score <= 100.0 else None


def chat_completions_url(url: str) -> str:
    """The chat-completions url for a configured judge url (see `JudgeConfig.url`)."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if urllib.parse.urlsplit(url).path in ("", "/"):
        return url + "/v1/chat/completions"
    return url + "/chat/completions"


def load_templates(templates_dir: Path) -> dict[str, str]:
    """capability or category -> template text, each checked to use exactly the fields of `TEMPLATE_FIELDS`."""
    templates = {}
    for capability in CAPABILITIES:
        path = Path(templates_dir) / f"judge_{capability}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"judge template {path} is missing (one per capability: {CAPABILITIES})")
    for path in sorted(Path(templates_dir).glob("judge_*.txt")):
        text = path.read_text(encoding="utf-8")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"judge template {path}: {exc}; write literal braces as {{{{ and }}}}") from exc
        fields = {name for _, name, _, _ in parsed if name is not None}
        specs = [f"{{{name}:{spec}}}" for _, name, spec, conv in parsed if name is not None and (spec or conv)]
        unknown = sorted(fields - TEMPLATE_FIELDS)
        missing = sorted(TEMPLATE_FIELDS - fields)
        if unknown or missing or specs:
            raise ValueError(
                f"judge template {path}: unknown fields {unknown}, missing fields {missing}, "
                f"format specs {specs}; use exactly {{question}}, {{reference}}, {{prediction}} "
                "and write other literal braces as {{ and }}"
            )
        templates[path.stem.removeprefix("judge_")] = text
    return templates


class JudgeClient:
    """Scores answers with a chat model; thread-safe (one HTTP request per call, no shared state)."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.endpoint = chat_completions_url(config.url)
        self.templates = load_templates(config.templates_dir)

    def render(self, capability: str, question: str, reference: str, prediction: str, category: str = "") -> str:
        """The judge prompt for one sample: its category's template if there is one, else its capability's."""
        if capability not in CAPABILITIES:
            raise ValueError(f"capability {capability!r} has no judge template; expected one of {CAPABILITIES}")
        template = self.templates.get(category.lower(), self.templates[capability])
        return template.format(question=question, reference=reference, prediction=prediction)

    def score(self, key: str, capability: str, question: str, reference: str, prediction: str,
              category: str = "") -> JudgeResult:
        """Ask the judge until it gives a score or the retry budget is spent.

        Raises JudgeRequestError on an HTTP 4xx other than 429.
        """
        prompt = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.render(capability, question, reference, prediction, category)},
        ]
        messages, reply, error = prompt, "", ""
        attempts = self.config.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                reply = self._chat(messages)
            except _TransientError as exc:
                error = str(exc)
                if attempt < attempts:
                    delay = self.config.backoff_s * 2 ** (attempt - 1)
                    time.sleep(max(delay, exc.retry_after or 0.0))
                continue
            value = parse_score(reply)
            if value is not None:
                return JudgeResult(key=key, score=value, reply=reply, attempts=attempt, error=None)
            error = "the reply has no 'Total Score: N' line with N in 0-100"
            messages = [*prompt, {"role": "assistant", "content": reply}, {"role": "user", "content": REASK_PROMPT}]
        return JudgeResult(key=key, score=None, reply=reply, attempts=attempts, error=error)

    def _chat(self, messages: list[dict[str, str]]) -> str:
        """One chat-completions request; the reply text."""
        body = {"model": self.config.model, "messages": messages, "temperature": self.config.temperature}
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.config.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode("utf-8"), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            message = exc.read().decode("utf-8", "replace")[:2000]
            if exc.code == 429 or exc.code >= 500:
                raise _TransientError(f"HTTP {exc.code}: {message}", _retry_after(exc.headers)) from exc
            raise JudgeRequestError(f"judge {self.endpoint} answered HTTP {exc.code}: {message}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _TransientError(f"request to {self.endpoint} failed: {exc!r}") from exc
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _TransientError(f"unexpected response from {self.endpoint}: {raw[:500]!r}") from exc
        if not isinstance(content, str):
            raise _TransientError(f"response from {self.endpoint} has no text content: {raw[:500]!r}")
        return content


def _retry_after(headers: http.client.HTTPMessage | None) -> float | None:
    """Seconds from a numeric Retry-After header, capped at MAX_RETRY_AFTER_S."""
    try:
        seconds = float(headers.get("Retry-After"))  # type: ignore[arg-type, union-attr]
    except (AttributeError, TypeError, ValueError):
        return None
    return min(seconds, MAX_RETRY_AFTER_S) if math.isfinite(seconds) and seconds >= 0 else None


class JudgeLog:
    """Append-only JSONL record of judge results, one line per judged sample, latest line wins.

    Each line: {"version": 1, "key", "fingerprint", "score", "reply", "attempts", "error"}.
    An unterminated last line (a run killed mid-write) is cut off with a warning; any other bad
    line is an error naming its line number.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, JudgeResult]] = {}
        if self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning("judge log %s: dropping an unterminated last line (interrupted write)", self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
        for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                version = entry["version"]
                if version != LOG_VERSION:
                    raise ValueError(f"version {version!r}; this reader knows version {LOG_VERSION}")
                result = JudgeResult(**{name: entry[name] for name in ("key", "score", "reply", "attempts", "error")})
                self._entries[result.key] = (entry["fingerprint"], result)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"judge log {self.path} line {number} is not a judge record: {exc}") from exc

    def scored(self, item: JudgeItem) -> JudgeResult | None:
        """The logged scored result for `item`, or None if the log has no score for its key.

        Raises ValueError when the key was scored for different inputs (another model's answers
        written to the same log).
        """
        entry = self._entries.get(item.key)
        if entry is None or entry[1].score is None:
            return None
        fingerprint, result = entry
        if fingerprint != item.fingerprint:
            raise ValueError(
                f"judge log {self.path} scored key {item.key!r} for different inputs (fingerprint {fingerprint} "
                f"!= {item.fingerprint}); use a new log file for new predictions"
            )
        return result

    def append(self, result: JudgeResult, fingerprint: str) -> None:
        """Write one result as a line and flush it to the file."""
        line = json.dumps({"version": LOG_VERSION, "fingerprint": fingerprint, **asdict(result)}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
            self._entries[result.key] = (fingerprint, result)


def judge_all(
    client: JudgeClient, items: Iterable[JudgeItem], log: JudgeLog, *, workers: int = 1
) -> dict[str, JudgeResult]:
    """key -> result for every item, asking the judge only for items the log has not scored.

    `workers` requests run concurrently. Each new result is appended to the log as it arrives.
    The first JudgeRequestError cancels the requests not yet started and is raised.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    items = list(items)
    keys = [item.key for item in items]
    repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
    if repeated:
        raise ValueError(f"judge items must have unique keys; repeated: {repeated[:10]}")
    results: dict[str, JudgeResult] = {}
    todo = []
    for item in items:
        logged = log.scored(item)
        if logged is None:
            todo.append(item)
        else:
            results[item.key] = logged

    def judge_one(item: JudgeItem) -> JudgeResult:
        result = client.score(item.key, item.capability, item.question, item.reference, item.prediction,
                              item.category)
        log.append(result, item.fingerprint)
        if result.score is None:
            logger.warning("judge gave no score for %s after %d attempts: %s", item.key, result.attempts, result.error)
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(judge_one, item) for item in todo]
        try:
            for future in as_completed(futures):
                result = future.result()
                results[result.key] = result
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return {key: results[key] for key in keys}
