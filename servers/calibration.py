"""A server whose service times are known, for measuring the load generator's own error
(``mailbench calibrate``, :mod:`harness.run.calibrate`).

Each case is a form page of its own, so the scenarios drive it unchanged (``--form-path``):

* ``GET /calibrate/<N>ms`` (``0ms``, ``1ms``, ``10ms``, ``500ms``, any whole number)
  answers a small page with a ``<form`` exactly N ms after the handler received the
  request. The wait ends on a ``timerfd``, a kernel timer with nanosecond resolution
  read by the event loop: asyncio's own timers round every wait up to the next
  millisecond (``epoll_wait`` takes milliseconds), which alone would be an error of up to
  1 ms, twenty times what is being measured.
* ``GET /calibrate/stall`` answers at once, except that every ``stall_every_s`` seconds
  (the first half a period after the case's first request) the handler stops the whole
  event loop for ``stall_s`` seconds, as a garbage-collector pause or a blocking call
  would: every request that arrives meanwhile waits for the stall's end.

The server measures what it held each request (from the handler's first line to its
answer) into a µs histogram per case, and notes when each stall began and ended:

* ``GET /_mailbench/stats`` → ``{"identity": token | null, "held": {case: hdr base64},
  "stalls": [[start, end], ...]}`` (wall-clock seconds);
* ``POST /_mailbench/reset`` → ``{"ok": true}``: clears both and restarts the stall clock.

``python -m servers.calibration [--port 0] [--port-file PATH] [--stall-s 1.4]
[--stall-every 5]`` serves it until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from servers.identity import identity_from
from servers.metrics import Recorder

PAGE = b'<!doctype html><title>calibration</title><form method="post" action="/send"></form>\n'
STALL = "stall"

_CLOCK_MONOTONIC = 1  # what time.monotonic() reads on Linux
_TFD_CLOEXEC, _TFD_NONBLOCK, _TFD_TIMER_ABSTIME = 0o2000000, 0o4000, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018  (Linux only)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


async def hold_until(deadline: float) -> None:
    """Return at ``deadline`` (``time.monotonic()``), within the wake-up latency of a
    kernel timer, without blocking the event loop."""
    if deadline <= time.monotonic():
        return
    fd = (
        -1
        if _LIBC is None
        else _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    )
    if fd < 0:  # not Linux: the loop's timer, to the millisecond
        await asyncio.sleep(deadline - time.monotonic())
        return
    try:
        spec = _Itimerspec()
        spec.it_value.tv_sec = int(deadline)
        spec.it_value.tv_nsec = int((deadline - int(deadline)) * 1e9)
        assert _LIBC is not None
        if _LIBC.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fired.done():
                fired.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await fired
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CalibrationSettings:
    host: str = "127.0.0.1"
    port: int = 0
    stall_s: float = 1.4
    stall_every_s: float = 5.0
    identity: str | None = field(default=None, repr=False)  # see servers.identity


@dataclass
class CalibrationState:
    settings: CalibrationSettings
    held: Recorder = field(default_factory=Recorder)
    stalls: list[tuple[float, float]] = field(default_factory=list)
    next_stall: float | None = None  # monotonic; None until the stall case's first request

    def reset(self) -> None:
        self.held.reset()
        self.stalls.clear()
        self.next_stall = None


STATE = web.AppKey("calibration", CalibrationState)


def _stall_if_due(state: CalibrationState) -> None:
    now = time.monotonic()
    every = state.settings.stall_every_s
    if state.next_stall is None:
        state.next_stall = now + every / 2
        return
    if now < state.next_stall:
        return
    began = time.time()
    time.sleep(state.settings.stall_s)  # on purpose: the whole loop stops
    state.stalls.append((began, time.time()))
    while state.next_stall <= time.monotonic():
        state.next_stall += every


async def case(request: web.Request) -> web.Response:
    arrived = time.monotonic()
    state = request.app[STATE]
    name = request.match_info["case"]
    if name == STALL:
        _stall_if_due(state)
    elif name.endswith("ms") and name[:-2].isdigit():
        await hold_until(arrived + int(name[:-2]) / 1000)
    else:
        raise web.HTTPNotFound(text=f"no case {name!r}: use /calibrate/<N>ms or /calibrate/stall")
    state.held.record_us(name, (time.monotonic() - arrived) * 1_000_000)
    return web.Response(body=PAGE, content_type="text/html")


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "identity": state.settings.identity,
            "held": state.held.encoded(),
            "stalls": [list(stall) for stall in state.stalls],
        }
    )


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"ok": True})


def create_app(settings: CalibrationSettings) -> web.Application:
    app = web.Application()
    app[STATE] = CalibrationState(settings)
    app.router.add_get("/calibrate/{case}", case)
    app.router.add_get("/_mailbench/stats", stats)
    app.router.add_post("/_mailbench/reset", reset)
    return app


async def serve(settings: CalibrationSettings, port_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    # A deep backlog: during a stall, every connection a client opens waits in it.
    site = web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"calibration server listening on http://{host}:{port}", flush=True)
    if port_file is not None:
        partial = port_file.with_name(f".{port_file.name}.{os.getpid()}")
        partial.write_text(f"{port}\n")
        os.replace(partial, port_file)  # whole or not at all
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.calibration")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", type=Path, help="write the port bound here")
    parser.add_argument("--stall-s", type=float, default=CalibrationSettings.stall_s)
    parser.add_argument("--stall-every", type=float, default=CalibrationSettings.stall_every_s)
    args = parser.parse_args(argv)
    settings = CalibrationSettings(
        host=args.host,
        port=args.port,
        stall_s=args.stall_s,
        stall_every_s=args.stall_every,
        identity=identity_from(os.environ),
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(settings, args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
