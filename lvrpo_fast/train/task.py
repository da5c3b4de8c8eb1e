"""The embedded language-visual task: a small world of colored shapes on a 3 x 3 grid.

An image is nine visual tokens in row-major order, one per cell: ``<empty>`` or ``<color-shape>``
(4 colors x 3 shapes). The visual tokens live in the same vocabulary as the words, so one causal
LM both reads images (understanding) and writes them (generation):

    understanding  prompt  "<img> c1 .. c9 </img> what color is at top"
                   target  "red"
    generation     prompt  "draw red circle at top and blue square at center"
                   target  "<img> c1 .. c9 </img>"

A third task, selected with --tasks, writes text and images in one trajectory (interleaved
generation): a story of 2 or 3 scenes, each a caption followed by its image, built object by object
(scene k holds the first k objects of the prompt):

    interleaved    prompt  "story red circle at top then blue square at center"
                   target  "red circle at top <img> c1 .. c9 </img> blue square at center <img> c1 .. c9 </img>"

Rewards are rule-based, in [0, 1]:
    understanding  1 if the completion is exactly the answer word and the model stopped, else 0.
    generation     GEN_ALIGNMENT_WEIGHT * alignment + (1 - GEN_ALIGNMENT_WEIGHT) * structure, where
                   alignment = fraction of the caption's constraints the image satisfies (each object's
                   color and shape at its cell, and the number of objects), and structure = mean of
                   (opens with <img>, closes with </img> and stops, nine visual tokens in the grid).
    interleaved    the hybrid reward of LVRPO's interleaved generation, STORY_WEIGHTS of three parts:
                   textual relevance (each scene's caption names the prompt's object for that scene),
                   visual-text alignment (each scene's image shows what the captions so far say) and
                   structural fidelity (each scene well formed, and the story the right number of scenes
                   and then stopped). Each scene is also scored as it is written (a process reward, the
                   scene's own weighted parts), ending at its </img>: the steps of process supervision.

Scenes for training and the held-out split are drawn from one seeded generator and are disjoint:
the held-out scenes are used only for evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
NUMBERS = ("zero", "one", "two", "three")
GRID_CELLS = len(POSITIONS)
MAX_OBJECTS = 3
EMPTY = "<empty>"
IMG_OPEN, IMG_CLOSE = "<img>", "</img>"
QUESTION_KINDS = ("color", "shape", "count")
TASKS = ("understanding", "generation", "interleaved")  # every task of the world, in batch order
DEFAULT_TASKS = ("understanding", "generation")
GEN_ALIGNMENT_WEIGHT = 0.7
STORY, THEN = "story", "then"
STORY_SCENES = (2, 3)  # scenes (objects) per story
STORY_WEIGHTS = {"relevance": 0.3, "alignment": 0.5, "structure": 0.2}

# An object is (color index, shape index); a scene is a tuple of GRID_CELLS cells, None where empty.
Cell = Optional[Tuple[int, int]]
Scene = Tuple[Cell, ...]


def visual_token(cell: Cell) -> str:
    if cell is None:
        return EMPTY
    return f"<{COLORS[cell[0]]}-{SHAPES[cell[1]]}>"


VISUAL_TOKENS = tuple([EMPTY] + [visual_token((c, s)) for c in range(len(COLORS)) for s in range(len(SHAPES))])
_CELL_OF_TOKEN = {visual_token(None): None, **{visual_token((c, s)): (c, s) for c in range(len(COLORS))
                                                for s in range(len(SHAPES))}}

# The position a question asks about comes last, right where the answer starts: the word that
# selects the cell is then in the answering position's own input, and a small model needs one lookup.
_QUESTION_TEMPLATES = {
    "color": "what color is at {position}",
    "shape": "what shape is at {position}",
    "count": "how many shapes are there",
}


def render_image(scene: Scene) -> str:
    return " ".join([IMG_OPEN] + [visual_token(c) for c in scene] + [IMG_CLOSE])


def vocabulary(tasks: Sequence[str] = DEFAULT_TASKS) -> List[str]:
    """Every word the renderer can emit for `tasks` (the embedded tokenizer's vocabulary, specials
    excluded). The story's two words only when the interleaved task is among them, so that the
    default tasks keep their vocabulary (and with it the model's initialization)."""
    words = set(VISUAL_TOKENS) | {IMG_OPEN, IMG_CLOSE} | set(COLORS) | set(SHAPES) | set(POSITIONS) | set(NUMBERS)
    for template in _QUESTION_TEMPLATES.values():
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update("draw at and".split())
    if "interleaved" in tasks:
        words.update((STORY, THEN))
    return sorted(words)


@dataclass(frozen=True)
class Example:
    """One prompt of the task. `target` is a correct completion (the warm-up's label)."""

    task: str                       # "understanding", "generation" or "interleaved"
    prompt: str
    target: str
    scene: Scene
    question: Tuple = ()            # understanding: (kind, argument...)
    caption_objects: Tuple = field(default=())  # generation, interleaved: ((position, color, shape), ...) in order


def random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells: List[Cell] = [None] * GRID_CELLS
    for position in rng.choice(GRID_CELLS, size=n, replace=False):
        cells[int(position)] = (int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))))
    return tuple(cells)


def _objects(scene: Scene) -> List[Tuple[int, int, int]]:
    return [(p, c[0], c[1]) for p, c in enumerate(scene) if c is not None]


def understanding_example(scene: Scene, rng: np.random.Generator) -> Example:
    """A question about one scene: the color or the shape of the object at a position, or the
    number of objects."""
    objects = _objects(scene)
    kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    if kind == "count":
        question = (kind,)
        text = _QUESTION_TEMPLATES[kind]
        answer = NUMBERS[len(objects)]
    else:
        position, color, shape = objects[int(rng.integers(len(objects)))]
        question = (kind, position)
        text = _QUESTION_TEMPLATES[kind].format(position=POSITIONS[position])
        answer = COLORS[color] if kind == "color" else SHAPES[shape]
    prompt = f"{render_image(scene)} {text}"
    return Example("understanding", prompt, answer, scene, question=question)


def generation_example(scene: Scene, rng: np.random.Generator) -> Example:
    objects = _objects(scene)
    order = rng.permutation(len(objects))
    described = tuple(objects[int(i)] for i in order)
    phrases = [f"{COLORS[c]} {SHAPES[s]} at {POSITIONS[p]}" for p, c, s in described]
    prompt = f"draw {' and '.join(phrases)}"
    return Example("generation", prompt, render_image(scene), scene, caption_objects=described)


def caption_of(obj: Tuple[int, int, int]) -> str:
    position, color, shape = obj
    return f"{COLORS[color]} {SHAPES[shape]} at {POSITIONS[position]}"


def story_scene(rng: np.random.Generator) -> Scene:
    """A scene of 2 or 3 objects: one per scene of its story."""
    n = int(rng.integers(STORY_SCENES[0], STORY_SCENES[-1] + 1))
    cells: List[Cell] = [None] * GRID_CELLS
    for position in rng.choice(GRID_CELLS, size=n, replace=False):
        cells[int(position)] = (int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))))
    return tuple(cells)


def partial_scene(objects: Sequence[Tuple[int, int, int]]) -> Scene:
    cells: List[Cell] = [None] * GRID_CELLS
    for position, color, shape in objects:
        cells[position] = (color, shape)
    return tuple(cells)


def interleaved_example(scene: Scene, rng: np.random.Generator) -> Example:
    """A story drawn object by object: scene k is the caption of the k-th object, then the image of the
    first k objects."""
    objects = _objects(scene)
    order = rng.permutation(len(objects))
    described = tuple(objects[int(i)] for i in order)
    prompt = f"{STORY} " + f" {THEN} ".join(caption_of(o) for o in described)
    target = " ".join(f"{caption_of(o)} {render_image(partial_scene(described[:k + 1]))}"
                      for k, o in enumerate(described))
    return Example("interleaved", prompt, target, scene, caption_objects=described)


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
def understanding_reward(example: Example, completion: str, stopped: bool) -> Dict[str, float]:
    correct = float(stopped and completion.split() == [example.target])
    return {"reward": correct, "correct": correct}


def parse_image(words: Sequence[str]) -> Tuple[List[str], bool, bool]:
    """Words of a generated completion -> (grid words, opened with <img>, closed with </img> last)."""
    opened = len(words) > 0 and words[0] == IMG_OPEN
    body = list(words[1:] if opened else words)
    closed = IMG_CLOSE in body
    if closed:
        end = body.index(IMG_CLOSE)
        closed = end == len(body) - 1  # nothing may follow the image
        body = body[:end]
    return body, opened, closed


def grid_fit(grid: Sequence[str]) -> float:
    """The grid-shape score: every missing, extra or non-visual grid word costs 1/9."""
    visual = sum(1 for w in grid if w in _CELL_OF_TOKEN)
    misfit = abs(len(grid) - GRID_CELLS) + (len(grid) - visual)
    return max(0.0, 1.0 - misfit / GRID_CELLS)


def image_alignment(grid: Sequence[str], objects: Sequence[Optional[Tuple[int, int, int]]]) -> float:
    """Fraction of the constraints of `objects` ((position, color, shape), None for a caption that names
    no object) the grid satisfies: each object's color and shape at its cell, and the number of objects."""
    cells = [_CELL_OF_TOKEN.get(w, "invalid") for w in grid[:GRID_CELLS]]
    cells += ["invalid"] * (GRID_CELLS - len(cells))
    satisfied = 0
    for obj in objects:
        if obj is None:
            continue
        position, color, shape = obj
        cell = cells[position]
        if isinstance(cell, tuple):
            satisfied += int(cell[0] == color) + int(cell[1] == shape)
    drawn = sum(1 for c in cells if isinstance(c, tuple))
    satisfied += int(drawn == len(objects))
    return satisfied / (2 * len(objects) + 1)


def generation_reward(example: Example, completion: str, stopped: bool) -> Dict[str, float]:
    grid, opened, closed = parse_image(completion.split())
    structure = (float(opened) + float(closed and stopped) + grid_fit(grid)) / 3.0
    alignment = image_alignment(grid, example.caption_objects)
    reward = GEN_ALIGNMENT_WEIGHT * alignment + (1.0 - GEN_ALIGNMENT_WEIGHT) * structure
    return {"reward": reward, "alignment": alignment, "structure": structure}


_COLOR = {w: i for i, w in enumerate(COLORS)}
_SHAPE = {w: i for i, w in enumerate(SHAPES)}
_POSITION = {w: i for i, w in enumerate(POSITIONS)}


def parse_caption(words: Sequence[str]) -> Optional[Tuple[int, int, int]]:
    """["red", "circle", "at", "top"] -> (position, color, shape); anything else -> None."""
    if len(words) != 4 or words[2] != "at":
        return None
    color, shape, position = _COLOR.get(words[0]), _SHAPE.get(words[1]), _POSITION.get(words[3])
    if color is None or shape is None or position is None:
        return None
    return position, color, shape


def split_scenes(words: Sequence[str]) -> Tuple[List[Tuple[List[str], int]], List[str]]:
    """Words of a story -> ([(the scene's words up to and including its </img>, index of that </img>)],
    the words after the last </img>)."""
    scenes, start = [], 0
    for i, w in enumerate(words):
        if w == IMG_CLOSE:
            scenes.append((list(words[start:i + 1]), i))
            start = i + 1
    return scenes, list(words[start:])


def interleaved_reward(example: Example, completion: str, stopped: bool) -> Dict[str, object]:
    """The hybrid reward of a story and its process rewards (module docstring).

    Scene k (of the n the prompt asks for) scores relevance_k = the fraction of its caption's words that
    are the expected "color shape at position" of the k-th object, in place (extra words count against);
    alignment_k = image_alignment of its image with the objects its own captions 1..k name; structure_k =
    mean of (a well-formed one-object caption, <img> opens the image, grid_fit). Its step reward is
    sum over parts of STORY_WEIGHTS[part] * part_k, a scene past the n-th scores 0. The outcome parts are
    relevance and alignment averaged over the n expected scenes (a missing scene 0) and structure =
    (sum_k structure_k + ending) / (n + 1), ending = 1 for exactly n scenes followed by the end token;
    reward = sum of STORY_WEIGHTS[part] * part. "steps" lists (word index of the scene's </img>, its
    step reward) for every scene written, in order."""
    n = len(example.caption_objects)
    scenes, tail = split_scenes(completion.split())
    named: List[Optional[Tuple[int, int, int]]] = []
    totals = {"relevance": 0.0, "alignment": 0.0, "structure": 0.0}
    steps = []
    for k, (words, end) in enumerate(scenes):
        body = words[:-1]
        opened = IMG_OPEN in body
        if opened:
            caption, grid = body[:body.index(IMG_OPEN)], body[body.index(IMG_OPEN) + 1:]
        else:  # no <img>: the caption runs to the first visual token
            split = next((i for i, w in enumerate(body) if w in _CELL_OF_TOKEN), len(body))
            caption, grid = body[:split], body[split:]
        obj = parse_caption(caption)
        named.append(obj)
        if k >= n:
            steps.append((end, 0.0))
            continue
        expected = caption_of(example.caption_objects[k]).split()
        parts = {"relevance": sum(a == b for a, b in zip(caption, expected)) / max(len(expected), len(caption)),
                 "alignment": image_alignment(grid, named),
                 "structure": (float(obj is not None) + float(opened) + grid_fit(grid)) / 3.0}
        for key, value in parts.items():
            totals[key] += value
        steps.append((end, sum(STORY_WEIGHTS[key] * value for key, value in parts.items())))
    ending = float(len(scenes) == n and not tail and stopped)
    out: Dict[str, object] = {"relevance": totals["relevance"] / n, "alignment": totals["alignment"] / n,
                              "structure": (totals["structure"] + ending) / (n + 1)}
    out["reward"] = sum(STORY_WEIGHTS[key] * out[key] for key in STORY_WEIGHTS)
    out["steps"] = steps
    return out


def reward(example: Example, completion: str, stopped: bool) -> Dict[str, float]:
    """Rule-based reward in [0, 1] of a decoded completion (text before the end-of-sequence token).

    stopped: whether the model emitted its end-of-sequence token within the token budget."""
    if example.task == "understanding":
        return understanding_reward(example, completion, stopped)
    if example.task == "interleaved":
        return interleaved_reward(example, completion, stopped)
    return generation_reward(example, completion, stopped)


# ----------------------------------------------------------------------------------------------
# Splits and the data order
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """Train and held-out examples of each task; train[task] and heldout[task] are lists."""

    train: Dict[str, List[Example]]
    heldout: Dict[str, List[Example]]


def build_task(seed: int, train_scenes: int, heldout_scenes: int, tasks: Sequence[str] = DEFAULT_TASKS) -> TaskData:
    """Disjoint train / held-out scenes drawn from one generator seeded by `seed`; one example of
    each task per scene (the held-out split is never trained on). The interleaved task draws its own
    scenes (of 2 or 3 objects) from a second generator, so that selecting it leaves the others' draws
    as they were."""
    rng = np.random.default_rng([seed, 0x7A5C])
    seen = set()
    scenes: List[Scene] = []
    while len(scenes) < train_scenes + heldout_scenes:
        scene = random_scene(rng)
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    split = {"train": scenes[:train_scenes], "heldout": scenes[train_scenes:]}
    out = {}
    for name, part in split.items():
        out[name] = {"understanding": [understanding_example(s, rng) for s in part],
                     "generation": [generation_example(s, rng) for s in part]}
    if "interleaved" in tasks:
        story_rng = np.random.default_rng([seed, 0x7A5C, 1])
        seen, stories = set(), []
        while len(stories) < train_scenes + heldout_scenes:
            scene = story_scene(story_rng)
            if scene not in seen:
                seen.add(scene)
                stories.append(scene)
        out["train"]["interleaved"] = [interleaved_example(s, story_rng) for s in stories[:train_scenes]]
        out["heldout"]["interleaved"] = [interleaved_example(s, story_rng) for s in stories[train_scenes:]]
    for name in out:
        out[name] = {t: out[name][t] for t in TASKS if t in tasks}
    return TaskData(train=out["train"], heldout=out["heldout"])


class DataStream:
    """An endless, reproducible order over `size` items: epoch e is a permutation drawn from
    (seed, stream, e). Its whole state is (epoch, cursor), which the checkpoints store."""

    def __init__(self, size: int, seed: int, stream: int):
        if size < 1:
            raise ValueError(f"a data stream needs at least one item, got size={size}")
        self.size, self.seed, self.stream = size, seed, stream
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, self.epoch]).permutation(self.size)

    def take(self, n: int) -> List[int]:
        out = []
        while len(out) < n:
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            k = min(n - len(out), self.size - self.cursor)
            out.extend(int(i) for i in self._order[self.cursor:self.cursor + k])
            self.cursor += k
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpointed data stream has {state['size']} items, this run has {self.size}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()
