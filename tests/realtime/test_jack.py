"""A real MIDI round trip: the runner on virtual JACK ports, a test client playing into it and listening."""

from __future__ import annotations

import threading
import time

import mido

from realtime.runner import make_engine
from realtime.session import JamSession
from realtime.settings import JamSettings
from realtime.transport import MidiByteParser, make_transport
from tests.realtime.conftest import unmatched_notes


def _wait_for_port(port, fragment: str, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i, name in enumerate(port.get_ports()):
            if fragment in name:
                return i
        time.sleep(0.05)
    raise AssertionError(f"no JACK port matching {fragment!r}: {port.get_ports()}")


def test_phrase_in_answer_out_over_jack(jack_server, prepared, tmp_path):
    import rtmidi

    settings = JamSettings(
        transport="midi", backend="jack", client_name="jamrt", silence_gap_s=0.3, response_bars=1,
        seed=0, record=tmp_path / "jack.mid",
    )  # fmt: skip
    session = JamSession(make_engine(prepared, settings), make_transport(settings), settings, tempo_bpm=120.0)
    runner = threading.Thread(target=session.run)
    runner.start()
    player = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="tester")
    listener = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="tester")
    received: list[tuple[float, mido.Message]] = []
    parser = MidiByteParser()
    listener.set_callback(lambda event, _: received.extend((time.monotonic(), m) for m in parser.feed(event[0])))
    try:
        player.open_port(_wait_for_port(player, "jamrt-in"), name="phrase")
        listener.open_port(_wait_for_port(listener, "jamrt-out"), name="answer")
        time.sleep(0.3)  # JACK connects on its next cycles
        for note in (60, 64, 67, 72, 67, 64):
            player.send_message([0x90, note, 90])
            time.sleep(0.1)
            player.send_message([0x80, note, 0])
        phrase_end = time.monotonic()
        deadline = phrase_end + 5.0
        while time.monotonic() < deadline and not any(m.type == "note_on" for _, m in received):
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        session.stop()
        runner.join(timeout=10)
        time.sleep(0.5)  # the closing all-notes-off crosses a JACK cycle or two (later on a loaded box)
        for port in (player, listener):
            port.close_port()
            port.delete()
    msgs = [m for _, m in received]
    answer_at = [t for t, m in received if m.type == "note_on"]
    assert answer_at, f"no answer came back on the output port; session: {session.summary()}"
    assert answer_at[0] - phrase_end < 0.3 + 1.2, "answer too late"  # silence gap + slack for a loaded CI box
    assert unmatched_notes(msgs) == {}, msgs
    assert msgs[-1].is_cc(123), msgs[-5:]
    recorded = mido.MidiFile(tmp_path / "jack.mid")
    assert sum(1 for m in recorded.tracks[0] if m.type == "note_on" and m.velocity) == 6
    assert session.error is None
