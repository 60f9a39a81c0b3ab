"""Synthetic driving scenes for the demo QA set: a seeded scene model, its driving rules and a renderer.

A scene is a few road users seen by 1 (CAM_FRONT, BDD100K-like) or 6 (nuScenes surround) cameras, plus an
optional traffic light and road sign in CAM_FRONT. The road is three 3.5 m lanes (left, ego, right)
between two sidewalks, seen from the driver's seat in a simple perspective. Every object stores where
its body is drawn (normalised centre in its camera image), so questions derived from the scene can be
checked against the pixels: the pixel at (int(x * size), int(y * size)) always has the object's colour.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

FRONT = "CAM_FRONT"
SURROUND = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")
COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 70, 230),
    "green": (20, 170, 40),
    "yellow": (250, 220, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
VEHICLES = ("car", "truck", "bus", "motorcycle")
KINDS = VEHICLES + ("pedestrian",)
LIGHT_STATES = ("red", "yellow", "green")
SIGNS = ("stop", "speed_limit")
# Lane name -> lateral offset of its centre from the ego path in metres (left is negative).
LANES = {"left": -3.5, "ego": 0.0, "right": 3.5, "left_sidewalk": -6.8, "right_sidewalk": 6.8}
CLOSE_AHEAD = 15.0  # metres: a moving vehicle nearer than this in the ego lane makes ego slow down

# Camera model, in fractions of the (square) image.
HORIZON = 0.40  # image row of the horizon
NEAR = 6.0  # metres ahead at which the ground meets the bottom image edge
FOCAL = 0.5  # image widths per metre of lateral offset at 1 m distance
OBJECT_GAIN = 2.0  # road users are drawn larger than life so they stay visible in small images
MIN_BODY = 0.05  # smallest body side; covers >= 4 px from MIN_IMAGE_SIZE up
MIN_IMAGE_SIZE = 96
ROAD_EDGE = 5.25  # metres from the ego path to the road edge
SIDEWALK_EDGE = 9.0
# kind -> (width m, height m, body top, body bottom); body rows are fractions of the object's height.
SHAPES = {
    "car": (1.8, 1.5, 0.40, 0.85),
    "truck": (2.3, 2.8, 0.0, 0.85),
    "bus": (2.6, 3.4, 0.40, 0.88),
    "motorcycle": (1.0, 1.6, 0.35, 0.85),
    "pedestrian": (0.7, 1.8, 0.22, 0.65),
}
# Traffic light and sign are drawn large (about two vision-patch widths at 112 px) so that their state is salient.
LIGHT_BOX = (0.80, 0.02, 0.94, 0.38)
SIGN_CENTRE, SIGN_RADIUS = (0.12, 0.20), 0.09
RESERVED = {"light": (0.78, 0.0, 0.96, 0.40), "sign": (0.02, 0.10, 0.22, 0.30)}

# Random front-camera situation: each key draws uniformly from its tuple (repeats act as weights).
SPEC_CHOICES = {
    "light": (None, None, "red", "yellow", "green", "green"),
    "sign": (None, None, "stop", "speed_limit"),
    "lead": (None, "moving_close", "moving_far", "stopped"),
    "crossing": (False, False, False, True),
    "left_busy": (False, True),
    "right_busy": (False, True),
    "sidewalk": (0, 1, 2),
}
LEAD_DISTANCES = {"moving_close": (7.5, 13.0), "moving_far": (18.0, 28.0), "stopped": (8.0, 20.0)}
PLACE_TRIES = 30
SCENE_TRIES = 50

SKY, GRASS, SIDEWALK, ROAD, MARKING = (160, 205, 240), (95, 140, 80), (185, 180, 170), (95, 95, 95), (245, 245, 245)
WINDOW, TYRE, SKIN, JACKET, BRAKE = (50, 60, 75), (25, 25, 25), (240, 200, 160), (60, 60, 60), (255, 80, 0)
LAMP_ON = {"red": (255, 30, 30), "yellow": (255, 210, 0), "green": (30, 230, 60)}
LAMP_OFF, HOUSING, POLE = (55, 55, 55), (20, 20, 20), (110, 110, 110)


@dataclass(frozen=True)
class SceneObject:
    """One road user. x, y: normalised centre of its body in its camera image (4 decimals)."""

    oid: str
    kind: str
    colour: str
    camera: str
    lane: str  # a LANES key, or "crosswalk" for a pedestrian crossing the road
    distance: float  # metres from the camera
    moving: bool
    crossing: bool  # walking across the ego path
    x: float
    y: float
    box: tuple[float, float, float, float]  # full extent (x0, y0, x1, y1), normalised

    @property
    def ref(self) -> str:
        """Object reference in the authors' form `<id,camera,x,y>`."""
        return f"<{self.oid},{self.camera},{self.x:.4f},{self.y:.4f}>"

    def describe(self) -> str:
        """Short noun phrase with the reference, e.g. `the red car <c1,CAM_FRONT,0.5000,0.7000>`."""
        return f"the {self.name} {self.ref}"

    @property
    def name(self) -> str:
        """Colour and kind, e.g. `red car` or `pedestrian in red`; unique within a scene."""
        return f"pedestrian in {self.colour}" if self.kind == "pedestrian" else f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Everything the images and the QA are derived from."""

    scene_id: str
    cameras: tuple[str, ...]
    objects: tuple[SceneObject, ...]
    light: str | None  # state of the traffic light in CAM_FRONT, or None
    sign: str | None  # road sign in CAM_FRONT ("stop" or "speed_limit"), or None

    def in_camera(self, camera: str) -> list[SceneObject]:
        return [obj for obj in self.objects if obj.camera == camera]


# ---------------------------------------------------------------- driving rules of the toy world


def lead_vehicle(scene: Scene) -> SceneObject | None:
    """The nearest vehicle in the ego lane ahead (CAM_FRONT), or None."""
    ahead = [o for o in scene.in_camera(FRONT) if o.lane == "ego" and o.kind in VEHICLES]
    return min(ahead, key=lambda o: o.distance, default=None)


def vehicles_in_lane(scene: Scene, lane: str) -> list[SceneObject]:
    """Vehicles in `lane` of CAM_FRONT, nearest first."""
    found = [o for o in scene.in_camera(FRONT) if o.lane == lane and o.kind in VEHICLES]
    return sorted(found, key=lambda o: o.distance)


def crossing_pedestrian(scene: Scene) -> SceneObject | None:
    """The nearest pedestrian crossing the ego path in CAM_FRONT, or None."""
    crossing = [o for o in scene.in_camera(FRONT) if o.crossing]
    return min(crossing, key=lambda o: o.distance, default=None)


def first_hazard(scene: Scene) -> SceneObject | None:
    """What ego must watch first: a crossing pedestrian, else the lead vehicle, else None."""
    return crossing_pedestrian(scene) or lead_vehicle(scene)


def stop_causes(scene: Scene) -> list[tuple[str, str]]:
    """Reasons ego must stop, as (cause, sentence); cause is red_light, stop_sign or pedestrian."""
    causes = []
    if scene.light == "red":
        causes.append(("red_light", "The traffic light in CAM_FRONT shows red."))
    if scene.sign == "stop":
        causes.append(("stop_sign", "A stop sign stands beside the road in CAM_FRONT."))
    pedestrian = crossing_pedestrian(scene)
    if pedestrian is not None:
        causes.append(("pedestrian", f"The {pedestrian.name} {pedestrian.ref} is crossing the road ahead."))
    return causes


def plan_action(scene: Scene) -> tuple[str, str]:
    """The ego action and the sentence that justifies it.

    Rules in priority order: stop (red light, stop sign, crossing pedestrian); slow_down (yellow light);
    change_left / change_right (stopped vehicle ahead, that lane free, left preferred); slow_down
    (stopped vehicle ahead and both lanes busy, or moving vehicle within CLOSE_AHEAD m); keep_going.
    """
    causes = stop_causes(scene)
    if causes:
        return "stop", causes[0][1]
    if scene.light == "yellow":
        return "slow_down", "The traffic light in CAM_FRONT is yellow."
    lead = lead_vehicle(scene)
    if lead is not None and not lead.moving:
        for side in ("left", "right"):
            if not vehicles_in_lane(scene, side):
                return f"change_{side}", f"The {lead.name} {lead.ref} is stopped ahead and the {side} lane is free."
        return "slow_down", f"The {lead.name} {lead.ref} is stopped ahead and both adjacent lanes are busy."
    if lead is not None and lead.distance < CLOSE_AHEAD:
        return "slow_down", f"The {lead.name} {lead.ref} is close ahead in the ego lane."
    if scene.light == "green":
        return "keep_going", "The traffic light is green and the ego lane is clear."
    return "keep_going", "Nothing blocks the ego lane."


def describe(scene: Scene) -> str:
    """A CAM_FRONT description that states every fact the question families ask about, and the plan.

    Used as dense supervision for the demo teacher (``pipeline.demo_data --captions``): one record teaches
    where the light, the sign, the vehicle ahead, the side lanes and the pedestrians are, and what ego does.
    """
    lead = lead_vehicle(scene)
    crossing = crossing_pedestrian(scene)
    walking = sum(o.kind == "pedestrian" and not o.crossing for o in scene.in_camera(FRONT))
    parts = [f"Traffic light: {scene.light or 'none'}.", f"Sign: {(scene.sign or 'none').replace('_', ' ')}."]
    if lead is None:
        parts.append("Ahead: clear.")
    else:
        state = "moving" if lead.moving else "stopped"
        parts.append(f"Ahead: {lead.name}, {state}, {'close' if lead.distance < CLOSE_AHEAD else 'far'}.")
    for side in ("left", "right"):
        names = ", ".join(o.name for o in vehicles_in_lane(scene, side)) or "free"
        parts.append(f"{side.capitalize()} lane: {names}.")
    parts.append(f"Crossing: {crossing.name if crossing else 'none'}. Sidewalk: {walking} pedestrians.")
    parts.append(f"Plan: {plan_action(scene)[0].replace('_', ' ')}.")
    return " ".join(parts)


# ---------------------------------------------------------------- sampling


def sample_scene(rng: random.Random, scene_id: str, cameras: tuple[str, ...], **overrides) -> Scene:
    """A random scene; `overrides` fix keys of SPEC_CHOICES for CAM_FRONT (e.g. light="red", lead=None)."""
    unknown = sorted(set(overrides) - set(SPEC_CHOICES))
    if unknown:
        raise ValueError(f"unknown scene settings {unknown}; known: {sorted(SPEC_CHOICES)}")
    spec = {key: overrides[key] if key in overrides else rng.choice(opts) for key, opts in SPEC_CHOICES.items()}
    for _ in range(SCENE_TRIES):
        objects: list[SceneObject] = []
        if _populate_front(rng, objects, spec):
            for camera in cameras:
                if camera != FRONT:
                    _populate_other(rng, objects, camera)
            return Scene(scene_id, cameras, tuple(objects), spec["light"], spec["sign"])
    raise RuntimeError(f"could not lay out a scene for {spec} in {SCENE_TRIES} tries")


def _populate_front(rng: random.Random, objects: list[SceneObject], spec: dict) -> bool:
    """Places the CAM_FRONT road users of `spec`; False if a required one found no room."""
    if spec["crossing"] and not _place(rng, objects, FRONT, "pedestrian", "crosswalk", (8.0, 16.0), True):
        return False
    if spec["lead"] and not _place(rng, objects, FRONT, None, "ego", LEAD_DISTANCES[spec["lead"]],
                                   spec["lead"] != "stopped"):
        return False
    for side in ("left", "right"):
        if spec[f"{side}_busy"]:
            if not _place(rng, objects, FRONT, None, side, (8.0, 26.0), rng.random() < 0.5):
                return False
            if rng.random() < 0.5:
                _place(rng, objects, FRONT, None, side, (8.0, 26.0), rng.random() < 0.5)
    for _ in range(spec["sidewalk"]):
        lane = rng.choice(("left_sidewalk", "right_sidewalk"))
        _place(rng, objects, FRONT, "pedestrian", lane, (9.0, 22.0), rng.random() < 0.5)
    return True


def _populate_other(rng: random.Random, objects: list[SceneObject], camera: str) -> None:
    """0-3 road users in a surround camera other than CAM_FRONT; none crosses the ego path."""
    for _ in range(rng.randint(0, 3)):
        if rng.random() < 0.75:
            _place(rng, objects, camera, None, rng.choice(("left", "ego", "right")), (8.0, 26.0), rng.random() < 0.5)
        else:
            lane = rng.choice(("left_sidewalk", "right_sidewalk"))
            _place(rng, objects, camera, "pedestrian", lane, (9.0, 22.0), rng.random() < 0.5)


def _place(rng, objects, camera, kind, lane, distances, moving) -> bool:
    """Appends one road user (random vehicle kind if `kind` is None) where it overlaps nothing."""
    kind = kind or rng.choice(("car", "car", "truck", "bus", "motorcycle"))
    used = {(o.colour, o.kind) for o in objects}
    colours = [c for c in COLOURS if (c, kind) not in used]
    if not colours:
        return False
    colour = rng.choice(colours)
    crossing = lane == "crosswalk"
    taken = [o.box for o in objects if o.camera == camera]
    if camera == FRONT:
        taken += RESERVED.values()
    for _ in range(PLACE_TRIES):
        distance = round(rng.uniform(*distances), 1)
        lateral = round(rng.uniform(-4.5, 4.5), 2) if crossing else LANES[lane]
        x, y, box = _layout(kind, lateral, distance)
        if box[0] >= 0.0 and box[2] <= 1.0 and not any(_overlap(box, other) for other in taken):
            objects.append(SceneObject(f"c{len(objects) + 1}", kind, colour, camera, lane, distance,
                                       moving, crossing, x, y, box))
            return True
    return False


def _layout(kind: str, lateral: float, distance: float):
    """Body centre (x, y) and full box of a road user standing at (lateral, distance), normalised."""
    width, height, top, bottom = SHAPES[kind]
    scale = max(FOCAL * OBJECT_GAIN / distance, MIN_BODY / min(width, height * (bottom - top)))
    foot_x, foot_y = _project(lateral, distance)
    box = tuple(round(v, 4) for v in (foot_x - width * scale / 2, foot_y - height * scale,
                                      foot_x + width * scale / 2, foot_y))
    body_top = box[1] + (box[3] - box[1]) * top
    body_bottom = box[1] + (box[3] - box[1]) * bottom
    return round(foot_x, 4), round((body_top + body_bottom) / 2, 4), box


def _overlap(a, b, margin: float = 0.01) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _project(lateral: float, distance: float) -> tuple[float, float]:
    """Normalised image point of a ground point `lateral` m to the side and `distance` m ahead."""
    return 0.5 + lateral * FOCAL / distance, HORIZON + (1.0 - HORIZON) * NEAR / distance


# ---------------------------------------------------------------- drawing


def render(scene: Scene, camera: str, size: int) -> Image.Image:
    """The `size` x `size` RGB image of `camera` in `scene`."""
    if camera not in scene.cameras:
        raise ValueError(f"camera {camera!r} is not in scene {scene.scene_id} (cameras: {scene.cameras})")
    image = Image.new("RGB", (size, size), SKY)
    draw = ImageDraw.Draw(image)
    _draw_road(draw, size)
    objects = scene.in_camera(camera)
    for obj in objects:
        if obj.crossing:
            _draw_crosswalk(draw, obj.distance, size)
    if camera == FRONT:
        if scene.light is not None:
            _draw_light(draw, scene.light, size)
        if scene.sign is not None:
            _draw_sign(draw, scene.sign, size)
    for obj in sorted(objects, key=lambda o: -o.distance):
        _draw_object(draw, obj, size)
    return image


def _ground_quad(lat0: float, lat1: float, d0: float, d1: float, size: int) -> list[tuple[float, float]]:
    """Pixel corners of the ground patch lat0..lat1 m across, d0..d1 m ahead."""
    corners = ((lat0, d0), (lat1, d0), (lat1, d1), (lat0, d1))
    return [(px * size, py * size) for px, py in (_project(lat, d) for lat, d in corners)]


def _draw_road(draw: ImageDraw.ImageDraw, size: int) -> None:
    draw.rectangle((0, round(HORIZON * size), size, size), fill=GRASS)
    for sign in (-1, 1):
        draw.polygon(_ground_quad(sign * ROAD_EDGE, sign * SIDEWALK_EDGE, 3.0, 400.0, size), fill=SIDEWALK)
    draw.polygon(_ground_quad(-ROAD_EDGE, ROAD_EDGE, 3.0, 400.0, size), fill=ROAD)
    for edge in (-ROAD_EDGE + 0.1, ROAD_EDGE - 0.3):
        draw.polygon(_ground_quad(edge, edge + 0.2, 3.0, 400.0, size), fill=MARKING)
    for divider in (-1.75, 1.75):
        for start in range(3, 80, 6):
            draw.polygon(_ground_quad(divider - 0.1, divider + 0.1, start, start + 3, size), fill=MARKING)


def _draw_crosswalk(draw: ImageDraw.ImageDraw, distance: float, size: int) -> None:
    lateral = -ROAD_EDGE + 0.3
    while lateral < ROAD_EDGE - 0.6:
        draw.polygon(_ground_quad(lateral, lateral + 0.6, distance - 1.2, distance + 1.2, size), fill=MARKING)
        lateral += 1.2


def _draw_light(draw: ImageDraw.ImageDraw, state: str, size: int) -> None:
    x0, y0, x1, y1 = (v * size for v in LIGHT_BOX)
    centre_x, half_pole = (x0 + x1) / 2, max(1.0, 0.008 * size)
    draw.rectangle((centre_x - half_pole, y1, centre_x + half_pole, _project(0, 13.0)[1] * size), fill=POLE)
    draw.rectangle((x0, y0, x1, y1), fill=HOUSING)
    radius = (x1 - x0) * 0.36
    for index, lamp in enumerate(LIGHT_STATES):
        centre_y = y0 + (y1 - y0) * (index + 0.5) / 3
        colour = LAMP_ON[state] if lamp == state else LAMP_OFF
        draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=colour)


def _draw_sign(draw: ImageDraw.ImageDraw, sign: str, size: int) -> None:
    cx, cy, r = SIGN_CENTRE[0] * size, SIGN_CENTRE[1] * size, SIGN_RADIUS * size
    half_pole = max(1.0, 0.008 * size)
    draw.rectangle((cx - half_pole, cy, cx + half_pole, _project(0, 15.0)[1] * size), fill=POLE)
    if sign == "stop":
        for ring, colour in ((1.0, MARKING), (0.8, COLOURS["red"])):  # white rim, red face
            angles = (math.pi / 8 * (2 * k + 1) for k in range(8))
            draw.polygon([(cx + ring * r * math.cos(a), cy + ring * r * math.sin(a)) for a in angles], fill=colour)
        draw.rectangle((cx - 0.6 * r, cy - 0.15 * r, cx + 0.6 * r, cy + 0.15 * r), fill=MARKING)
    else:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS["red"])
        draw.ellipse((cx - 0.7 * r, cy - 0.7 * r, cx + 0.7 * r, cy + 0.7 * r), fill=MARKING)
        for offset in (-0.3 * r, 0.15 * r):  # two dark strokes stand for the digits
            draw.rectangle((cx + offset, cy - 0.35 * r, cx + offset + 0.15 * r, cy + 0.35 * r), fill=HOUSING)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    """Body in the object's colour; every other part lies outside the body's centre pixel."""
    _, _, top, bottom = SHAPES[obj.kind]
    x0, y0, x1, y1 = (round(v * size) for v in obj.box)
    x1, y1 = x1 - 1, y1 - 1  # inclusive pixel bounds from here on
    body_top = round((obj.box[1] + (obj.box[3] - obj.box[1]) * top) * size)
    body_bottom = round((obj.box[1] + (obj.box[3] - obj.box[1]) * bottom) * size) - 1
    body = (x0, body_top, x1, body_bottom)
    quarter, sixth = (x1 - x0 + 1) // 4, (x1 - x0 + 1) // 6
    if obj.kind == "pedestrian":
        _part(draw, (x0 + quarter, y0, x1 - quarter, body_top - 1), SKIN, ellipse=True)
        spread = (x1 - x0 + 1) // 3 if obj.moving else sixth
        middle = (x0 + x1) // 2
        for hip_x, foot_x in ((x0 + quarter, middle - spread), (x1 - quarter, middle + spread)):
            if body_bottom + 1 <= y1:
                draw.line((hip_x, body_bottom + 1, foot_x, y1), fill=JACKET, width=max(1, quarter // 2))
    elif obj.kind == "motorcycle":
        shoulder = y0 + (body_top - y0) // 2
        _part(draw, (x0 + quarter, y0, x1 - quarter, shoulder - 1), SKIN, ellipse=True)
        _part(draw, (x0 + quarter, shoulder, x1 - quarter, body_top - 1), JACKET)
        _part(draw, (x0 + quarter + 1, body_bottom + 1, x1 - quarter - 1, y1), TYRE)
    else:
        _draw_vehicle_frame(draw, obj.kind, (x0, y0, x1, y1), body, COLOURS[obj.colour])
    draw.rectangle(body, fill=COLOURS[obj.colour])
    if obj.kind in VEHICLES and not obj.moving:  # large brake lights: a stopped vehicle is easy to tell
        light_w = max(1, (x1 - x0 + 1) // 3)
        light_h = max(1, (body_bottom - body_top + 1) // 2)
        for left in (x0, x1 - light_w + 1):
            draw.rectangle((left, body_bottom - light_h + 1, left + light_w - 1, body_bottom), fill=BRAKE)


def _draw_vehicle_frame(draw: ImageDraw.ImageDraw, kind: str, box, body, colour) -> None:
    """Wheels below the body; a cabin (car) or a window band (bus) above it. Bounds are inclusive."""
    x0, y0, x1, y1 = box
    wheel_w = max(1, (x1 - x0 + 1) // 4)
    for left in (x0, x1 - wheel_w + 1):
        _part(draw, (left, body[3] + 1, left + wheel_w - 1, y1), TYRE)
    if kind == "car":
        inset = (x1 - x0 + 1) // 6
        _part(draw, (x0 + inset, y0, x1 - inset, body[1] - 1), colour)
        _part(draw, (x0 + inset + 1, y0 + 1, x1 - inset - 1, body[1] - 1), WINDOW)
    elif kind == "bus":
        band = (body[1] - y0) // 5
        _part(draw, (x0, y0, x1, body[1] - 1), colour)
        _part(draw, (x0 + 1, y0 + band, x1 - 1, body[1] - 1 - band // 2), WINDOW)


def _part(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour, ellipse: bool = False) -> None:
    """Fills an inclusive pixel box (ellipse or rectangle); parts too small to have pixels are skipped."""
    if box[2] >= box[0] and box[3] >= box[1]:
        (draw.ellipse if ellipse else draw.rectangle)(box, fill=colour)
