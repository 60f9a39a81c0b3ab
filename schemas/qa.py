"""Versioned QA record schema: the authors' released QA format in, normalised records out.

Accepted input (METHOD.md section 1), exactly:

- a JSON list of record objects, or a top-level object holding that list under one of
  ``data``/``items``/``samples``/``dataset``/``records``;
- each record has ``messages`` (``[{"role": "user", "content": "<image>...question"},
  {"role": "assistant", "content": "answer"}]``) or plain ``question``/``answer`` strings (``messages``
  wins when both are present), ``images`` (a list of one or more paths; a single string is accepted),
  and a capability label under ``question_type``, ``type`` or ``capability`` (first present wins).

Normalisation: the capability label is mapped to one of ``CAPABILITIES``; the question holds exactly one
``<image>`` placeholder per image (none in the source text: one ``<image>\\n`` per image is prepended);
question and answer text is otherwise kept verbatim (object references such as
``<c1,CAM_FRONT,0.4678,0.6772>`` included). The sample key is assigned later, from content, by ingest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from schemas.method import CAPABILITIES

QA_SCHEMA_VERSION = 1
IMAGE_PLACEHOLDER = "<image>"
WRAPPER_KEYS = ("data", "items", "samples", "dataset", "records")
LABEL_FIELDS = ("question_type", "type", "capability")
CAMERA_NAMES = ("CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_FRONT", "CAM_BACK")

_ALIASES = {
    **dict.fromkeys(("perception", "perceptual", "perceive", "per", "p"), "perception"),
    **dict.fromkeys(("reasoning", "reason", "logical_reasoning", "infer", "r"), "reasoning"),
    **dict.fromkeys(("planning", "plan", "pl", "d", "decision"), "planning"),
}
_SUBSTRINGS = (("percep", "perception"), ("reason", "reasoning"), ("plan", "planning"))
_LABEL_HELP = (
    "use one of perception/reasoning/planning or an alias (perceptual, perceive, per, p; reason, "
    "logical_reasoning, infer, r; plan, pl, d, decision), or choose a capability for unknown labels "
    "(`python -m pipeline.ingest --on-unknown-type planning`)"
)
_MESSAGES_HELP = (
    "give 'messages': [{'role': 'user', 'content': '<image>question'}, "
    "{'role': 'assistant', 'content': 'answer'}], or plain 'question' and 'answer' strings"
)


class RecordError(ValueError):
    """A problem with one QA record, naming the file, the record index, the field and the fix."""

    def __init__(self, source: str, index: int, field: str, problem: str, fix: str):
        self.source = source
        self.index = index
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{source} record {index}, field '{field}': {problem}. Fix: {fix}")


def _match_capability(label: str) -> str | None:
    text = label.strip().lower()
    if text in _ALIASES:
        return _ALIASES[text]
    return next((capability for part, capability in _SUBSTRINGS if part in text), None)


def _check_fallback(fallback: str | None) -> None:
    if fallback is not None and fallback not in CAPABILITIES:
        raise ValueError(
            f"fallback capability {fallback!r} is not one of {', '.join(CAPABILITIES)}. Fix: pass one of them."
        )


def normalise_capability(label: str, *, fallback: str | None = None) -> str:
    """Map a capability label (or alias) to one of CAPABILITIES; unknown labels give `fallback` or raise.

    Exact aliases are matched case-insensitively after stripping; otherwise the first of "percep",
    "reason", "plan" contained in the label decides.
    """
    _check_fallback(fallback)
    if not isinstance(label, str):
        raise ValueError(f"capability label must be a string, got {_type_name(label)} {label!r}. Fix: {_LABEL_HELP}.")
    capability = _match_capability(label) or fallback
    if capability is None:
        raise ValueError(f"unknown capability label {label!r}. Fix: {_LABEL_HELP}.")
    return capability


def camera_view(path: str) -> str | None:
    """The nuScenes camera named in `path` (the longest match, e.g. CAM_FRONT_LEFT over CAM_FRONT), or None."""
    upper = path.upper()
    matches = [name for name in CAMERA_NAMES if name in upper]
    return max(matches, key=len) if matches else None


@dataclass(frozen=True)
class ImageRef:
    """One camera image of a QA record."""

    view: str | None
    """nuScenes camera name derived from the source path (e.g. "CAM_FRONT_LEFT"), None if not derivable."""
    file: str
    """Member name of the image inside its shard sample (e.g. "img0.jpg"); empty before ingest."""
    source_path: str
    """The path exactly as written in the QA file."""

    @classmethod
    def from_path(cls, source_path: str) -> ImageRef:
        return cls(view=camera_view(source_path), file="", source_path=source_path)

    def to_json(self) -> dict[str, Any]:
        return {"view": self.view, "file": self.file, "source_path": self.source_path}


@dataclass(frozen=True)
class QARecord:
    """One normalised QA sample: images, question with one <image> placeholder per image, answer, label."""

    key: str
    """Content-derived sample key assigned by ingest; empty right after parsing."""
    capability: str
    """One of CAPABILITIES."""
    images: tuple[ImageRef, ...]
    """The images in the order of the source record (placeholder i stands for images[i])."""
    question: str
    """Question text holding exactly len(images) <image> placeholders."""
    answer: str
    """Answer text, verbatim."""
    source: str
    """Name of the QA file the record came from."""
    index: int
    """Position of the record in that file."""

    def __post_init__(self) -> None:
        fail = partial(RecordError, self.source, self.index)
        if self.capability not in CAPABILITIES:
            raise fail("capability", f"{self.capability!r} is not one of {CAPABILITIES}", _LABEL_HELP)
        if not self.images:
            raise fail("images", "no images", "every record needs at least one image")
        count = self.question.count(IMAGE_PLACEHOLDER)
        if count != len(self.images):
            raise fail(
                "question",
                f"holds {count} {IMAGE_PLACEHOLDER} placeholders for {len(self.images)} images",
                "use one placeholder per image",
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": QA_SCHEMA_VERSION,
            "key": self.key,
            "capability": self.capability,
            "images": [image.to_json() for image in self.images],
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "index": self.index,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QARecord:
        """Read a record written by to_json; refuses other schema versions and malformed objects."""
        if not isinstance(data, dict):
            raise ValueError(f"QA record JSON must be an object, got {_type_name(data)}. Fix: re-run ingest.")
        version = data.get("version")
        if version != QA_SCHEMA_VERSION:
            raise ValueError(
                f"QA record {data.get('key')!r} has schema version {version!r}; this code reads version "
                f"{QA_SCHEMA_VERSION}. Fix: re-run `python -m pipeline.ingest` with this version of the code."
            )
        try:
            images = tuple(ImageRef(**image) for image in data["images"])
            fields = {name: data[name] for name in ("key", "capability", "question", "answer", "source", "index")}
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"QA record {data.get('key')!r} is malformed ({type(err).__name__}: {err}). "
                "Fix: re-run `python -m pipeline.ingest` to rewrite the shards."
            ) from err
        return cls(images=images, **fields)


@dataclass
class ParsedRecords:
    """Outcome of parse_records: the good records and one error per bad record, both in input order."""

    records: list[QARecord]
    errors: list[RecordError]
    total: int
    """Number of records in the input."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def unwrap_records(obj: Any, *, source: str) -> list[Any]:
    """The record list of a loaded QA file: the top-level list, or the list under a wrapper key."""
    if isinstance(obj, list):
        return obj
    fix = f"give a JSON list of records, or an object holding that list under one of {', '.join(WRAPPER_KEYS)}"
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: top level must be a list or an object, got {_type_name(obj)}. Fix: {fix}.")
    found = [key for key in WRAPPER_KEYS if isinstance(obj.get(key), list)]
    if len(found) != 1:
        problem = "several record lists" if found else "no record list"
        raise ValueError(
            f"{source}: top-level object holds {problem} under {', '.join(WRAPPER_KEYS)} "
            f"(keys found: {', '.join(sorted(map(str, obj))[:10]) or 'none'}). Fix: {fix}."
        )
    return obj[found[0]]


def _message_texts(messages: Any, fail: Callable[..., RecordError]) -> tuple[str, str]:
    if not isinstance(messages, list) or len(messages) != 2:
        got = f"{len(messages)} messages" if isinstance(messages, list) else _type_name(messages)
        raise fail("messages", f"expected a list of 2 messages (user, assistant), got {got}", _MESSAGES_HELP)
    texts = []
    for i, role in enumerate(("user", "assistant")):
        message = messages[i]
        if not isinstance(message, dict):
            raise fail(f"messages[{i}]", f"expected an object, got {_type_name(message)}", _MESSAGES_HELP)
        if message.get("role") != role:
            raise fail(f"messages[{i}].role", f"expected {role!r}, got {message.get('role')!r}", _MESSAGES_HELP)
        content = message.get("content")
        if not isinstance(content, str):
            raise fail(
                f"messages[{i}].content",
                f"expected a string, got {_type_name(content)}",
                "write the message text as one plain string",
            )
        texts.append(content)
    return texts[0], texts[1]


def _question_answer(item: dict[str, Any], fail: Callable[..., RecordError]) -> tuple[str, str, str]:
    """(question, answer, name of the question field) of a record."""
    if "messages" in item:
        question, answer = _message_texts(item["messages"], fail)
        return question, answer, "messages[0].content"
    if "question" not in item:
        raise fail("messages", "missing, and there is no plain 'question' either", _MESSAGES_HELP)
    for name in ("question", "answer"):
        if not isinstance(item.get(name), str):
            got = "nothing" if name not in item else _type_name(item[name])
            raise fail(name, f"expected a string, got {got}", _MESSAGES_HELP)
    return item["question"], item["answer"], "question"


def _image_paths(item: dict[str, Any], fail: Callable[..., RecordError]) -> list[str]:
    fix = "list the record's image paths under 'images', e.g. [\".../samples/CAM_FRONT/x.jpg\"]"
    if "images" not in item:
        raise fail("images", "missing", fix)
    images = [item["images"]] if isinstance(item["images"], str) else item["images"]
    if not isinstance(images, list):
        raise fail("images", f"expected a list of image paths, got {_type_name(images)}", fix)
    if not images:
        raise fail("images", "empty list: a record needs at least one image", fix)
    for i, path in enumerate(images):
        if not isinstance(path, str) or not path.strip():
            raise fail(f"images[{i}]", f"expected a non-empty path string, got {path!r}", fix)
    return images


def _capability(item: dict[str, Any], fail: Callable[..., RecordError], fallback: str | None) -> str:
    present = [name for name in LABEL_FIELDS if name in item]
    if not present:
        raise fail("question_type", "missing (also looked for 'type' and 'capability')", _LABEL_HELP)
    label = item[present[0]]
    if not isinstance(label, str):
        raise fail(present[0], f"expected a string label, got {_type_name(label)}", _LABEL_HELP)
    capability = _match_capability(label) or fallback
    if capability is None:
        raise fail(present[0], f"unknown capability label {label!r}", _LABEL_HELP)
    return capability


def parse_record(item: Any, *, source: str, index: int, on_unknown_type: str | None = None) -> QARecord:
    """Validate and normalise one raw record; raises RecordError naming the first bad field."""
    _check_fallback(on_unknown_type)
    fail = partial(RecordError, source, index)
    if not isinstance(item, dict):
        raise fail("(record)", f"expected an object, got {_type_name(item)}", "each record must be a JSON object")
    paths = _image_paths(item, fail)
    question, answer, question_field = _question_answer(item, fail)
    count = question.count(IMAGE_PLACEHOLDER)
    if count == 0:
        question = f"{IMAGE_PLACEHOLDER}\n" * len(paths) + question
    elif count != len(paths):
        raise fail(
            question_field,
            f"holds {count} {IMAGE_PLACEHOLDER} placeholders but 'images' lists {len(paths)} paths",
            f"use one {IMAGE_PLACEHOLDER} per image, or none (then all images go before the question)",
        )
    return QARecord(
        key="",
        capability=_capability(item, fail, on_unknown_type),
        images=tuple(ImageRef.from_path(path) for path in paths),
        question=question,
        answer=answer,
        source=source,
        index=index,
    )


def parse_records(obj: Any, *, source: str, on_unknown_type: str | None = None) -> ParsedRecords:
    """Parse a loaded QA file, collecting every bad record instead of stopping at the first.

    `source` names the file in messages; `on_unknown_type` is the capability given to unknown labels
    (None: unknown labels are record errors). Raises ValueError only for a bad top-level structure.
    """
    _check_fallback(on_unknown_type)
    items = unwrap_records(obj, source=source)
    records: list[QARecord] = []
    errors: list[RecordError] = []
    for index, item in enumerate(items):
        try:
            records.append(parse_record(item, source=source, index=index, on_unknown_type=on_unknown_type))
        except RecordError as err:
            errors.append(err)
    return ParsedRecords(records=records, errors=errors, total=len(items))
