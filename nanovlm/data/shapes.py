"""`shapes`: the built-in offline VQA dataset of coloured shapes on a plain background.

Every sample is a pure function of (seed, split, index): a scene of 1..max_objects solid shapes
(one per cell of a 3x3 grid, each (colour, shape) pair at most once) and one question about it
with a short exact answer. Splits never share an image: a scene belongs to the split its content
hash falls in (`SPLIT_BUCKETS`), and a generator for one split redraws until it gets one of its
own. Answers are drawn uniformly per question type, so guessing the majority answer scores about
1 / (number of answers); `chance_per_type` measures it.

The `choice` question type (named explicitly; not part of "all") asks one of the other questions
as multiple choice in MMStar's format: the options in the question ("Options: A: red, B: blue,
..."), a letter as the answer, and the asked attribute as its category; the training row appends
lmms-eval's MMStar post-prompt, so a model trained on it answers `nanovlm eval --task mmstar`.

Rows follow the nanoVLM schema: `images` [PIL], `texts` [{user, assistant}], plus
`question_type` and `answer`. `ShapesRows` generates them lazily (for training);
`shapes_dataset` materialises a split as a Hugging Face `datasets.Dataset`.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

from PIL import Image, ImageDraw

DATA_VERSION = "1"  # bump when scenes, questions or drawing change: invalidates caches

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 30), "purple": (140, 60, 190), "orange": (245, 140, 20),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "middle", "right",
             "bottom left", "bottom", "bottom right")  # 3x3 grid, row-major
QUESTION_TYPES = ("colour", "shape", "position", "size", "count", "exists", "caption")
MAX_OBJECTS = len(POSITIONS)
# Multiple choice: asked only when named ("all" keeps the open questions, and with them the data
# and the shapes-bpe tokenizers as they were). Its options are the values of the asked attribute.
CHOICE = "choice"
CHOICE_OPTIONS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS, "size": SIZES,
                  "count": tuple(str(n) for n in range(1, MAX_OBJECTS + 1))}
CHOICE_LETTERS = "ABCD"
# lmms-eval's MMStar post-prompt (tasks/mmstar/_default_template_yaml), appended to training rows.
CHOICE_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly"

# A scene's split is its content hash modulo 100, in [lo, hi).
SPLIT_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}

# Geometry in pixels of a 64 px image, scaled to img_size and rounded to whole pixels (so two
# different geometries are two different images). The smallest large side (20) is below a grid
# cell (64/3 = 21.3), so any scene fits without overlap at minimum sides and no jitter.
SIDE_RANGE = {"small": (12, 16), "large": (20, 26)}
JITTER = 3
BACKGROUND = (255, 255, 255)
_BASE = 64


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cell: int      # index into POSITIONS
    x0: int        # top-left corner and side of the bounding box, in pixels of the image
    y0: int
    side: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def describe(self) -> str:
        return f"{_article(self.size)} {self.size} {self.colour} {self.shape} in the {self.position}"


@dataclass(frozen=True)
class ShapesSample:
    objects: tuple[ShapeObject, ...]
    question_type: str
    question: str
    answer: str
    category: str = ""   # choice questions: the attribute asked about (else the question type)


def parse_question_types(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'all' or a comma-separated subset of QUESTION_TYPES and CHOICE (e.g. 'colour,shape,choice')."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return QUESTION_TYPES
    unknown = [n for n in names if n not in (*QUESTION_TYPES, CHOICE)]
    if unknown or not names:
        raise ValueError(f"shapes_question_types={spec!r}: unknown types {unknown}; use 'all' or a "
                         f"comma-separated subset of {[*QUESTION_TYPES, CHOICE]}.")
    return tuple(dict.fromkeys(names))


def _check_args(split: str, max_objects: int) -> None:
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"shapes split {split!r} is unknown; use one of {list(SPLIT_BUCKETS)}.")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"shapes_max_objects={max_objects} must be in [1, {MAX_OBJECTS}] "
                         f"(one object per cell of a 3x3 grid).")


# ==================================================================== scenes and questions

def generate_sample(seed: int, split: str, index: int, max_objects: int = 1,
                    question_types: Sequence[str] = QUESTION_TYPES, img_size: int = 64) -> ShapesSample:
    """The sample at `index` of `split`: a pure function of its arguments (no drawing)."""
    _check_args(split, max_objects)
    lo, hi = SPLIT_BUCKETS[split]
    # A str seed is hashed with SHA-512: stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"shapes/{DATA_VERSION}/{seed}/{split}/{index}")
    for _ in range(10_000):
        objects = _scene(rng, max_objects, img_size)
        if lo <= content_bucket(objects) < hi:
            return _question(rng, objects, tuple(question_types))
    raise RuntimeError(f"no {split} scene found for index {index}")  # probability ~0


def content_bucket(objects: Sequence[ShapeObject]) -> int:
    """Which of 100 buckets the image content hashes to (decides the split)."""
    key = ";".join(f"{o.cell},{o.shape},{o.colour},{o.side},{o.x0},{o.y0}"
                   for o in sorted(objects, key=lambda o: o.cell))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100


def _scene(rng: random.Random, max_objects: int, img_size: int) -> tuple[ShapeObject, ...]:
    n = rng.randint(1, max_objects)
    pairs = rng.sample(_ALL_PAIRS, n)           # distinct (colour, shape): referents are unique
    cells = rng.sample(range(MAX_OBJECTS), n)
    sizes = [rng.choice(SIZES) for _ in range(n)]
    for _ in range(8):
        objects = tuple(_place(shape, colour, size, cell, rng.randint(*SIDE_RANGE[size]),
                               rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER), img_size)
                        for (colour, shape), cell, size in zip(pairs, cells, sizes))
        if not _any_overlap(objects):
            return objects
    # Minimum sides at the cell centres never overlap (see SIDE_RANGE).
    return tuple(_place(shape, colour, size, cell, SIDE_RANGE[size][0], 0, 0, img_size)
                 for (colour, shape), cell, size in zip(pairs, cells, sizes))


_ALL_PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]


def _place(shape: str, colour: str, size: str, cell: int, side: int, dx: int, dy: int,
           img_size: int) -> ShapeObject:
    """An object of `side` (64 px units) centred `dx, dy` off its cell's centre, in whole pixels
    of an img_size image and kept inside it."""
    scale = img_size / _BASE
    row, col = divmod(cell, 3)
    side_px = max(1, round(side * scale))

    def corner(index: int, offset: int) -> int:
        centre = (index + 0.5) * img_size / 3 + round(offset * scale)
        return min(max(round(centre - side_px / 2), 0), img_size - side_px)

    return ShapeObject(shape, colour, size, cell, corner(col, dx), corner(row, dy), side_px)


def _any_overlap(objects: Sequence[ShapeObject]) -> bool:
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            # boxes [x0, x0 + side) closer than one pixel of background
            if (a.x0 <= b.x0 + b.side and b.x0 <= a.x0 + a.side
                    and a.y0 <= b.y0 + b.side and b.y0 <= a.y0 + a.side):
                return True
    return False


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _question(rng: random.Random, objects: tuple[ShapeObject, ...],
              question_types: tuple[str, ...]) -> ShapesSample:
    qtype = rng.choice(question_types)
    if qtype == CHOICE:
        return _choice_question(rng, objects, question_types)
    target = rng.choice(objects)
    single = len(objects) == 1
    name = f"{target.colour} {target.shape}"
    if qtype == "colour":
        where = "" if single else f" in the {target.position}"
        question, answer = f"What colour is the shape{where}?", target.colour
    elif qtype == "shape":
        where = "the image" if single else f"the {target.position}"
        question, answer = f"What shape is in {where}?", target.shape
    elif qtype == "position":
        question, answer = f"Where is the {name}?", target.position
    elif qtype == "size":
        question, answer = f"What size is the {name}?", target.size
    elif qtype == "count":
        question, answer = "How many shapes are there?", str(len(objects))
    elif qtype == "exists":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            colour, shape, answer = target.colour, target.shape, "yes"
        else:
            colour, shape = rng.choice([p for p in _ALL_PAIRS if p not in present])
            answer = "no"
        question = f"Is there {_article(colour)} {colour} {shape}?"
    elif qtype == "caption":
        question = "Describe the image."
        answer = " and ".join(o.describe() for o in sorted(objects, key=lambda o: o.cell))
    else:
        raise ValueError(f"unknown question type {qtype!r}; valid: {list(QUESTION_TYPES)}")
    return ShapesSample(objects, qtype, question, answer, qtype)


def choice_attributes(question_types: Sequence[str]) -> tuple[str, ...]:
    """What choice questions ask about: the other selected types that have options, else all of them."""
    return tuple(t for t in question_types if t in CHOICE_OPTIONS) or tuple(CHOICE_OPTIONS)


def _choice_question(rng: random.Random, objects: tuple[ShapeObject, ...],
                     question_types: tuple[str, ...]) -> ShapesSample:
    """An open question of an attribute with options, as MMStar writes them: the right value and
    up to three others drawn uniformly, listed in the attribute's own order (as exams list numbers
    in order). The right letter then depends on the image and on the other options: a model that
    ignores the options guesses it right about half the time, one that reads them always. A small
    model learns that in a few hundred steps; options in a random order were not learned in 1500
    (docs/eval.md)."""
    attribute = rng.choice(choice_attributes(question_types))
    open_question = _question(rng, objects, (attribute,))
    values = CHOICE_OPTIONS[attribute]
    wrong = [v for v in values if v != open_question.answer]
    options = rng.sample(wrong, min(len(CHOICE_LETTERS) - 1, len(wrong))) + [open_question.answer]
    options.sort(key=values.index)
    listed = ", ".join(f"{letter}: {value}" for letter, value in zip(CHOICE_LETTERS, options))
    answer = CHOICE_LETTERS[options.index(open_question.answer)]
    return ShapesSample(objects, CHOICE, f"{open_question.question}\nOptions: {listed}", answer, attribute)


# ==================================================================== drawing

def render_image(objects: Sequence[ShapeObject], img_size: int = 64) -> Image.Image:
    """Solid shapes on a plain background, RGB, img_size x img_size."""
    image = Image.new("RGB", (img_size, img_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x1, y1 = o.x0 + o.side - 1, o.y0 + o.side - 1  # PIL boxes include their last pixel
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((o.x0, o.y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((o.x0, o.y0, x1, y1), fill=fill)
        else:
            cx, cy, r = (o.x0 + x1) / 2, (o.y0 + y1) / 2, (o.side - 1) / 2
            draw.polygon([(cx + x * r, cy + y * r) for x, y in _OUTLINES[o.shape]], fill=fill)
    return image


def _star_outline() -> list[tuple[float, float]]:
    import math
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


# Unit outlines (centre 0, half-side 1), y pointing down.
_OUTLINES = {
    "triangle": [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "star": _star_outline(),
}


# ==================================================================== rows

def sample_to_row(sample: ShapesSample, img_size: int = 64, with_image: bool = True) -> dict[str, Any]:
    user = sample.question + (CHOICE_INSTRUCTION if sample.question_type == CHOICE else "")
    row: dict[str, Any] = {
        "texts": [{"user": user, "assistant": sample.answer}],
        "question_type": sample.question_type,
        "answer": sample.answer,
    }
    row["images"] = [render_image(sample.objects, img_size) if with_image else None]
    return row


class ShapesRows(Sequence):
    """A split of `shapes` as a lazy sequence of rows, generated on access (~thousands/s)."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 1234, max_objects: int = 1,
                 question_types: str | Sequence[str] = "all", img_size: int = 64):
        _check_args(split, max_objects)
        if size <= 0:
            raise ValueError(f"shapes split size={size} must be positive.")
        self.split, self.size, self.seed = split, size, seed
        self.max_objects, self.img_size = max_objects, img_size
        self.question_types = parse_question_types(question_types)

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> ShapesSample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a shapes split of {self.size}")
        return generate_sample(self.seed, self.split, index, self.max_objects, self.question_types,
                               self.img_size)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if index < 0:
            index += self.size
        return sample_to_row(self.sample(index), self.img_size)

    def text_row(self, index: int) -> dict[str, Any]:
        """The row without drawing its image (`images` is [None]): for cheap length checks."""
        return sample_to_row(self.sample(index), with_image=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self.size))

    def __repr__(self) -> str:
        return (f"ShapesRows(split={self.split!r}, size={self.size}, seed={self.seed}, "
                f"max_objects={self.max_objects}, question_types={self.question_types}, "
                f"img_size={self.img_size})")


def _generate_rows(split: str, size: int, seed: int, max_objects: int, question_types: tuple[str, ...],
                   img_size: int, version: str) -> Iterator[dict[str, Any]]:
    assert version == DATA_VERSION  # part of gen_kwargs so the datasets cache key changes with it
    yield from ShapesRows(split, size, seed, max_objects, question_types, img_size)


def shapes_features():
    from datasets import Features, Image as ImageFeature, List, Value
    return Features({
        "images": List(ImageFeature()),
        "texts": List({"user": Value("string"), "assistant": Value("string")}),
        "question_type": Value("string"),
        "answer": Value("string"),
    })


def shapes_dataset(split: str = "train", size: int = 1000, seed: int = 1234, max_objects: int = 1,
                   question_types: str | Sequence[str] = "all", img_size: int = 64,
                   cache_dir: str | None = None):
    """A split of `shapes` materialised as a `datasets.Dataset` (cached by all its arguments
    and DATA_VERSION), e.g. to `save_to_disk` or `push_to_hub` it."""
    from datasets import Dataset
    _check_args(split, max_objects)
    return Dataset.from_generator(
        _generate_rows, features=shapes_features(), cache_dir=cache_dir,
        gen_kwargs=dict(split=split, size=size, seed=seed, max_objects=max_objects,
                        question_types=parse_question_types(question_types), img_size=img_size,
                        version=DATA_VERSION),
    )


# ==================================================================== baselines and corpus

def uniform_chance(max_objects: int = 1, question_types: str | Sequence[str] = "all") -> dict[str, float]:
    """1 / (number of possible answers) per question type."""
    pairs = len(COLOURS) * len(SHAPES)
    captions = 0
    for n in range(1, max_objects + 1):  # distinct ways to describe n objects in n distinct cells
        count = 1
        for k in range(n):
            count *= (pairs - k) * (MAX_OBJECTS - k) * len(SIZES)
        for k in range(2, n + 1):
            count //= k
        captions += count
    answers = {"colour": len(COLOURS), "shape": len(SHAPES), "position": MAX_OBJECTS,
               "size": len(SIZES), "count": max_objects, "exists": 2, "caption": captions}
    types = parse_question_types(question_types)
    chance = {t: 1.0 / answers[t] for t in types if t != CHOICE}
    if CHOICE in types:   # the mean over the attributes asked, each with up to four options
        options = [min(len(CHOICE_LETTERS), len(CHOICE_OPTIONS[a])) for a in choice_attributes(types)]
        chance[CHOICE] = sum(1.0 / n for n in options) / len(options)
    return chance


@lru_cache(maxsize=32)
def _majority_baseline(max_objects: int, question_types: tuple[str, ...], samples: int, seed: int,
                       split: str) -> tuple[tuple[str, float], ...]:
    result = []
    for qtype in question_types:
        counts = Counter(generate_sample(seed, split, i, max_objects, (qtype,)).answer for i in range(samples))
        result.append((qtype, counts.most_common(1)[0][1] / samples))
    return tuple(result)


def chance_per_type(max_objects: int = 1, question_types: str | Sequence[str] = "all",
                    samples: int = 1000, seed: int = 1234, split: str = "train") -> dict[str, float]:
    """Accuracy of always answering the most frequent answer, per question type, measured on
    `samples` generated questions of each type (the majority-guess baseline to beat)."""
    return dict(_majority_baseline(max_objects, parse_question_types(question_types), samples, seed, split))


def shapes_text_rows(samples: int = 3000, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Text-only rows covering every question type, object count and phrasing: the corpus the
    `shapes-bpe-*` tokenizers are trained on (changing it changes their ids: bump DATA_VERSION)."""
    for i in range(samples):
        max_objects = 1 if i % 2 == 0 else 1 + (i // 2) % MAX_OBJECTS
        yield sample_to_row(generate_sample(seed, "train", i, max_objects), with_image=False)
