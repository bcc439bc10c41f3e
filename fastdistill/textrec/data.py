"""Word images rendered on the fly with Pillow: a printed / scene domain and a handwriting domain.

Fonts and words come from Debian packages. ``make data-text`` fetches them with ``apt-get download`` and unpacks them
with ``dpkg -x`` (no root) into ``$FASTDISTILL_CACHE/textrec/root``; the system's own ``/`` is searched too (DejaVu is
usually installed). Nothing is downloaded at run time: a missing package is a :class:`FontPackageError` naming it and
the make target that installs it.

Every sample is a pure function of ``(seed, domain, split, index)``: the word, the font, the size, the background,
the distortions and the noise all come from one ``numpy`` generator seeded with that tuple, so a training run that
resumes at step ``s`` sees exactly the images it would have seen, and the test sets are the same on every machine.

Held out: some fonts of each domain (``FONTS``' ``test`` entries) are only ever used by the ``test`` split, and one
word in ten of the word list (by its position in the sorted list) too, so accuracy measures unseen writing styles on
unseen words.
"""

from __future__ import annotations

import functools
import os
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DOMAINS = ("printed", "handwriting")
SPLITS = ("train", "test")
# case-sensitive letters and digits; index 0 is the end-of-word symbol (see model.py)
CHARSET = string.digits + string.ascii_letters
HEIGHT, WIDTH = 32, 128
MAKE_TARGET = "make data-text"


class FontPackageError(FileNotFoundError):
    """A Debian package that the renderer needs (fonts or the word list) is not unpacked where we look."""


@dataclass(frozen=True)
class Font:
    package: str  # the Debian package that ships it
    path: str  # path inside the package (as installed under /)
    domain: str
    split: str  # "train" or "test" (held out)
    caps: bool = False  # the font has capitals only (its lowercase letters are small capitals): words are upper-cased


_TT, _OT = "usr/share/fonts/truetype", "usr/share/fonts/opentype"


def _fonts(package: str, folder: str, domain: str, train: list[str], test: list[str], caps=False) -> list[Font]:
    return [Font(package, f"{folder}/{n}", domain, "train", caps) for n in train] + [
        Font(package, f"{folder}/{n}", domain, "test", caps) for n in test
    ]


FONTS: tuple[Font, ...] = tuple(
    _fonts(
        "fonts-dejavu-core",
        f"{_TT}/dejavu",
        "printed",
        ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"],
        ["DejaVuSerif-Bold.ttf"],
    )
    + _fonts(
        "fonts-dejavu-extra",
        f"{_TT}/dejavu",
        "printed",
        ["DejaVuSansCondensed.ttf", "DejaVuSerifCondensed-Bold.ttf", "DejaVuSans-Oblique.ttf"],
        ["DejaVuSansMono-Bold.ttf"],
    )
    + _fonts(
        "fonts-liberation",
        f"{_TT}/liberation",
        "printed",
        [
            "LiberationSans-Regular.ttf",
            "LiberationSans-Bold.ttf",
            "LiberationMono-Regular.ttf",
            "LiberationSerif-Italic.ttf",
            "LiberationSansNarrow-Regular.ttf",
        ],  # fmt: skip
        ["LiberationSerif-Regular.ttf", "LiberationSansNarrow-Bold.ttf"],
    )
    + _fonts(
        "fonts-bwht",
        f"{_OT}/bwht",
        "handwriting",
        [
            "BecauseWeBuild-Regular.otf",
            "BecauseWeLearn-Regular.otf",
            "BecauseWeOrganize-Regular.otf",
            "BecauseWeMentor-Regular.otf",
        ],  # fmt: skip
        ["BecauseWeConnect-Regular.otf", "BecauseWeCreate-Regular.otf"],
        caps=True,
    )
    + _fonts("fonts-dkg-handwriting", f"{_TT}/fifthhorseman", "handwriting", ["dkg.ttf", "dkgBd.ttf"], ["dkgIt.ttf"])
    + _fonts("fonts-ecolier-court", f"{_TT}/ecolier-court", "handwriting", ["Ecolier-court.ttf"], [])
    + _fonts("fonts-breip", f"{_TT}/breip", "handwriting", ["Breip.ttf"], [])
    + _fonts(
        "fonts-dancingscript",
        f"{_OT}/dancingscript",
        "handwriting",
        ["DancingScript-Regular.otf"],
        ["DancingScript-Bold.otf"],
    )  # fmt: skip
    + _fonts("fonts-kaushanscript", f"{_OT}/kaushanscript", "handwriting", ["KaushanScript-Regular.otf"], [])
)
WORDS_PACKAGE, WORDS_PATH = "wamerican", "usr/share/dict/american-english"
PACKAGES = tuple(dict.fromkeys([f.package for f in FONTS] + [WORDS_PACKAGE]))


def data_root() -> str:
    """Where ``make data-text`` unpacks the packages: ``$FASTDISTILL_CACHE/textrec/root``."""
    from fastdistill.train.models import cache_dir

    return os.path.join(cache_dir(), "textrec", "root")


def _search_roots() -> list[str]:
    return [data_root(), "/"]


def find_file(package: str, path: str) -> str:
    """The first existing ``<root>/<path>`` over the search roots, else a FontPackageError naming ``package``."""
    for root in _search_roots():
        full = os.path.join(root, path)
        if os.path.isfile(full):
            return full
    raise FontPackageError(
        f"Debian package {package!r} is missing: {path!r} was not found under {_search_roots()}; run "
        f"`{MAKE_TARGET}` (apt-get download + dpkg -x into $FASTDISTILL_CACHE/textrec, no root needed) or install "
        f"it with `apt-get install {package}`"
    )


def fonts(domain: str, split: str) -> list[Font]:
    _check("domain", domain, DOMAINS)
    _check("split", split, SPLITS)
    return [f for f in FONTS if f.domain == domain and f.split == split]


def _check(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid; expected one of {list(choices)}")


@functools.lru_cache(maxsize=4)
def word_list(max_len: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train words, test words): the word list's entries of 1..max_len characters of CHARSET, sorted; every tenth
    one is held out for the test split."""
    path = find_file(WORDS_PACKAGE, WORDS_PATH)
    with open(path, encoding="utf-8", errors="replace") as f:
        words = sorted({w.strip() for w in f if 0 < len(w.strip()) <= max_len and set(w.strip()) <= set(CHARSET)})
    if len(words) < 100:
        raise FontPackageError(f"{path!r} has only {len(words)} usable words; expected the {WORDS_PACKAGE} word list")
    test = tuple(w for i, w in enumerate(words) if i % 10 == 0)
    train = tuple(w for i, w in enumerate(words) if i % 10 != 0)
    return train, test


@functools.lru_cache(maxsize=256)
def _load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _font_path(font: Font) -> str:
    return find_file(font.package, font.path)


def check_available(domains=DOMAINS) -> None:
    """Raise FontPackageError for the first package (font or word list) that the given domains need and lack."""
    word_list(24)
    for f in FONTS:
        if f.domain in domains:
            _font_path(f)


def _word(rng: np.random.Generator, words: tuple[str, ...], max_len: int) -> str:
    r = rng.random()
    if r < 0.08:  # numbers (house numbers, prices, years)
        n = int(rng.integers(1, min(max_len, 6) + 1))
        return "".join(rng.choice(list(string.digits), n))
    w = words[int(rng.integers(len(words)))]
    if r < 0.18:
        return w.upper()
    if r < 0.28:
        return w.capitalize()
    return w


def _text_mask(text: str, font_path: str, size: int, pad: int) -> Image.Image:
    font = _load_font(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    w, h = max(1, right - left), max(1, bottom - top)
    mask = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=font, fill=255)
    return mask


def _fit(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scale the text mask to fit HEIGHT x WIDTH (keeping the aspect ratio, with a random margin), placed at random."""
    w, h = mask.size
    target_h = HEIGHT * rng.uniform(0.65, 0.95)
    scale = min(target_h / h, WIDTH * rng.uniform(0.8, 0.98) / w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    mask = mask.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new("L", (WIDTH, HEIGHT), 0)
    x = int(rng.integers(0, WIDTH - nw + 1))
    y = int(rng.integers(0, HEIGHT - nh + 1))
    canvas.paste(mask, (x, y))
    return canvas


def _perspective(img: Image.Image, rng: np.random.Generator, amount: float) -> Image.Image:
    w, h = img.size
    d = rng.uniform(-amount, amount, size=8) * np.array([w, h] * 4) * 0.5
    quad = np.array([0, 0, 0, h, w, h, w, 0], dtype=float) + d  # NW, SW, SE, NE corners of the source
    return img.transform((w, h), Image.QUAD, tuple(quad.tolist()), Image.BILINEAR)


def _shear(img: Image.Image, slant: float) -> Image.Image:
    w, h = img.size
    return img.transform((w, h), Image.AFFINE, (1, slant, -slant * h / 2, 0, 1, 0), Image.BILINEAR)


def _elastic(img: Image.Image, rng: np.random.Generator, strength: float, cells: int = 8) -> Image.Image:
    """Elastic distortion as a Pillow MESH transform: a grid of quads whose corners move by a smooth random field."""
    w, h = img.size
    nx, ny = cells, 2
    xs, ys = np.linspace(0, w, nx + 1), np.linspace(0, h, ny + 1)
    dx = rng.normal(0, strength, size=(ny + 1, nx + 1))
    dy = rng.normal(0, strength * 0.5, size=(ny + 1, nx + 1))
    dx[:, [0, -1]] = 0
    dy[[0, -1], :] = 0
    mesh = []
    for j in range(ny):
        for i in range(nx):
            box = (int(xs[i]), int(ys[j]), int(xs[i + 1]), int(ys[j + 1]))
            corner = lambda a, b: (xs[a] + dx[b, a], ys[b] + dy[b, a])  # noqa: E731
            quad = (*corner(i, j), *corner(i, j + 1), *corner(i + 1, j + 1), *corner(i + 1, j))
            mesh.append((box, tuple(float(v) for v in quad)))
    return img.transform((w, h), Image.MESH, mesh, Image.BILINEAR)


def _background(rng: np.random.Generator, domain: str) -> np.ndarray:
    """[HEIGHT, WIDTH] background in [0, 1]: flat, gradient or texture (printed); paper, maybe ruled (handwriting)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    if domain == "handwriting":
        base = np.full((HEIGHT, WIDTH), rng.uniform(0.8, 1.0), np.float32)
        if rng.random() < 0.3:  # ruled paper
            period, phase = rng.uniform(12, 20), rng.uniform(0, 20)
            base -= 0.15 * (np.abs(((yy + phase) % period) - period / 2) < 0.6)
        return base + rng.normal(0, 0.02, (HEIGHT, WIDTH)).astype(np.float32)
    kind = rng.integers(3)
    a, b = rng.uniform(0, 1, 2)
    if kind == 0:
        base = np.full((HEIGHT, WIDTH), a, np.float32)
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx / WIDTH + np.sin(angle) * yy / HEIGHT + 1) / 2
        base = a + (b - a) * t
    else:  # texture: smoothed noise at a random scale
        coarse = rng.uniform(0, 1, (int(rng.integers(2, 9)), int(rng.integers(4, 33)))).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
        base = a + (tex - 0.5) * rng.uniform(0.2, 0.7)
    return base.astype(np.float32)


def sample_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), DOMAINS.index(domain), SPLITS.index(split), int(index)])


def render(seed: int, domain: str, split: str, index: int, max_len: int = 10) -> tuple[Image.Image, str]:
    """Sample ``index`` of the (seed, domain, split) stream: a ``HEIGHT x WIDTH`` grey PIL image and its word.

    Deterministic: the same arguments give the same pixels and the same word, in any process."""
    _check("domain", domain, DOMAINS)
    _check("split", split, SPLITS)
    rng = sample_rng(seed, domain, split, index)
    train_words, test_words = word_list(max_len)
    text = _word(rng, train_words if split == "train" else test_words, max_len)
    pool = fonts(domain, split)
    font = pool[int(rng.integers(len(pool)))]
    if font.caps:
        text = text.upper()
    size = int(rng.integers(28, 44))
    mask = _text_mask(text, _font_path(font), size, pad=4)
    if domain == "handwriting":
        mask = _shear(mask, float(rng.uniform(-0.4, 0.4)))
        mask = _elastic(mask, rng, strength=float(rng.uniform(0.5, 2.5)))
    mask = _fit(mask, rng)
    if domain == "printed" and rng.random() < 0.7:
        mask = _perspective(mask, rng, amount=float(rng.uniform(0.02, 0.15)))
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    alpha = np.asarray(mask, np.float32) / 255.0
    bg = _background(rng, domain)
    if domain == "handwriting":
        ink = rng.uniform(0.0, 0.35)
    else:  # text at a contrast of at least 0.35 against the mean background, either polarity
        m = float(bg.mean())
        ink = rng.uniform(0, max(0.0, m - 0.35)) if (m > 0.5) else rng.uniform(min(1.0, m + 0.35), 1.0)
    img = bg * (1 - alpha) + ink * alpha
    img = img + rng.normal(0, rng.uniform(0.0, 0.06), img.shape)
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels, mode="L"), text


def to_tensor(images: list[Image.Image]):
    """A list of PIL images (any size, any mode) -> a float tensor [N, 1, HEIGHT, WIDTH] in [-1, 1]."""
    import torch

    out = np.empty((len(images), 1, HEIGHT, WIDTH), np.float32)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"images[{i}] is a {type(im).__name__}; expected a PIL.Image.Image")
        g = im.convert("L")
        if g.size != (WIDTH, HEIGHT):
            g = g.resize((WIDTH, HEIGHT), Image.BILINEAR)
        out[i, 0] = np.asarray(g, np.float32) / 127.5 - 1.0
    return torch.from_numpy(out)


def batch(seed: int, domains: list[str], split: str, indices: list[int], max_len: int):
    """Render one batch: (images [N, 1, H, W], words, domain ids [N])."""
    import torch

    pairs = [render(seed, d, split, i, max_len) for d, i in zip(domains, indices)]
    dom = torch.tensor([DOMAINS.index(d) for d in domains])
    return to_tensor([p[0] for p in pairs]), [p[1] for p in pairs], dom


RENDER_VERSION = 1  # bump when render() changes: cached pools are keyed by it


def pool(seed: int, domain: str, split: str, size: int, max_len: int, cache: bool = True):
    """The first ``size`` samples of the (seed, domain, split) stream as (uint8 images [size, HEIGHT, WIDTH], words).

    Rendering costs a few ms a sample, so a pool of more than 256 samples is written once to
    ``$FASTDISTILL_CACHE/textrec/pools`` (atomically: a killed run never leaves a half-written file) and read back by
    every later run (both teachers and every student of a comparison train on the very same images)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} is invalid; expected an integer >= 1")
    from fastdistill.train.models import cache_dir

    folder = os.path.join(cache_dir(), "textrec", "pools")
    name = f"v{RENDER_VERSION}-{domain}-{split}-s{seed}-n{size}-L{max_len}.npz"
    path = os.path.join(folder, name)
    if cache and size > 256 and os.path.isfile(path):
        with np.load(path) as z:
            return z["images"], [str(w) for w in z["words"]]
    images = np.empty((size, HEIGHT, WIDTH), np.uint8)
    words = []
    for i in range(size):
        im, w = render(seed, domain, split, i, max_len)
        images[i] = np.asarray(im)
        words.append(w)
    if cache and size > 256:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, images=images, words=np.array(words))
        os.replace(tmp, path)
    return images, words


def pool_tensor(images: np.ndarray):
    """uint8 [N, HEIGHT, WIDTH] -> float [N, 1, HEIGHT, WIDTH] in [-1, 1] (the model's input; same as to_tensor)."""
    import torch

    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)
