"""The embedded language-visual task: a small world of colored shapes on a 3 x 3 grid.

An image is nine visual tokens in row-major order, one per cell: ``<empty>`` or ``<color-shape>``
(4 colors x 3 shapes). The visual tokens live in the same vocabulary as the words, so one causal
LM both reads images (understanding) and writes them (generation):

    understanding  prompt  "<img> c1 .. c9 </img> what color is at top"
                   target  "red"
    generation     prompt  "draw red circle at top and blue square at center"
                   target  "<img> c1 .. c9 </img>"

Rewards are rule-based, in [0, 1]:
    understanding  1 if the completion is exactly the answer word and the model stopped, else 0.
    generation     GEN_ALIGNMENT_WEIGHT * alignment + (1 - GEN_ALIGNMENT_WEIGHT) * structure, where
                   alignment = fraction of the caption's constraints the image satisfies (each object's
                   color and shape at its cell, and the number of objects), and structure = mean of
                   (opens with <img>, closes with </img> and stops, nine visual tokens in the grid).

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
TASKS = ("understanding", "generation")
GEN_ALIGNMENT_WEIGHT = 0.7

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


def vocabulary() -> List[str]:
    """Every word the renderer can emit (the embedded tokenizer's vocabulary, specials excluded)."""
    words = set(VISUAL_TOKENS) | {IMG_OPEN, IMG_CLOSE} | set(COLORS) | set(SHAPES) | set(POSITIONS) | set(NUMBERS)
    for template in _QUESTION_TEMPLATES.values():
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update("draw at and".split())
    return sorted(words)


@dataclass(frozen=True)
class Example:
    """One prompt of the task. `target` is a correct completion (the warm-up's label)."""

    task: str                       # "understanding" or "generation"
    prompt: str
    target: str
    scene: Scene
    question: Tuple = ()            # understanding: (kind, argument...)
    caption_objects: Tuple = field(default=())  # generation: ((position, color, shape), ...)


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


def generation_reward(example: Example, completion: str, stopped: bool) -> Dict[str, float]:
    grid, opened, closed = parse_image(completion.split())
    visual = sum(1 for w in grid if w in _CELL_OF_TOKEN)
    # Every missing, extra or non-visual grid word costs 1/9 of the grid-shape score.
    misfit = abs(len(grid) - GRID_CELLS) + (len(grid) - visual)
    structure = (float(opened) + float(closed and stopped) + max(0.0, 1.0 - misfit / GRID_CELLS)) / 3.0

    cells = [_CELL_OF_TOKEN.get(w, "invalid") for w in grid[:GRID_CELLS]]
    cells += ["invalid"] * (GRID_CELLS - len(cells))
    satisfied = 0
    for position, color, shape in example.caption_objects:
        cell = cells[position]
        if isinstance(cell, tuple):
            satisfied += int(cell[0] == color) + int(cell[1] == shape)
    drawn = sum(1 for c in cells if isinstance(c, tuple))
    satisfied += int(drawn == len(example.caption_objects))
    alignment = satisfied / (2 * len(example.caption_objects) + 1)
    reward = GEN_ALIGNMENT_WEIGHT * alignment + (1.0 - GEN_ALIGNMENT_WEIGHT) * structure
    return {"reward": reward, "alignment": alignment, "structure": structure}


def reward(example: Example, completion: str, stopped: bool) -> Dict[str, float]:
    """Rule-based reward in [0, 1] of a decoded completion (text before the end-of-sequence token).

    stopped: whether the model emitted its end-of-sequence token within the token budget."""
    if example.task == "understanding":
        return understanding_reward(example, completion, stopped)
    return generation_reward(example, completion, stopped)


# ----------------------------------------------------------------------------------------------
# Splits and the data order
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """Train and held-out examples of both tasks; train_pool[task] and heldout[task] are lists."""

    train: Dict[str, List[Example]]
    heldout: Dict[str, List[Example]]


def build_task(seed: int, train_scenes: int, heldout_scenes: int) -> TaskData:
    """Disjoint train / held-out scenes drawn from one generator seeded by `seed`; one example of
    each task per scene (the held-out split is never trained on)."""
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
