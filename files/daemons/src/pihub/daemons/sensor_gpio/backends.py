"""GPIO hardware backends of pihub-sensor-gpio: one small interface, two implementations.

* :class:`RpiBackend` drives real pins through the ``RPi.GPIO`` API (RPi.GPIO itself on older
  Pis, ``rpi-lgpio`` - same import - on a Pi 5 or a 6.6+ kernel). The library is imported in
  the constructor, so a daemon that picks the simulated backend never loads it.
* :class:`SimulatedBackend` keeps pin levels in memory. Tests and the stand-in Pi drive its
  inputs (:meth:`SimulatedBackend.drive`); it can mirror every pin to a JSON file so that an
  outsider sees what the outputs do electrically.

Levels are electrical (0 = low, 1 = high); active-low and debouncing belong to the daemon, so
both backends behave the same. Edge callbacks may run in any thread (RPi.GPIO calls them from
its own); they only get the pin number and must return quickly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from pihub.durable import atomic_write_json

Pull = Literal["up", "down", "none"]
EdgeCallback = Callable[[int], None]


class BackendError(Exception):
    """The GPIO library is missing or refused a pin; the text says which and what to do."""


class Backend(Protocol):
    name: str

    def setup_input(self, pin: int, pull: Pull, on_edge: EdgeCallback) -> bool:
        """Make ``pin`` an input; call ``on_edge(pin)`` on every edge (any thread).

        Returns False when the library cannot detect edges on this pin (the caller polls).
        """
        ...

    def read(self, pin: int) -> int:
        """The electrical level of ``pin``: 0 or 1."""
        ...

    def setup_output(self, pin: int, level: int) -> None:
        """Make ``pin`` an output driven at ``level`` from the first instant."""
        ...

    def write(self, pin: int, level: int) -> None:
        """Drive output ``pin`` at ``level``."""
        ...

    def cleanup(self) -> None:
        """Release every pin this backend set up (they go back to inputs)."""
        ...


class RpiBackend:
    """Pins through the ``RPi.GPIO`` API, numbered BCM."""

    name = "rpi"

    def __init__(self) -> None:
        try:
            # only here: a simulated daemon never imports it
            import RPi.GPIO as gpio  # type: ignore[import-untyped]
        except (ImportError, RuntimeError) as exc:
            raise BackendError(
                f"cannot import RPi.GPIO ({exc}); install RPi.GPIO (or rpi-lgpio on a Pi 5 "
                "or a 6.6+ kernel) into the pihub virtualenv, or set backend: simulated"
            ) from exc
        self.gpio: Any = gpio
        self._pulls = {"up": gpio.PUD_UP, "down": gpio.PUD_DOWN, "none": gpio.PUD_OFF}
        try:
            gpio.setmode(gpio.BCM)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"RPi.GPIO.setmode(BCM) failed: {exc}") from exc

    def setup_input(self, pin: int, pull: Pull, on_edge: EdgeCallback) -> bool:
        gpio = self.gpio
        try:
            gpio.setup(pin, gpio.IN, pull_up_down=self._pulls[pull])
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"GPIO{pin}: setup as input failed: {exc}") from exc
        try:
            # no bouncetime: the daemon debounces, identically for every backend
            gpio.add_event_detect(pin, gpio.BOTH, callback=lambda channel: on_edge(pin))
        except RuntimeError:
            # RPi.GPIO 0.7 on a 6.6+ kernel: "Failed to add edge detection"
            return False
        return True

    def read(self, pin: int) -> int:
        return 1 if self.gpio.input(pin) else 0

    def setup_output(self, pin: int, level: int) -> None:
        gpio = self.gpio
        try:
            gpio.setup(pin, gpio.OUT, initial=gpio.HIGH if level else gpio.LOW)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"GPIO{pin}: setup as output failed: {exc}") from exc

    def write(self, pin: int, level: int) -> None:
        self.gpio.output(pin, self.gpio.HIGH if level else self.gpio.LOW)

    def cleanup(self) -> None:
        self.gpio.cleanup()


class SimulatedBackend:
    """Pins in memory. Inputs float to their pull (``none`` reads low) until driven."""

    name = "simulated"

    def __init__(self, state_file: str | None = None) -> None:
        self._lock = threading.Lock()
        self._levels: dict[int, int] = {}
        self._modes: dict[int, str] = {}
        self._callbacks: dict[int, EdgeCallback] = {}
        self._state_file = Path(state_file) if state_file else None
        self.cleaned_up = False
        self._save()

    def setup_input(self, pin: int, pull: Pull, on_edge: EdgeCallback) -> bool:
        with self._lock:
            self._modes[pin] = f"in/pull-{pull}"
            self._levels.setdefault(pin, 1 if pull == "up" else 0)
            self._callbacks[pin] = on_edge
            self._save_locked()
        return True

    def read(self, pin: int) -> int:
        with self._lock:
            return self._levels[pin]

    def setup_output(self, pin: int, level: int) -> None:
        with self._lock:
            self._modes[pin] = "out"
            self._levels[pin] = level
            self._save_locked()

    def write(self, pin: int, level: int) -> None:
        with self._lock:
            if self._modes.get(pin) != "out":
                raise BackendError(f"GPIO{pin} is not set up as an output")
            self._levels[pin] = level
            self._save_locked()

    def cleanup(self) -> None:
        with self._lock:
            self._modes = dict.fromkeys(self._modes, "in/pull-none")
            self._callbacks.clear()
            self.cleaned_up = True
            self._save_locked()

    def drive(self, pin: int, level: int) -> bool:
        """Set the level an outside circuit puts on input ``pin``; True if that was an edge."""
        with self._lock:
            if not self._modes.get(pin, "").startswith("in"):
                raise BackendError(f"GPIO{pin} is not set up as an input")
            if self._levels.get(pin) == level:
                return False
            self._levels[pin] = level
            callback = self._callbacks.get(pin)
            self._save_locked()
        if callback is not None:
            callback(pin)  # outside the lock, like RPi.GPIO's own thread would
        return True

    def _save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        if self._state_file is None:
            return
        state = {
            "pins": {str(p): {"mode": self._modes[p], "level": self._levels.get(p, 0)}
                     for p in sorted(self._modes)},
            "cleaned_up": self.cleaned_up,
        }
        atomic_write_json(self._state_file, state, mode=0o644)  # whole after a crash


def make_backend(kind: str, state_file: str | None = None) -> Backend:
    if kind == "rpi":
        return RpiBackend()
    if kind == "simulated":
        return SimulatedBackend(state_file)
    raise BackendError(f"unknown GPIO backend {kind!r}; expected rpi or simulated")
