"""Transports: byte parsing that survives garbage, file playback in real time, the factory."""

from __future__ import annotations

import time

import mido
import pytest

from realtime.settings import JamSettings
from realtime.transport import (
    FileTransport,
    MemoryTransport,
    MidiByteParser,
    TransportError,
    _match_port,
    make_transport,
)
from tests.realtime.conftest import phrase_file


def test_parser_running_status_and_garbage():
    p = MidiByteParser()
    msgs = p.feed([0x90, 60, 100, 62, 90, 0xF8, 64, 0])  # running status, with a clock in the middle
    assert [(m.type, getattr(m, "note", None)) for m in msgs] == [
        ("note_on", 60), ("note_on", 62), ("clock", None), ("note_on", 64),
    ]  # fmt: skip
    assert [(m.note, m.velocity) for m in p.feed([5, 6, 7])] == [(5, 6)]  # data bytes reuse the running status
    p2 = MidiByteParser()
    assert p2.feed([5, 6, 7, 0xF4, 0xF5, 300, -1]) == []  # no status yet, undefined statuses, out-of-byte values
    assert [m.type for m in p2.feed([0xF0, 1, 2, 3, 0xF7, 0xC0, 5])] == ["sysex", "program_change"]
    assert [m.type for m in p2.feed([0xF0, 1, 2, 0x80, 60, 0])] == ["note_off"]  # an aborted sysex is dropped


def test_file_transport_plays_in_real_time(tmp_path):
    path = phrase_file(tmp_path / "h.mid", phrases=1)
    got: list[tuple[float, mido.Message]] = []
    transport = FileTransport(path, start_delay_s=0.0)
    start = time.monotonic()
    transport.start(lambda m, t: got.append((t, m)))
    assert transport.input_done.wait(5.0)
    transport.close()
    notes = [(t, m) for t, m in got if m.type == "note_on"]
    assert len(notes) == 8
    assert notes[-1][0] - start == pytest.approx(7 * 0.125 + 0.05, abs=0.1)  # the phrase's own timing


def test_file_transport_rejects_broken_files(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00garbage")
    with pytest.raises(TransportError, match="cannot read MIDI file"):
        FileTransport(bad)


def test_factory_and_port_matching(tmp_path):
    assert isinstance(make_transport(JamSettings(transport="memory")), MemoryTransport)
    file_settings = JamSettings(transport="file", input_file=phrase_file(tmp_path / "h.mid"))
    assert isinstance(make_transport(file_settings), FileTransport)
    names = ["synth:in 128:0", "jam:jam-in", "other:port"]
    assert _match_port(names, "jam:jam-in", "input") == 1
    assert _match_port(names, "JAM-IN", "input") == 1
    with pytest.raises(TransportError, match="no MIDI input port"):
        _match_port(names, "missing", "input")
    with pytest.raises(TransportError, match="several"):
        _match_port(names, ":", "input")
