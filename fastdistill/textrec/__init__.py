"""Text recognition distilled from two specialists ("Text is Text, No Matter What", Bhunia et al., ICCV 2021).

One attention-decoder recognizer for printed / scene text and handwriting, distilled from a printed teacher and a
handwriting teacher with the four losses of the paper (logits, glimpse hint, attention maps, glimpse affinity) through
fastdistill's ops. Command line: ``fastdistill text-recognition train-teacher|distill|evaluate --config C.yaml``.

    >>> from fastdistill import textrec
    >>> model = textrec.load("runs/textrec_demo/student")
    >>> model.recognize([PIL.Image.open("word.png")])
    ['hello']
"""

from __future__ import annotations

from fastdistill.textrec.data import DOMAINS, FontPackageError, render
from fastdistill.textrec.model import Recognizer, RecognizerConfig, RecognizerOutput
from fastdistill.textrec.train import load, score


def recognize(model: Recognizer, images: list) -> list[str]:
    """The words in ``images`` (PIL images, any size: converted to grey 32 x 128), by greedy decoding."""
    return model.recognize(images)


__all__ = ["DOMAINS", "FontPackageError", "Recognizer", "RecognizerConfig", "RecognizerOutput", "load", "recognize"]
__all__ += ["render", "score"]
