"""The quickstart's language: colours, shapes, question templates and every word they use.

One list feeds the tokenizer (`components.py`), the synthetic data (`shapes.py`) and the text
documents the tiny language model is pretrained on, so no sample ever meets an unknown word.
"""

from __future__ import annotations

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# RGB centres of the four colours (jittered per image).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 175, 65),
    "blue": (45, 75, 215),
    "yellow": (225, 205, 40),
}

CAPTION_PROMPTS: tuple[str, ...] = ("describe the image .", "what is in the image ?")
COLOUR_QUESTIONS: tuple[str, ...] = (
    "what colour is the shape ?",
    "what colour is it ?",
    "which colour is the object ?",
)
SHAPE_QUESTIONS: tuple[str, ...] = (
    "what shape is it ?",
    "what shape is this ?",
    "which shape is in the image ?",
)

# Words of the text documents (`shapes.text_document`) beyond those in the templates above.
_PROSE = "a the is it this there i see and here picture object colour shape user assistant : . ?"


def caption_of(colour: str, shape: str) -> str:
    """The one caption form the model learns and caption accuracy checks."""
    return f"a {colour} {shape}"


def _words() -> list[str]:
    text = " ".join([_PROSE, *CAPTION_PROMPTS, *COLOUR_QUESTIONS, *SHAPE_QUESTIONS])
    return list(dict.fromkeys(w for w in text.split() if w not in COLOURS and w not in SHAPES))


WORDS: tuple[str, ...] = tuple(_words())
