"""pihub-sensor-gpio: contacts, motion sensors and buttons in; relays and sockets out.

Inputs (``inputs`` in the config) are published on ``<root>/data/<location>/<name>``, retained,
as soon as their debounced state changes and again every ``interval`` seconds::

    {"value": 1, "unit": "bool", "ts": 1718000000.123, "kind": "contact", "pin": 17}

``value`` is the logical state: 1 = active (the pin's level, inverted when ``active_low``).
An input is debounced by waiting until its pin has been still for ``debounce_ms``; a pulse
shorter than that is not published (counted as a bounce).

Outputs (``outputs``) are switched by a command on ``<root>/cmd/sensor-gpio/<output>``:
``on``, ``off``, ``toggle`` or ``{"state": 0|1}``. Send commands without retain: a retained
command that the broker replays when the daemon (re)subscribes is rejected, so that a restart
never switches anything. The new state is published like an input's,
with ``"kind": "output"``. An unknown output or a bad command is rejected (logged, counted),
and nothing is switched. At stop every output goes to its ``safe_state`` and the GPIO library
is cleaned up.

With ``backend: simulated``, ``<root>/sim/sensor-gpio/<input>`` sets the electrical level of an
input: ``0``, ``1``, or a JSON list such as ``[1, 0, 1]`` applied at once (a bouncing contact).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pihub.bus import Message
from pihub.config import BaseConfig, ConfigError, setting
from pihub.daemon import Daemon
from pihub.topics import SEGMENT, Reject, decode_json, shown

from .backends import Backend, BackendError, SimulatedBackend, make_backend

#: levels in one ``sim`` list (each is debounced and may publish: a long list stalls the daemon)
MAX_SIM_LEVELS = 1000
#: characters of a JSON command (``{"state": 0}`` is 12)
MAX_COMMAND_BYTES = 256


@dataclass(kw_only=True)
class InputConfig:
    name: str = setting(help="Input name: the <quantity> of its data topic.",
                        example="front_door", pattern=SEGMENT.pattern)
    pin: int = setting(help="BCM GPIO number.", example=17, min=0, max=53)
    pull: Literal["up", "down", "none"] = setting("up", "Internal pull resistor: up, down or none.")
    active_low: bool = setting(False, "True if a low level means active (contact to ground).")
    debounce_ms: int = setting(50, "The pin must be still this long before a change counts.",
                               min=0, max=60000)
    location: str = setting(help="<location> of its data topic.", example="hall",
                            pattern=SEGMENT.pattern)
    kind: str = setting("contact", "What it is: contact, motion, button, ...",
                        pattern=SEGMENT.pattern)


@dataclass(kw_only=True)
class OutputConfig:
    name: str = setting(help="Output name: its data topic's <quantity> and its cmd topic.",
                        example="heater", pattern=SEGMENT.pattern)
    pin: int = setting(help="BCM GPIO number.", example=27, min=0, max=53)
    initial: bool = setting(False, "State at start: true = on.")
    safe_state: bool = setting(False, "State at stop: true = on.")
    active_low: bool = setting(False, "True if a low level switches it on (most relay boards).")
    location: str = setting(help="<location> of its data topic.", example="hall",
                            pattern=SEGMENT.pattern)


@dataclass(kw_only=True)
class Config(BaseConfig):
    backend: Literal["rpi", "simulated"] = setting(
        "rpi", "rpi: real pins through RPi.GPIO (or rpi-lgpio); simulated: pins in memory, "
        "inputs driven on <topic_root>/sim/sensor-gpio/<input>."
    )
    interval: float = setting(60.0, "Seconds between two publications of every state.",
                              min=1, max=86400)
    poll_interval: float = setting(
        0.05, "Seconds between two reads of an input whose edges the library cannot detect.",
        min=0.01, max=10,
    )
    simulated_state_file: str | None = setting(
        None, "simulated backend: mirror every pin's mode and level to this JSON file, or null."
    )
    inputs: list[InputConfig] = setting(
        [], "Input pins, published on <topic_root>/data/<location>/<name>.",
        example=[{"name": "front_door", "pin": 17, "pull": "up", "active_low": True,
                  "debounce_ms": 50, "location": "hall", "kind": "contact"},
                 {"name": "motion", "pin": 22, "pull": "down", "active_low": False,
                  "debounce_ms": 0, "location": "hall", "kind": "motion"}],
    )
    outputs: list[OutputConfig] = setting(
        [], "Output pins, switched on <topic_root>/cmd/sensor-gpio/<name>.",
        example=[{"name": "heater", "pin": 27, "initial": False, "safe_state": False,
                  "active_low": True, "location": "hall"}],
    )

    def check(self) -> None:
        if not self.inputs and not self.outputs:
            raise ConfigError("inputs", "no inputs and no outputs: nothing to do")
        names: dict[str, str] = {}
        pins: dict[int, str] = {}
        items: list[tuple[str, InputConfig | OutputConfig]] = [
            *((f"inputs[{i}]", c) for i, c in enumerate(self.inputs)),
            *((f"outputs[{i}]", c) for i, c in enumerate(self.outputs)),
        ]
        for key, item in items:
            if item.name in names:
                raise ConfigError(f"{key}.name",
                                  f"{item.name!r} is already the name of {names[item.name]}")
            if item.pin in pins:
                raise ConfigError(f"{key}.pin", f"GPIO{item.pin} is already {pins[item.pin]}")
            names[item.name] = key
            pins[item.pin] = key


@dataclass
class _Input:
    cfg: InputConfig
    state: int = 0
    level: int = 0  # last level seen by the poller (inputs without edge detection)
    polled: bool = False


@dataclass
class _Output:
    cfg: OutputConfig
    state: int = 0


class Debouncer:
    """Calls ``settle(name)`` once an input has had no edge for its debounce time.

    ``edge()`` may be called from any thread (RPi.GPIO calls back from its own); ``settle``
    runs in this object's single worker thread.
    """

    def __init__(self, settle: Callable[[str], None], on_error: Callable[[str], None]) -> None:
        self._settle = settle
        self._on_error = on_error
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gpio-debounce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def edge(self, name: str, delay: float) -> None:
        with self._cond:
            self._due[name] = time.monotonic() + delay
            self._cond.notify()

    def pending(self, name: str) -> bool:
        with self._cond:
            return name in self._due

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    due = [n for n, t in self._due.items() if t <= now]
                    if due:
                        break
                    wait = min(self._due.values()) - now if self._due else None
                    self._cond.wait(wait)
            for name in due:
                with self._cond:
                    if self._due.get(name, float("inf")) > time.monotonic():
                        continue  # a newer edge restarted its wait
                    del self._due[name]
                try:
                    self._settle(name)
                except Exception:
                    self._on_error(name)


def parse_command(text: str, topic: str, current: int) -> int:
    """The state an output command asks for; Reject saying what was expected otherwise."""
    word = text.strip().lower()
    if word == "on":
        return 1
    if word == "off":
        return 0
    if word == "toggle":
        return 1 - current
    if word.startswith("{"):
        if len(text) > MAX_COMMAND_BYTES:
            raise Reject(f"command on {topic}: at most {MAX_COMMAND_BYTES} characters, got "
                         f"{len(text)}: {shown(text)}")
        data = decode_json(text.encode("utf-8"), topic)
        state = data.get("state") if isinstance(data, dict) else None
        if type(state) is int and state in (0, 1):
            return state
        raise Reject(f"command on {topic}: 'state' must be 0 or 1, got {shown(state)}")
    raise Reject(f"command on {topic}: expected on, off, toggle or {{\"state\": 0|1}}, "
                 f"got {shown(text)}")


def parse_levels(text: str, topic: str) -> list[int]:
    """A sim payload: ``0``, ``1`` or a JSON list of at most MAX_SIM_LEVELS of them."""
    word = text.strip()
    if word in ("0", "1"):
        return [int(word)]
    if word.startswith("["):
        # "[0, 1, ...]" of MAX_SIM_LEVELS levels is shorter than this (unless padded with spaces)
        if len(word) > 8 * MAX_SIM_LEVELS + 2:
            raise Reject(f"payload on {topic}: a list of at most {MAX_SIM_LEVELS} levels, got "
                         f"{len(word)} characters: {shown(word)}")
        data = decode_json(word.encode("utf-8"), topic)
        if isinstance(data, list) and len(data) > MAX_SIM_LEVELS:
            raise Reject(f"payload on {topic}: a list of at most {MAX_SIM_LEVELS} levels, got "
                         f"{len(data)}")
        if isinstance(data, list) and data and all(type(v) is int and v in (0, 1) for v in data):
            return data
    raise Reject(f"payload on {topic}: expected 0, 1 or a JSON list of 0/1, got {shown(word)}")


class GpioSensor(Daemon[Config]):
    name = "sensor-gpio"
    config_class = Config
    description = "Publish GPIO inputs (contacts, motion, buttons) and switch GPIO outputs."

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
        self._lock = threading.Lock()
        self.inputs = {c.name: _Input(c) for c in config.inputs}
        self._input_by_pin = {c.pin: c.name for c in config.inputs}
        self.outputs = {c.name: _Output(c, state=int(c.initial)) for c in config.outputs}
        self.debouncer = Debouncer(self._settle, self._settle_failed)
        try:
            self.backend: Backend = make_backend(config.backend, config.simulated_state_file)
        except BackendError as exc:
            raise ConfigError("backend", str(exc)) from exc
        except OSError as exc:
            raise ConfigError("simulated_state_file", f"cannot write "
                              f"{config.simulated_state_file}: {exc.strerror or exc}") from exc
        key = "outputs"
        try:
            for i, out in enumerate(self.outputs.values()):
                key = f"outputs[{i}].pin"
                self._setup_output(out)
            for i, inp in enumerate(self.inputs.values()):
                key = f"inputs[{i}].pin"
                self._setup_input(inp)
        except (BackendError, OSError) as exc:
            self.backend.cleanup()
            raise ConfigError(key, str(exc)) from exc

    def _setup_output(self, out: _Output) -> None:
        self.backend.setup_output(out.cfg.pin, self._level(out.cfg, out.state))
        self.log.info("output %s on GPIO%d: %s", out.cfg.name, out.cfg.pin,
                      "on" if out.state else "off")

    def _setup_input(self, inp: _Input) -> None:
        edges = self.backend.setup_input(inp.cfg.pin, inp.cfg.pull, self._on_edge)
        inp.level = self.backend.read(inp.cfg.pin)
        inp.state = inp.level ^ int(inp.cfg.active_low)
        inp.polled = not edges
        self.log.info("input %s on GPIO%d (pull %s%s): %d%s", inp.cfg.name, inp.cfg.pin,
                      inp.cfg.pull, ", active low" if inp.cfg.active_low else "", inp.state,
                      "" if edges else f"; no edge detection, polled every "
                      f"{self.config.poll_interval:g} s")

    @staticmethod
    def _level(cfg: OutputConfig | InputConfig, state: int) -> int:
        return state ^ int(cfg.active_low)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:
        pins: list[InputConfig | OutputConfig] = [*config.inputs, *config.outputs]
        return [f"data/{pin.location}/{pin.name}" for pin in pins]

    def setup(self) -> None:
        self.debouncer.start()
        self.subscribe(self.topics.sub("cmd", self.name, "+"), self.on_command)
        if isinstance(self.backend, SimulatedBackend):
            self.subscribe(self.topics.sub("sim", self.name, "+"), self.on_sim)
        if any(inp.polled for inp in self.inputs.values()):
            self.every(self.config.poll_interval, self.poll, name="poll")
        self.every(self.config.interval, self.publish_all)

    def shutdown(self) -> None:
        self.debouncer.stop()
        with self._lock:
            for out in self.outputs.values():
                safe = int(out.cfg.safe_state)
                try:
                    self.backend.write(out.cfg.pin, self._level(out.cfg, safe))
                except Exception as exc:
                    self.count("errors")
                    self.log.error("output %s: cannot switch to its safe state: %s",
                                   out.cfg.name, exc)
                    continue
                if out.state != safe:
                    self.log.info("output %s -> %s (safe state)", out.cfg.name,
                                  "on" if safe else "off")
                out.state = safe
                self._publish_output(out)
            self.backend.cleanup()
        self.log.info("GPIO cleaned up")

    def heartbeat_extra(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.backend.name,
                "inputs": {n: i.state for n, i in self.inputs.items()},
                "outputs": {n: o.state for n, o in self.outputs.items()},
            }

    # ------------------------------------------------------------------ inputs

    def _on_edge(self, pin: int) -> None:
        """Any thread (RPi.GPIO's own): note the edge, the debouncer does the rest."""
        name = self._input_by_pin.get(pin)
        if name is None:
            return
        self.count("edges")
        self.debouncer.edge(name, self.inputs[name].cfg.debounce_ms / 1000.0)

    def _settle(self, name: str) -> None:
        with self._lock:
            inp = self.inputs[name]
            state = self.backend.read(inp.cfg.pin) ^ int(inp.cfg.active_low)
            if state == inp.state:
                self.count("bounces")
                self.log.debug("input %s: edges, but still %d after %d ms", name, state,
                               inp.cfg.debounce_ms)
                return
            inp.state = state
            self.count("changes")
            self.log.info("input %s -> %d", name, state)
            self._publish_input(inp)

    def _settle_failed(self, name: str) -> None:
        self.count("errors")
        self.log.exception("input %s: reading its new state failed", name)

    def poll(self) -> None:
        """Main thread: inputs whose edges the library cannot detect."""
        for inp in self.inputs.values():
            if not inp.polled:
                continue
            level = self.backend.read(inp.cfg.pin)
            if level != inp.level:
                inp.level = level
                self._on_edge(inp.cfg.pin)

    def _publish_input(self, inp: _Input) -> None:
        self.publish_measurement(inp.cfg.location, inp.cfg.name, inp.state, "bool",
                                 kind=inp.cfg.kind, pin=inp.cfg.pin)

    # ------------------------------------------------------------------ outputs

    def on_command(self, msg: Message) -> None:
        target = msg.topic.rsplit("/", 1)[-1]
        with self._lock:
            out = self.outputs.get(target)
            if out is None:
                raise Reject(f"command on {shown(msg.topic)}: no output {shown(target)}; outputs: "
                             f"{', '.join(self.outputs) or 'none'}")
            if msg.retain:
                raise Reject(f"command on {msg.topic} is retained; send commands without "
                             "retain so that they are not replayed")
            state = parse_command(msg.text(), msg.topic, out.state)
            self.backend.write(out.cfg.pin, self._level(out.cfg, state))
            self.count("commands")
            if state != out.state:
                self.log.info("output %s -> %s (command %r)", target, "on" if state else "off",
                              msg.text()[:40])
            out.state = state
            self._publish_output(out)

    def _publish_output(self, out: _Output) -> None:
        self.publish_measurement(out.cfg.location, out.cfg.name, out.state, "bool",
                                 kind="output", pin=out.cfg.pin)

    # ------------------------------------------------------------------ both

    def publish_all(self) -> None:
        """Every ``interval``: each state again, and inputs checked against their pins."""
        with self._lock:
            for inp in self.inputs.values():
                if not self.debouncer.pending(inp.cfg.name):
                    state = self.backend.read(inp.cfg.pin) ^ int(inp.cfg.active_low)
                    if state != inp.state:
                        self.count("missed_edges")
                        self.log.warning("input %s is %d but no edge was seen; publishing it",
                                         inp.cfg.name, state)
                        inp.state = state
                self._publish_input(inp)
            for out in self.outputs.values():
                self._publish_output(out)

    # ------------------------------------------------------------------ simulation

    def on_sim(self, msg: Message) -> None:
        name = msg.topic.rsplit("/", 1)[-1]
        inp = self.inputs.get(name)
        if inp is None:
            raise Reject(f"sim level on {shown(msg.topic)}: no input {shown(name)}; inputs: "
                         f"{', '.join(self.inputs) or 'none'}")
        levels = parse_levels(msg.text(), msg.topic)
        backend = self.backend
        assert isinstance(backend, SimulatedBackend)
        for level in levels:
            backend.drive(inp.cfg.pin, level)
        self.log.debug("sim: %s driven %s", name, shown(levels))


main = GpioSensor.main

if __name__ == "__main__":
    sys.exit(main())
