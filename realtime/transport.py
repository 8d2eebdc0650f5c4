"""Where MIDI comes from and goes to: `make_transport(settings)`.

- `PortTransport`: python-rtmidi ports, JACK or ALSA API; virtual ports (others connect to us) or named ports (we
  connect to them). Incoming bytes are parsed here, tolerating running status, stray data and broken sysex.
- `FileTransport`: a MIDI file played back in real time as a simulated human; output to a port or nowhere.
- `MemoryTransport`: in-memory input and output for tests and headless benchmarks.

Input is delivered by callback as `(message, session_seconds)` on the transport's own thread (rtmidi's, or the file
player's), so reading never waits for generation. No transport opens a network socket.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mido
from mido.messages.specs import SPEC_BY_STATUS

from realtime import constants as C

OnMessage = Callable[[mido.Message, float], None]


class TransportError(RuntimeError):
    """A port or file that cannot be opened; the message says what to do."""


class MidiByteParser:
    """Bytes -> mido messages, with running status; anything malformed is dropped, never raised."""

    def __init__(self) -> None:
        self._status: int | None = None  # running status (channel messages only)
        self._buf: list[int] = []
        self._sysex: list[int] | None = None

    def feed(self, data: bytes | list[int]) -> list[mido.Message]:
        out: list[mido.Message] = []
        for byte in data:
            if isinstance(byte, int) and 0 <= byte <= 0xFF:
                self._byte(byte, out)
        return out

    def _byte(self, b: int, out: list[mido.Message]) -> None:
        if b >= 0xF8:  # real-time bytes may appear anywhere, even inside other messages
            _append(out, [b])
            return
        if self._sysex is not None:
            if b < 0x80:
                self._sysex.append(b)
                return
            if b == 0xF7:
                _append(out, [0xF0, *self._sysex, 0xF7])
            self._sysex = None
            if b == 0xF7:
                return
        if b == 0xF0:
            self._sysex, self._status, self._buf = [], None, []
        elif b >= 0x80:
            self._status = b if b < 0xF0 else None
            self._buf = [b]
        elif self._buf:
            self._buf.append(b)
        elif self._status is not None:
            self._buf = [self._status, b]
        if self._buf and len(self._buf) >= _length(self._buf[0]):
            _append(out, self._buf)
            self._buf = []


def _length(status: int) -> int:
    spec = SPEC_BY_STATUS.get(status if status >= 0xF0 else status & 0xF0)
    return spec["length"] if spec else 1


def _append(out: list[mido.Message], data: list[int]) -> None:
    if data[0] not in SPEC_BY_STATUS and data[0] & 0xF0 not in SPEC_BY_STATUS:
        return
    with contextlib.suppress(ValueError, TypeError, KeyError):  # malformed: dropped
        out.append(mido.Message.from_bytes(data))


class Transport:
    """Base: no input, output discarded."""

    description = "none"

    def __init__(self) -> None:
        self.input_done = threading.Event()  # set when the input has ended (file played out)

    def start(self, on_message: OnMessage) -> None:
        """Begin delivering input to `on_message(message, session_seconds)`."""

    def send(self, msg: mido.Message) -> None:
        """Send one message to the output."""

    def close(self) -> None:
        """Release ports and threads. Safe to call more than once."""


class MemoryTransport(Transport):
    """In-memory: `push()` input, read `sent` output. For tests and the headless benchmark."""

    description = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[float, mido.Message]] = []
        self._on_message: OnMessage | None = None
        self._parser = MidiByteParser()
        self._lock = threading.Lock()
        self.started = threading.Event()  # input before this is dropped, as on a port nobody listens to yet

    def start(self, on_message: OnMessage) -> None:
        self._on_message = on_message
        self.started.set()

    def push(self, msg: mido.Message, at: float | None = None) -> None:
        """Deliver one message as if it just arrived (or at session time `at`)."""
        if self._on_message is not None:
            self._on_message(msg, time.monotonic() if at is None else at)

    def push_bytes(self, data: bytes | list[int]) -> None:
        """Deliver raw bytes through the same parser a port uses."""
        for msg in self._parser.feed(data):
            self.push(msg)

    def finish(self) -> None:
        """Mark the input as ended."""
        self.input_done.set()

    def send(self, msg: mido.Message) -> None:
        with self._lock:
            self.sent.append((time.monotonic(), msg))


def pick_api(backend: str) -> int:
    """rtmidi API id for "jack", "alsa" or "auto" (ALSA when /dev/snd/seq exists, else JACK)."""
    import rtmidi

    compiled = rtmidi.get_compiled_api()
    wanted = {"jack": rtmidi.API_UNIX_JACK, "alsa": rtmidi.API_LINUX_ALSA}.get(backend)
    if wanted is None:
        alsa_ok = rtmidi.API_LINUX_ALSA in compiled and Path("/dev/snd/seq").exists()
        jack_ok = rtmidi.API_UNIX_JACK in compiled
        wanted = rtmidi.API_LINUX_ALSA if alsa_ok else rtmidi.API_UNIX_JACK if jack_ok else rtmidi.API_UNSPECIFIED
    if wanted != rtmidi.API_UNSPECIFIED and wanted not in compiled:
        raise TransportError(f"MIDI backend {backend!r} is not compiled into python-rtmidi")
    return wanted


def _match_port(names: list[str], wanted: str, kind: str) -> int:
    for i, name in enumerate(names):
        if name == wanted:
            return i
    hits = [i for i, name in enumerate(names) if wanted.lower() in name.lower()]
    if len(hits) != 1:
        why = "no" if not hits else "several"
        raise TransportError(f"{why} MIDI {kind} port matching {wanted!r}; available: {names or 'none'}")
    return hits[0]


class PortTransport(Transport):
    """Live MIDI through python-rtmidi: virtual ports `<client>-in`/`<client>-out`, or named ports."""

    def __init__(
        self, backend: str, client_name: str, input_port: str | None, output_port: str | None, with_input: bool = True
    ):
        super().__init__()
        self.with_input = with_input
        self.api = pick_api(backend)
        self.client_name = client_name
        self.input_port, self.output_port = input_port, output_port
        self._in = self._out = None
        self._on_message: OnMessage | None = None
        self._parser = MidiByteParser()
        self._last_send = 0.0
        ins = (input_port or f"{client_name}-in (virtual)") if with_input else "-"
        self.description = f"rtmidi {backend}: in {ins}, out {output_port or client_name + '-out (virtual)'}"

    def _client(self, cls):
        try:
            return cls(self.api, name=self.client_name)
        except Exception as err:  # rtmidi raises SystemError/RuntimeError when the API has no server/device
            hint = " (is a JACK server running? e.g. `jackd -d dummy &`)" if "JACK" in str(err).upper() else ""
            raise TransportError(f"cannot open MIDI client: {err}{hint}") from None

    def start(self, on_message: OnMessage) -> None:
        import rtmidi

        self._on_message = on_message
        if self.with_input:
            self._in = self._client(rtmidi.MidiIn)
            self._in.ignore_types(sysex=True, timing=False, active_sense=True)  # keep clock: it carries tempo
            self._in.set_callback(self._on_bytes)
            self._open(self._in, self.input_port, f"{self.client_name}-in", "input")
        self._out = self._client(rtmidi.MidiOut)
        self._open(self._out, self.output_port, f"{self.client_name}-out", "output")

    @staticmethod
    def _open(port, wanted: str | None, own_name: str, kind: str) -> None:
        try:
            if wanted is None:
                port.open_virtual_port(own_name)
            else:
                port.open_port(_match_port(port.get_ports(), wanted, kind), name=own_name)
        except TransportError:
            raise
        except Exception as err:  # rtmidi: no virtual ports on this API, port vanished
            raise TransportError(f"cannot open MIDI {kind} port {wanted or own_name!r}: {err}") from None

    def _on_bytes(self, event: tuple, _data: object = None) -> None:
        stamp = time.monotonic()
        try:
            for msg in self._parser.feed(event[0]):
                if self._on_message is not None:
                    self._on_message(msg, stamp)
        except Exception as err:  # never raise into rtmidi's thread
            print(f"jam: input dropped: {err}", file=sys.stderr)

    def send(self, msg: mido.Message) -> None:
        if self._out is not None:
            self._out.send_message(msg.bytes())
            self._last_send = time.monotonic()

    def close(self) -> None:
        # JACK hands queued output over on its next process cycles: closing at once would drop the final
        # all-notes-off. Give it OUTPUT_FLUSH_S (many cycles: a 256-frame period at 48 kHz is 5 ms).
        time.sleep(max(0.0, self._last_send + C.OUTPUT_FLUSH_S - time.monotonic()))
        for port in (self._in, self._out):
            if port is None:
                continue
            try:
                if port is self._in:
                    port.cancel_callback()
                port.close_port()
                port.delete()
            except Exception:  # closing twice or after the server went away
                pass
        self._in = self._out = None


class FileTransport(Transport):
    """A MIDI file played in real time as the human; output to `sink` (a port transport) or discarded."""

    def __init__(self, path: Path, sink: Transport | None = None, start_delay_s: float = 0.2):
        super().__init__()
        try:
            self.midi = mido.MidiFile(str(path))
        except Exception as err:  # mido raises OSError/EOFError/KeyError on broken files
            raise TransportError(f"cannot read MIDI file {path}: {err}") from None
        self.path, self.sink, self.start_delay_s = path, sink, start_delay_s
        self.description = f"file {path} -> {sink.description if sink else 'no output'}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_message: OnMessage) -> None:
        if self.sink is not None:
            self.sink.start(lambda msg, at: None)
        self._thread = threading.Thread(target=self._play, args=(on_message,), name="jam-file", daemon=True)
        self._thread.start()

    def _play(self, on_message: OnMessage) -> None:
        t0 = time.monotonic() + self.start_delay_s
        offset = 0.0  # seconds from the file start; absolute targets, so playback does not drift
        try:
            for msg in self.midi:  # mido yields messages with .time = seconds since the previous one
                offset += msg.time
                if msg.is_meta:
                    continue
                if self._stop.wait(max(0.0, t0 + offset - time.monotonic())):
                    return
                on_message(msg, time.monotonic())
        finally:
            self.input_done.set()

    def send(self, msg: mido.Message) -> None:
        if self.sink is not None:
            self.sink.send(msg)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if self.sink is not None:
            self.sink.close()


def make_transport(settings) -> Transport:
    """The transport `settings.transport` names ("midi", "file" or "memory").

    Args:
        settings: a `JamSettings` (transport, backend, client_name, input_port, output_port, input_file, extra).
            A transport object already built (tests, embedding) can be passed as `settings.extra["transport"]`.
    """
    if settings.extra.get("transport") is not None:
        return settings.extra["transport"]
    if settings.transport == "memory":
        return MemoryTransport()
    if settings.transport == "file":
        sink = None
        if settings.output_port is not None:
            sink = PortTransport(settings.backend, settings.client_name, None, settings.output_port, with_input=False)
        return FileTransport(Path(settings.input_file), sink)
    return PortTransport(settings.backend, settings.client_name, settings.input_port, settings.output_port)
