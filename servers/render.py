"""CPU work per email: a personalised card image, rendered with Pillow at a chosen cost.

Real applications do CPU work for each email they send (templates, images, PDFs). This
module makes that work explicit and tunable, so a run can show what the benchmark's
async I/O does *not* hide: in ``direct`` and ``blocking`` mode the render runs inside
the request on the event loop and every other request waits for it; in a queued mode
the worker does it, off the request path.

The cost is real CPU work, never a sleep or a busy-wait on a clock: a gradient and
stripe background drawn on a canvas, a number of blur passes over it, then a small card
with the greeting, subject and PNG encoding. How much work one render does is
*calibrated* when a :class:`Renderer` is built: the canvas size and the number of passes
are searched until the median render on this machine takes about the target in CPU
time (see :func:`timed_median` for why not wall time). The
attachment itself stays small (a 64-colour card of at most :data:`CARD_SIZE`, some tens
of KB at most), so the upload never becomes what the fake API measures.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFilter, ImageFont, PngImagePlugin

from queues.base import Email
from queues.errors import ConfigError

log = logging.getLogger(__name__)

CARD_FILENAME = "card.png"
CARD_SIZE = (400, 225)  # the attachment's largest size; smaller canvases give smaller cards
CARD_COLOURS = 64  # a palette keeps the PNG in the tens of KB
BASE_SIZE = (320, 180)  # the canvas of work level 1.0
MAX_CANVAS_PIXELS = 1920 * 1080  # past this, more work means more passes, not more pixels
MIN_LEVEL = 0.05  # about 72 × 40 pixels, the cheapest render there is
MAX_LEVEL = 50_000.0  # ~1,200 full-HD blur passes: minutes, far past any useful target
BLUR_RADIUS = 2.0

# Calibration: medians of a few renders per probe, a few probes, then one check.
PROBE_RENDERS = 5
CHECK_RENDERS = 15
MAX_PROBES = 8
TOLERANCE = 0.10  # stop probing once a median is within 10% of the target

Measure = Callable[["RenderParams"], float]  # params -> median CPU seconds of a render


@dataclass(frozen=True, slots=True)
class RenderParams:
    """How much work one render does: the canvas it draws and blurs, and how often."""

    width: int
    height: int
    passes: int

    @classmethod
    def at_level(cls, level: float) -> RenderParams:
        """Work grows linearly with ``level`` (pixels × passes = level × base pixels).

        The canvas grows first, up to full HD; then the passes do, the canvas shrinking
        back so that the product stays on the line. One scalar keeps the search simple.
        """
        level = min(max(level, MIN_LEVEL), MAX_LEVEL)
        base_w, base_h = BASE_SIZE
        work = level * base_w * base_h
        passes = max(1, math.ceil(work / MAX_CANVAS_PIXELS))
        scale = math.sqrt(work / passes / (base_w * base_h))
        return cls(max(16, round(base_w * scale)), max(9, round(base_h * scale)), passes)

    @property
    def work(self) -> int:
        return self.width * self.height * self.passes


@dataclass(frozen=True, slots=True)
class Calibration:
    """What calibration chose, and how long a render then took (for logs and metrics)."""

    target_ms: float
    median_ms: float
    params: RenderParams
    probes: int
    note: str = ""  # why the target could not be met, when it could not

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        p = self.params
        text = (
            f"render cost: target {self.target_ms:g} ms, median {self.median_ms:.1f} ms of CPU "
            f"({p.width}×{p.height} canvas, {p.passes} blur passes, {self.probes} probes)"
        )
        return f"{text}; {self.note}" if self.note else text


def recipient_name(address: str) -> str:
    """The local part of the address, the name the card greets."""
    return address.rpartition("@")[0] or address


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # load_default(size) decodes Pillow's embedded font on every call: far too costly to
    # repeat per render, and not work an application would do per email either.
    return ImageFont.load_default(size)


def _palette(text: str) -> tuple[int, int, int]:
    """A colour of the recipient's own, so each card differs beyond its text."""
    digest = hashlib.blake2b(text.encode(), digest_size=3).digest()
    return (digest[0], digest[1], digest[2])


@functools.cache
def _ramps() -> tuple[Image.Image, Image.Image, Image.Image]:
    # Pillow's 256 × 256 gradients are the same for every email: made once, then only
    # stretched to each canvas.
    ramp = Image.linear_gradient("L")
    return ramp, ramp.rotate(90), Image.radial_gradient("L")


def _shift(channel: Image.Image, by: int) -> Image.Image:
    return channel.point([(v + by) % 256 for v in range(256)])


def _background(params: RenderParams, tint: tuple[int, int, int]) -> Image.Image:
    size = (params.width, params.height)
    bilinear = Image.Resampling.BILINEAR
    channels = [
        _shift(ramp.resize(size, bilinear), by) for ramp, by in zip(_ramps(), tint, strict=True)
    ]
    canvas = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(canvas)
    step = max(6, params.width // 20)
    for x in range(-params.height, params.width, step):
        draw.line([(x, 0), (x + params.height, params.height)], fill=tint, width=step // 3)
    return canvas


def _card(canvas: Image.Image, greeting: str, subject: str) -> Image.Image:
    width = min(CARD_SIZE[0], canvas.width)
    height = min(CARD_SIZE[1], canvas.height)
    card = canvas.resize((width, height), Image.Resampling.BOX)
    draw = ImageDraw.Draw(card)
    margin = max(2, width // 16)
    big, small = max(6, height // 7), max(5, height // 12)
    # A dark band under the text keeps it legible on any background colour.
    draw.rectangle((0, margin // 2, width, margin + big * 2 + small * 2), fill=(24, 24, 32))
    draw.text((margin, margin), greeting, font=_font(big), fill="white")
    draw.text((margin, margin + big * 2), subject, font=_font(small), fill=(220, 220, 220))
    return card


def render_card(email: Email, params: RenderParams) -> bytes:
    """One personalised card as PNG bytes, doing the work that ``params`` describe."""
    name = recipient_name(email.to)[:40]
    greeting = f"Hello, {name}!"
    subject = email.subject[:60]
    canvas = _background(params, _palette(email.to))
    for _ in range(params.passes):
        canvas = canvas.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    card = _card(canvas, greeting, subject).quantize(CARD_COLOURS, method=Image.Quantize.FASTOCTREE)
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", greeting)
    info.add_text("Description", subject)
    out = io.BytesIO()
    card.save(out, "PNG", pnginfo=info, compress_level=6)
    return out.getvalue()


_PROBE_EMAIL = Email(
    to="calibration@mailbench.test", subject="Calibrating the render cost", text=""
)


def timed_median(params: RenderParams, renders: int) -> float:
    """Median CPU seconds of ``renders`` renders, after one untimed warm-up.

    CPU time of this thread, not wall time: on a machine shared with the load generator,
    the fake API and other tests, wall time measures the neighbours as much as the render
    and calibration would chase their noise. The cost is then CPU per render; what it
    does to a request's wall time is what the benchmark's ``render`` histogram shows.
    """
    render_card(_PROBE_EMAIL, params)
    times = []
    for _ in range(renders):
        started = time.thread_time()
        render_card(_PROBE_EMAIL, params)
        times.append(time.thread_time() - started)
    return float(statistics.median(times))


def calibrate(
    target_ms: float,
    measure: Measure | None = None,
    check: Measure | None = None,
) -> Calibration:
    """Find the work level whose median render takes about ``target_ms``.

    Probes start at level 1.0; each next level is where a line fitted through the probes
    so far reaches the target (see :func:`_next_level`), until a probe lands within
    :data:`TOLERANCE`. Then one check measures the probe nearest the target afresh: that
    median is what gets reported.
    ``measure`` and ``check`` time a render (injectable for tests).
    """
    target = target_ms / 1000
    measure = measure or (lambda p: timed_median(p, PROBE_RENDERS))
    check = check or (lambda p: timed_median(p, CHECK_RENDERS))
    probes: list[tuple[float, float]] = []  # (level, median seconds)
    level = 1.0
    for _ in range(MAX_PROBES):
        seconds = max(measure(RenderParams.at_level(level)), 1e-9)
        probes.append((level, seconds))
        if abs(seconds - target) <= TOLERANCE * target:
            break
        level = _next_level(probes, target)
        if level == probes[-1][0]:  # pinned at a bound
            break
    # The probe nearest the target; of equally near ones, the smallest when they were too
    # slow, the largest when too fast (that is what noise-free ties at a bound mean).
    level = min(probes, key=lambda p: (abs(p[1] - target), p[0] if p[1] > target else -p[0]))[0]
    params = RenderParams.at_level(level)
    median = check(params) * 1000
    note = ""
    if level <= MIN_LEVEL and median > target_ms * (1 + TOLERANCE):
        note = f"the cheapest render takes {median:.1f} ms on this machine"
    elif level >= MAX_LEVEL and median < target_ms * (1 - TOLERANCE):
        note = "the target is beyond the largest render; it was capped"
    return Calibration(target_ms, round(median, 3), params, len(probes), note)


def _next_level(probes: list[tuple[float, float]], target: float) -> float:
    """The level where the least-squares line through the probes meets the target.

    A line, because that is the cost's shape: fixed costs (the card, the PNG) plus work
    in proportion to pixels × passes. Fitting all probes, not the last two, averages out
    the timing noise of a shared machine. With one probe, or a fit that noise made flat
    or falling, the step is proportional to the target instead.
    """
    level, seconds = probes[-1]
    guess = level * target / seconds
    levels = [probe[0] for probe in probes]
    if len(set(levels)) >= 2:
        mean_level = statistics.fmean(levels)
        mean_seconds = statistics.fmean(probe[1] for probe in probes)
        spread = sum((x - mean_level) ** 2 for x in levels)
        slope = sum((x - mean_level) * (y - mean_seconds) for x, y in probes) / spread
        if slope > 0:
            guess = level + (target - (mean_seconds + slope * (level - mean_level))) / slope
    # Never jump more than 64× at once: a probe far past the target could take minutes.
    guess = min(max(guess, level / 64), level * 64)
    return min(max(guess, MIN_LEVEL), MAX_LEVEL)


class Renderer:
    """Renders a card per email at a calibrated cost; ``target_ms`` 0 means off.

    Calibration runs here, once, at start-up: build the renderer before serving. Thread
    safe: :meth:`render` keeps no state, so a worker may render in several threads.
    """

    def __init__(
        self,
        target_ms: float,
        *,
        measure: Measure | None = None,
        check: Measure | None = None,
    ) -> None:
        if not math.isfinite(target_ms) or target_ms < 0:
            raise ConfigError(
                f"The render cost must be 0 (off) or a positive number of ms, not {target_ms}."
            )
        self.target_ms = target_ms
        self.calibration: Calibration | None = None
        if target_ms > 0:
            self.calibration = calibrate(target_ms, measure, check)
            log.info("%s", self.calibration.describe())

    @property
    def enabled(self) -> bool:
        return self.calibration is not None

    def render(self, email: Email) -> bytes:
        """The email's card as PNG bytes, at the calibrated cost."""
        if self.calibration is None:
            raise ConfigError("The renderer is off (render cost 0 ms); there is no image.")
        return render_card(email, self.calibration.params)

    def inline(self, email: Email) -> list[tuple[str, bytes]]:
        """The inline attachments for ``email``: the card, or none when rendering is off."""
        if self.calibration is None:
            return []
        return [(CARD_FILENAME, self.render(email))]

    def describe(self) -> dict[str, object] | None:
        """The calibration as JSON-ready data (``None`` when off), for metrics files."""
        return None if self.calibration is None else self.calibration.as_dict()
