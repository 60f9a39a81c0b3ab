"""Generate a synthetic driving QA set in the Drive-KD authors' format (METHOD.md section 1).

    python -m pipeline.demo_data --out data/demo --samples 240

Writes `DIR/images/<scene>/<CAM>.png` and `DIR/qa.json`, a JSON list of
`{"messages": [user, assistant], "images": [...], "question_type": capability}` records. Every record is
one multiple-choice question about one seeded scene (pipeline.scenes): the answer is derived from the
scene, so it can be checked against the drawn pixels and the driving rules. Capabilities, question
families, semantic answers and answer letters are balanced by least-used choice with seeded ties.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.data.scenes import (
    COLOURS,
    FRONT,
    MIN_IMAGE_SIZE,
    SURROUND,
    Scene,
    crossing_pedestrian,
    describe,
    lead_vehicle,
    plan_action,
    render,
    sample_scene,
    stop_causes,
    vehicles_in_lane,
)
from schemas.method import CAPABILITIES

LETTERS = "ABCD"
VIEW_CHOICES = ("1", "6", "mixed")
SIX_VIEW_SHARE = 0.25  # share of six-camera records under views="mixed"
NO_PLACEHOLDER_SHARE = 1 / 6  # records whose prompt has no <image> placeholder (all images go first)
MAX_IMAGE_SIZE = 2048
ASK_TRIES = 500
CAPTION_QUESTION = ("Describe CAM_FRONT: the traffic light, the sign, the vehicle ahead, the left and right lanes, "
                    "the pedestrians, and what the ego vehicle should do.")

# Option texts are short and each starts with its own word, so the option an answer names is easy to find.
LIGHT_OPTIONS = {"red": "Red", "yellow": "Yellow", "green": "Green", "none": "No traffic light"}
SIGN_OPTIONS = {"stop": "Stop sign", "speed_limit": "Speed limit sign", "none": "No sign", "yield": "Yield sign"}
CROSS_OPTIONS = {"crossing": "Crossing the road ahead", "sidewalk": "Staying on the sidewalk",
                 "none": "No pedestrian ahead"}
MOVING_OPTIONS = {"moving": "Moving", "stopped": "Stopped", "parked": "Parked on the sidewalk"}
ACTION_OPTIONS = {"stop": "Stop", "slow_down": "Slow down", "keep_going": "Keep going",
                  "change_left": "Left lane change", "change_right": "Right lane change"}
TARGET_LANE_OPTIONS = {"left": "Left lane", "ego": "Current lane", "right": "Right lane", "sidewalk": "Sidewalk"}
STOP_REASON_OPTIONS = {"red_light": "Red light", "stop_sign": "Stop sign", "pedestrian": "Pedestrian crossing",
                       "clear": "Nothing, the road is clear"}


@dataclass(frozen=True)
class Question:
    """A question before its options are lettered: the correct option and 2 or 3 wrong ones."""

    text: str
    correct: str
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """One question family: its answer classes, scene settings that make a class likely, the asker.

    ask(scene, rng, target) returns a Question whose answer class is `target`, or None when the scene
    has no such answer (the caller then samples another scene).
    """

    capability: str
    classes: tuple[str, ...]
    ask: Callable[[Scene, random.Random, str], Question | None]
    hint: Callable[[random.Random, str], dict]


@dataclass(frozen=True)
class Sample:
    """A generated record with the scene it was derived from and the name of its question family."""

    scene: Scene
    record: dict
    family: str


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _others(rng: random.Random, pool, correct, count: int = 3) -> tuple[str, ...]:
    """`count` random entries of `pool` other than `correct`."""
    return tuple(rng.sample([entry for entry in pool if entry != correct], count))


# ---------------------------------------------------------------- perception


def _ask_light(scene, rng, target):
    if (scene.light or "none") != target:
        return None
    distractors = tuple(option for state, option in LIGHT_OPTIONS.items() if state != target)
    return Question("What is the state of the traffic light in CAM_FRONT?", LIGHT_OPTIONS[target], distractors)


def _ask_sign(scene, rng, target):
    if (scene.sign or "none") != target:
        return None
    distractors = tuple(option for sign, option in SIGN_OPTIONS.items() if sign != target)
    return Question("Which traffic sign is visible beside the road in CAM_FRONT?", SIGN_OPTIONS[target], distractors)


def _ask_lead_colour(scene, rng, target):
    lead = lead_vehicle(scene)
    if lead is None or lead.colour != target:
        return None
    others = _others(rng, COLOURS, target)
    return Question("What colour is the vehicle ahead in the ego lane?", _cap(target), tuple(_cap(c) for c in others))


# ---------------------------------------------------------------- reasoning


def _ask_cross(scene, rng, target):
    pedestrians = [o for o in scene.in_camera(FRONT) if o.kind == "pedestrian"]
    found = "crossing" if crossing_pedestrian(scene) else ("sidewalk" if pedestrians else "none")
    if found != target:
        return None
    distractors = tuple(option for key, option in CROSS_OPTIONS.items() if key != target)
    return Question("Will a pedestrian cross the path of the ego vehicle?", CROSS_OPTIONS[target], distractors)


def _ask_moving(scene, rng, target):
    lead = lead_vehicle(scene)
    if lead is None or ("moving" if lead.moving else "stopped") != target:
        return None
    distractors = tuple(option for state, option in MOVING_OPTIONS.items() if state != target)
    return Question("Is the vehicle ahead in the ego lane moving?", MOVING_OPTIONS[target], distractors)


def _ask_lane_free(scene, rng, target):
    side, state = target.split("_")
    if ("busy" if vehicles_in_lane(scene, side) else "free") != state:
        return None
    options = {"free": "Free", "busy": f"Busy, a vehicle is in the {side} lane", "missing": f"Missing, no {side} lane"}
    return Question(f"Is the {side} lane free for the ego vehicle to move into?", options[state],
                    tuple(option for key, option in options.items() if key != state))


# ---------------------------------------------------------------- planning


def _ask_action(scene, rng, target):
    action, _ = plan_action(scene)
    if action != target:
        return None
    return Question("What should the ego vehicle do next?", ACTION_OPTIONS[target],
                    _others(rng, ACTION_OPTIONS.values(), ACTION_OPTIONS[target]))


def _ask_target_lane(scene, rng, target):
    action, _ = plan_action(scene)
    if {"change_left": "left", "change_right": "right"}.get(action, "ego") != target:
        return None
    distractors = tuple(option for lane, option in TARGET_LANE_OPTIONS.items() if lane != target)
    return Question("Which lane should the ego vehicle drive in over the next few seconds?",
                    TARGET_LANE_OPTIONS[target], distractors)


def _ask_stop_reason(scene, rng, target):
    causes = stop_causes(scene)
    if [cause for cause, _ in causes] != [target]:
        return None
    distractors = tuple(option for cause, option in STOP_REASON_OPTIONS.items() if cause != target)
    return Question("The ego vehicle should stop. What is the reason?", STOP_REASON_OPTIONS[target], distractors)


def _cross_hint(rng: random.Random, target: str) -> dict:
    return {"crossing": target == "crossing", "sidewalk": 0 if target == "none" else 2}


def _calm(rng: random.Random) -> dict:
    """Front settings with no reason to stop or slow down."""
    return {"light": rng.choice((None, "green")), "sign": rng.choice((None, "speed_limit")), "crossing": False}


def _stop_hint(rng: random.Random, cause: str) -> dict:
    """Front settings with exactly one reason to stop."""
    settings = {**_calm(rng), "light": rng.choice((None, "green", "yellow"))}
    return {**settings, **{"red_light": {"light": "red"}, "stop_sign": {"sign": "stop"},
                           "pedestrian": {"crossing": True}}[cause]}


def _action_hint(rng: random.Random, target: str) -> dict:
    if target == "stop":
        return _stop_hint(rng, rng.choice(("red_light", "stop_sign", "pedestrian")))
    calm = _calm(rng)
    if target == "slow_down":
        return rng.choice(({**calm, "light": "yellow"}, {**calm, "lead": "moving_close"},
                           {**calm, "lead": "stopped", "left_busy": True, "right_busy": True}))
    if target == "keep_going":
        return {**calm, "lead": rng.choice((None, "moving_far"))}
    if target == "change_left":
        return {**calm, "lead": "stopped", "left_busy": False}
    return {**calm, "lead": "stopped", "left_busy": True, "right_busy": False}


def _lead_hint(rng: random.Random, target: str) -> dict:
    return {"lead": rng.choice(("moving_close", "moving_far", "stopped"))}


FAMILIES = {
    "light": Family("perception", tuple(LIGHT_OPTIONS), _ask_light,
                    lambda rng, target: {"light": None if target == "none" else target}),
    "sign": Family("perception", ("stop", "speed_limit", "none"), _ask_sign,
                   lambda rng, target: {"sign": None if target == "none" else target}),
    "lead_colour": Family("perception", tuple(COLOURS), _ask_lead_colour, _lead_hint),
    "cross": Family("reasoning", tuple(CROSS_OPTIONS), _ask_cross, _cross_hint),
    "moving": Family("reasoning", ("moving", "stopped"), _ask_moving,
                     lambda rng, target: {"lead": rng.choice(("moving_close", "moving_far"))
                                          if target == "moving" else "stopped"}),
    "lane_free": Family("reasoning", ("left_free", "left_busy", "right_free", "right_busy"), _ask_lane_free,
                        lambda rng, target: {f"{target.split('_')[0]}_busy": target.endswith("busy")}),
    "action": Family("planning", tuple(ACTION_OPTIONS), _ask_action, _action_hint),
    "target_lane": Family("planning", ("left", "ego", "right"), _ask_target_lane,
                          lambda rng, target: _action_hint(rng, {"left": "change_left", "right": "change_right"}.get(
                              target, rng.choice(("stop", "slow_down", "keep_going"))))),
    "stop_reason": Family("planning", ("red_light", "stop_sign", "pedestrian"), _ask_stop_reason, _stop_hint),
}


# ---------------------------------------------------------------- records


class _Balancer:
    """Least-used choice per key; ties broken by the seeded rng."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts: dict[object, Counter] = defaultdict(Counter)

    def pick(self, key, choices):
        counts = self.counts[key]
        low = min(counts[choice] for choice in choices)
        choice = self.rng.choice([c for c in choices if counts[c] == low])
        counts[choice] += 1
        return choice


def build_samples(*, samples: int, seed: int = 0, views: str = "mixed") -> list[Sample]:
    """The records of a generation run with their scenes, without drawing anything."""
    _check_arguments(samples, seed, MIN_IMAGE_SIZE, views)
    rng = random.Random(seed)
    balancer = _Balancer(rng)
    return [_build_sample(rng, balancer, index, str(views)) for index in range(samples)]


def _build_sample(rng: random.Random, balancer: _Balancer, index: int, views: str) -> Sample:
    six = rng.random() < SIX_VIEW_SHARE if views == "mixed" else views == "6"
    cameras = SURROUND if six else (FRONT,)
    capability = balancer.pick("capability", CAPABILITIES)
    names = [name for name, family in FAMILIES.items() if family.capability == capability]
    name = balancer.pick((capability, len(cameras)), names)
    family = FAMILIES[name]
    target = balancer.pick(name, family.classes)
    for _ in range(ASK_TRIES):
        scene = sample_scene(rng, f"{index:06d}", cameras, **family.hint(rng, target))
        question = family.ask(scene, rng, target)
        if question is not None:
            return Sample(scene, _record(rng, balancer, capability, scene, question), name)
    raise RuntimeError(f"question family {name!r} found no scene with answer {target!r} in {ASK_TRIES} tries; "
                       "its hint does not make that answer reachable")


def _record(rng: random.Random, balancer: _Balancer, capability: str, scene: Scene, question: Question) -> dict:
    """The authors' record: placeholders (or none), lettered options, and the correct option's text as the answer.

    The evaluation reads an answer that repeats one option's text as that option (pipeline.evaluation.choices),
    so a model answers by naming what it sees; it need not also learn to look up the option's letter.
    """
    assert 2 <= len(question.distractors) <= len(LETTERS) - 1, question
    options = list(question.distractors)
    rng.shuffle(options)
    letter = balancer.pick(("letter", capability), LETTERS[:len(options) + 1])
    options.insert(LETTERS.index(letter), question.correct)
    prompt = question.text + "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(options))
    if rng.random() >= NO_PLACEHOLDER_SHARE:
        prompt = "<image>\n" * len(scene.cameras) + prompt
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": question.correct},
        ],
        "images": [image_path(scene.scene_id, camera) for camera in scene.cameras],
        "question_type": capability,
    }


def caption_samples(*, count: int, seed: int = 0) -> list[Sample]:
    """`count` open-ended scene-description records (capability perception, answer `scenes.describe`).

    Their scenes come from their own seeded stream, so adding captions never changes a seed's QA records.
    They are dense supervision for training the demo teacher from scratch: one record states every fact the
    question families ask about (the issue of a tiny VLM learning to locate small road users from
    one-word answers alone).
    """
    _check_int("captions", count, 0)
    rng = random.Random(f"captions/{seed}")
    samples = []
    for index in range(count):
        scene = sample_scene(rng, f"cap{index:06d}", (FRONT,))
        record = {"messages": [{"role": "user", "content": "<image>\n" + CAPTION_QUESTION},
                               {"role": "assistant", "content": describe(scene)}],
                  "images": [image_path(scene.scene_id, FRONT)], "question_type": "perception"}
        samples.append(Sample(scene, record, "caption"))
    return samples


def image_path(scene_id: str, camera: str) -> str:
    """Path of one camera image, relative to the output folder."""
    return f"images/{scene_id}/{camera}.png"


def _check_arguments(samples, seed, image_size, views) -> None:
    """Raises ValueError naming the first argument out of range."""
    _check_int("samples", samples, 1)
    _check_int("seed", seed, None)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    if str(views) not in VIEW_CHOICES:
        raise ValueError(f"views must be one of {VIEW_CHOICES} (1 front camera, 6 surround cameras or mostly 1 "
                         f"with about {SIX_VIEW_SHARE:.0%} six-camera records), got {views!r}")


def _check_int(name: str, value, minimum: int | None, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be in [{minimum}, {maximum or 'inf'}], got {value}")


# ---------------------------------------------------------------- public API and CLI


def generate(out_dir, *, samples: int, seed: int = 0, image_size: int = 112, views: str = "mixed",
             captions: int = 0) -> list[dict]:
    """Draws the scenes into `out_dir`/images and writes `out_dir`/qa.json last; returns the records.

    With `captions` > 0 that many scene-description records (caption_samples) are added and the whole list
    is shuffled with the seed, so that a shard holds both kinds.
    """
    _check_arguments(samples, seed, image_size, views)
    built = build_samples(samples=samples, seed=seed, views=views)
    if captions:
        built += caption_samples(count=captions, seed=seed)
        random.Random(seed).shuffle(built)
    out = Path(out_dir)
    for sample in tqdm(built, desc="drawing scenes", unit="scene"):
        for camera, relative in zip(sample.scene.cameras, sample.record["images"]):
            path = out / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            render(sample.scene, camera, image_size).save(path, format="PNG")
    records = [sample.record for sample in built]
    (out / "qa.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return records


def vocabulary_corpus(seed: int = 0, samples: int = 300) -> list[str]:
    """Question and answer texts (placeholders removed) of `samples` records, plus every fixed option text.

    Nothing is drawn or written. The fixed texts make sure every option, colour, kind and camera name
    the generator can produce is present even in a small corpus.
    """
    texts = []
    for sample in build_samples(samples=samples, seed=seed):
        user, assistant = sample.record["messages"]
        texts += [user["content"].replace("<image>\n", ""), assistant["content"]]
    fixed = [LIGHT_OPTIONS, SIGN_OPTIONS, CROSS_OPTIONS, MOVING_OPTIONS, ACTION_OPTIONS, TARGET_LANE_OPTIONS,
             STOP_REASON_OPTIONS]
    texts += [text for options in fixed for text in options.values()]
    return texts + [" ".join(_cap(c) for c in COLOURS), " ".join(SURROUND), " ".join(map(str, range(10)))]
