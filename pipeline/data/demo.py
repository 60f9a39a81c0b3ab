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
    KINDS,
    MIN_IMAGE_SIZE,
    SURROUND,
    VEHICLES,
    Scene,
    first_hazard,
    lead_vehicle,
    plan_action,
    render,
    sample_scene,
    stop_causes,
    vehicles_in_lane,
)

CAPABILITIES = ("perception", "reasoning", "planning")
LETTERS = "ABCD"
VIEW_CHOICES = ("1", "6", "mixed")
SIX_VIEW_SHARE = 0.25  # share of six-camera records under views="mixed"
NO_PLACEHOLDER_SHARE = 1 / 6  # records whose prompt has no <image> placeholder (all images go first)
MAX_IMAGE_SIZE = 2048
ASK_TRIES = 500

KIND_OPTIONS = {kind: f"A {kind}" for kind in KINDS}
LIGHT_OPTIONS = {"red": "Red", "yellow": "Yellow", "green": "Green", "none": "There is no traffic light"}
SIGN_OPTIONS = {"stop": "A stop sign", "speed_limit": "A speed limit sign", "none": "No traffic sign",
                "yield": "A yield sign"}
SIGN_FACTS = {"stop": "A red octagonal stop sign stands beside the road.",
              "speed_limit": "A round speed limit sign stands beside the road.",
              "none": "No sign stands beside the road."}
LANE_OPTIONS = {"left": "In the left lane", "ego": "In the ego lane", "right": "In the right lane",
                "sidewalk": "On the sidewalk"}
CROSS_OPTIONS = {"crosswalk": "Yes, it is walking across the road ahead",
                 "left_sidewalk": "No, it stays on the left sidewalk",
                 "right_sidewalk": "No, it stays on the right sidewalk"}
MOVING_OPTIONS = {"moving": "Yes, it is moving", "stopped": "No, it is stopped",
                  "parked": "No, it is parked on the sidewalk"}
NONE_CLEAR = "None, the ego lane is clear"
ACTION_OPTIONS = {"stop": "Stop", "slow_down": "Slow down", "keep_going": "Keep going at the current speed",
                  "change_left": "Change to the left lane", "change_right": "Change to the right lane"}
TARGET_LANE_OPTIONS = {"left": "Move to the left lane", "ego": "Stay in the current lane",
                       "right": "Move to the right lane", "sidewalk": "Drive onto the sidewalk"}
STOP_REASON_OPTIONS = {"red_light": "The traffic light is red", "stop_sign": "There is a stop sign ahead",
                       "pedestrian": "A pedestrian is crossing the road ahead", "clear": "The road ahead is clear"}


@dataclass(frozen=True)
class Question:
    """A question before its options are lettered: the correct option, up to 3 wrong ones, a reason."""

    text: str
    correct: str
    distractors: tuple[str, ...]
    explanation: str


def _no_hint(rng: random.Random, target: str) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """One question family: its answer classes, scene settings that make a class likely, the asker.

    ask(scene, rng, target) returns a Question whose answer class is `target`, or None when the scene
    has no such answer (the caller then samples another scene).
    """

    capability: str
    classes: tuple[str, ...]
    ask: Callable[[Scene, random.Random, str], Question | None]
    hint: Callable[[random.Random, str], dict] = _no_hint
    views: tuple[int, ...] = (1, 6)


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


def _ask_colour(scene, rng, target):
    candidates = [o for o in scene.objects if o.colour == target]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    text = rng.choice(("What colour is the road user at {ref}?", "Which colour does the object at {ref} have?"))
    fact = (f"The pedestrian {obj.ref} wears {target}." if obj.kind == "pedestrian"
            else f"The {obj.kind} {obj.ref} is {target}.")
    others = _others(rng, COLOURS, target)
    return Question(text.format(ref=obj.ref), _cap(target), tuple(_cap(c) for c in others), fact)


def _ask_kind(scene, rng, target):
    candidates = [o for o in scene.objects if o.kind == target]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    others = _others(rng, KINDS, target)
    return Question(f"What type of road user is at {obj.ref}?", KIND_OPTIONS[target],
                    tuple(KIND_OPTIONS[k] for k in others), f"It is {obj.describe()}.")


def _ask_count(scene, rng, target):
    camera = rng.choice(scene.cameras)
    vehicles = [o for o in scene.in_camera(camera) if o.kind in VEHICLES]
    if len(vehicles) != int(target):
        return None
    listed = [o.describe() for o in vehicles]
    fact = (f"{camera} shows {', '.join(listed[:-1])}{' and ' if len(listed) > 1 else ''}{listed[-1]}."
            if listed else f"{camera} shows no vehicles.")
    others = _others(rng, [str(n) for n in range(6)], target)
    return Question(f"How many vehicles are visible in {camera}?", target, others, fact)


def _ask_light(scene, rng, target):
    if (scene.light or "none") != target:
        return None
    fact = ("CAM_FRONT shows no traffic light." if target == "none"
            else f"The traffic light in CAM_FRONT shows {target}.")
    distractors = tuple(option for state, option in LIGHT_OPTIONS.items() if state != target)
    return Question("What is the state of the traffic light in CAM_FRONT?", LIGHT_OPTIONS[target], distractors, fact)


def _ask_sign(scene, rng, target):
    if (scene.sign or "none") != target:
        return None
    distractors = tuple(option for sign, option in SIGN_OPTIONS.items() if sign != target)
    return Question("Which traffic sign is visible beside the road in CAM_FRONT?", SIGN_OPTIONS[target],
                    distractors, SIGN_FACTS[target])


def _ask_lane(scene, rng, target):
    candidates = [o for o in scene.in_camera(FRONT) if o.lane.replace("left_", "").replace("right_", "") == target]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    distractors = tuple(option for lane, option in LANE_OPTIONS.items() if lane != target)
    fact = f"{_cap(obj.describe())} is {LANE_OPTIONS[target][0].lower()}{LANE_OPTIONS[target][1:]}."
    return Question(f"Where is the {obj.name} in CAM_FRONT?", LANE_OPTIONS[target], distractors, fact)


def _ask_camera(scene, rng, target):
    candidates = scene.in_camera(target)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return Question(f"Which camera shows the {obj.name}?", target, _others(rng, SURROUND, target),
                    f"{_cap(obj.describe())} is in {target}.")


# ---------------------------------------------------------------- reasoning


def _ask_cross(scene, rng, target):
    candidates = [o for o in scene.in_camera(FRONT) if o.kind == "pedestrian" and o.lane == target]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    fact = (f"The pedestrian {obj.ref} is on the crosswalk in front of the ego vehicle." if obj.crossing
            else f"The pedestrian {obj.ref} is on the {target.split('_')[0]} sidewalk, off the road.")
    distractors = tuple(option for lane, option in CROSS_OPTIONS.items() if lane != target)
    return Question(f"Will the pedestrian at {obj.ref} cross the path of the ego vehicle?", CROSS_OPTIONS[target],
                    distractors, fact)


def _ask_moving(scene, rng, target):
    lead = lead_vehicle(scene)
    if lead is None or ("moving" if lead.moving else "stopped") != target:
        return None
    fact = f"{_cap(lead.describe())} has its brake lights {'off' if lead.moving else 'on'}."
    distractors = tuple(option for state, option in MOVING_OPTIONS.items() if state != target)
    return Question(f"Is the {lead.name} ahead in the ego lane moving?", MOVING_OPTIONS[target], distractors, fact)


def _ask_first(scene, rng, target):
    hazard = first_hazard(scene)
    found = "none" if hazard is None else ("pedestrian" if hazard.crossing else "vehicle")
    if found != target:
        return None
    others = [_cap(o.describe()) for o in scene.in_camera(FRONT) if o is not hazard]
    if hazard is None:
        correct, distractors = NONE_CLEAR, rng.sample(others, min(3, len(others)))
        fact = "No pedestrian crosses and no vehicle is in the ego lane."
    else:
        correct, distractors = _cap(hazard.describe()), rng.sample(others, min(2, len(others))) + [NONE_CLEAR]
        fact = ("It is crossing the road in front of the ego vehicle." if hazard.crossing
                else "It is the nearest vehicle in the ego lane.")
    if len(distractors) < 2:
        return None
    return Question("Which road user should the ego vehicle pay attention to first?", correct,
                    tuple(distractors), fact)


def _ask_lane_free(scene, rng, target):
    side, state = target.split("_")
    busy = vehicles_in_lane(scene, side)
    if ("busy" if busy else "free") != state:
        return None
    options = {"free": f"Yes, the {side} lane is free", "busy": f"No, a vehicle is in the {side} lane",
               "missing": f"No, there is no {side} lane"}
    fact = (f"{_cap(busy[0].describe())} is in the {side} lane." if busy
            else f"No vehicle is in the {side} lane of CAM_FRONT.")
    return Question(f"Is the {side} lane free for the ego vehicle to move into?", options[state],
                    tuple(option for key, option in options.items() if key != state), fact)


# ---------------------------------------------------------------- planning


def _ask_action(scene, rng, target):
    action, reason = plan_action(scene)
    if action != target:
        return None
    text = rng.choice(("What should the ego vehicle do next?", "What is the safest action for the ego vehicle now?"))
    return Question(text, ACTION_OPTIONS[target], _others(rng, ACTION_OPTIONS.values(), ACTION_OPTIONS[target]),
                    reason)


def _ask_target_lane(scene, rng, target):
    action, reason = plan_action(scene)
    if {"change_left": "left", "change_right": "right"}.get(action, "ego") != target:
        return None
    distractors = tuple(option for lane, option in TARGET_LANE_OPTIONS.items() if lane != target)
    return Question("Which lane should the ego vehicle drive in over the next few seconds?",
                    TARGET_LANE_OPTIONS[target], distractors, reason)


def _ask_stop_reason(scene, rng, target):
    causes = stop_causes(scene)
    if [cause for cause, _ in causes] != [target]:
        return None
    distractors = tuple(option for cause, option in STOP_REASON_OPTIONS.items() if cause != target)
    return Question("The ego vehicle should stop. What is the reason?", STOP_REASON_OPTIONS[target],
                    distractors, causes[0][1])


def _first_hint(rng: random.Random, target: str) -> dict:
    if target == "pedestrian":
        return {"crossing": True}
    lead = rng.choice(("moving_close", "moving_far", "stopped")) if target == "vehicle" else None
    return {"crossing": False, "lead": lead, "sidewalk": 2}


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


FAMILIES = {
    "colour": Family("perception", tuple(COLOURS), _ask_colour),
    "kind": Family("perception", KINDS, _ask_kind),
    "count": Family("perception", ("0", "1", "2", "3"), _ask_count),
    "light": Family("perception", tuple(LIGHT_OPTIONS), _ask_light,
                    lambda rng, target: {"light": None if target == "none" else target}),
    "sign": Family("perception", ("stop", "speed_limit", "none"), _ask_sign,
                   lambda rng, target: {"sign": None if target == "none" else target}),
    "lane": Family("perception", tuple(LANE_OPTIONS), _ask_lane),
    "camera": Family("perception", SURROUND, _ask_camera, views=(6,)),
    "cross": Family("reasoning", tuple(CROSS_OPTIONS), _ask_cross,
                    lambda rng, target: {"crossing": True} if target == "crosswalk" else {"sidewalk": 2}),
    "moving": Family("reasoning", ("moving", "stopped"), _ask_moving,
                     lambda rng, target: {"lead": rng.choice(("moving_close", "moving_far"))
                                          if target == "moving" else "stopped"}),
    "first": Family("reasoning", ("pedestrian", "vehicle", "none"), _ask_first, _first_hint),
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
    names = [name for name, family in FAMILIES.items()
             if family.capability == capability and len(cameras) in family.views]
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
    """The authors' record: placeholders (or none), lettered options, answer that starts with the letter."""
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
            {"role": "assistant", "content": f"{letter}. {question.correct}. {question.explanation}"},
        ],
        "images": [image_path(scene.scene_id, camera) for camera in scene.cameras],
        "question_type": capability,
    }


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


def generate(out_dir, *, samples: int, seed: int = 0, image_size: int = 112, views: str = "mixed") -> list[dict]:
    """Draws the scenes into `out_dir`/images and writes `out_dir`/qa.json last; returns the records."""
    _check_arguments(samples, seed, image_size, views)
    built = build_samples(samples=samples, seed=seed, views=views)
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
    fixed = [KIND_OPTIONS, LIGHT_OPTIONS, SIGN_OPTIONS, SIGN_FACTS, LANE_OPTIONS, CROSS_OPTIONS, MOVING_OPTIONS,
             ACTION_OPTIONS, TARGET_LANE_OPTIONS, STOP_REASON_OPTIONS]
    texts += [text for options in fixed for text in options.values()]
    return texts + [NONE_CLEAR, " ".join(_cap(c) for c in COLOURS), " ".join(SURROUND), " ".join(map(str, range(10)))]
