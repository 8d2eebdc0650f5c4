"""Fixtures for the jam runner: a tiny random bundle, prepared engines, simulated humans, a JACK server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import mido
import pytest

for _key, _value in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

TINY = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "bpe_vocab": 460, "max_seq_len": 96}


def build_tiny_bundle(dst: Path, adapters: tuple[str, ...] = ("style", "alt")) -> Path:
    """A complete format-1 bundle: tiny LlamaForCausalLM (save_pretrained), BPE-trained MIDILike tokenizer with
    PAD/BOS/EOS, random LoRA adapters under adapters/<name> (peft save_pretrained), bundle.json."""
    from realtime.synthetic import make_random_bundle

    return make_random_bundle(dst, adapters=adapters, seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_bundle_master(tmp_path_factory) -> Path:
    """Built once per test session (BPE training and peft are the slow part)."""
    import torch

    torch.set_num_threads(1)
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def tiny_bundle(tmp_path, tiny_bundle_master) -> Path:
    """A private copy of the tiny bundle in tmp_path (tests may edit it)."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_master, dst)
    return dst


@pytest.fixture
def prepared(tiny_bundle_master):
    """The tiny bundle loaded with its default adapter folded in."""
    from realtime.bundle import load_bundle

    return load_bundle(tiny_bundle_master, device="cpu")


@pytest.fixture
def engine(prepared):
    """A seeded streaming engine over the tiny bundle."""
    from realtime.runner import make_engine
    from realtime.settings import JamSettings

    return make_engine(prepared, JamSettings(seed=0, transport="memory"))


def phrase_file(path: Path, phrases: int = 2, gap_s: float = 1.6) -> Path:
    """A simulated human: `phrases` 8-note phrases (1 s each) separated by `gap_s` of silence."""
    from realtime.synthetic import write_phrases_midi

    return write_phrases_midi(path, phrases, seed=3, gap_s=gap_s)


def unmatched_notes(messages: list[mido.Message]) -> dict[tuple[int, int], int]:
    """(channel, note) -> note-ons never ended by a note-off, over a message sequence."""
    count: dict[tuple[int, int], int] = {}
    for msg in messages:
        if msg.type not in ("note_on", "note_off"):
            continue
        key = (msg.channel, msg.note)
        count[key] = count.get(key, 0) + (1 if msg.type == "note_on" and msg.velocity > 0 else -1)
        count[key] = max(0, count[key])  # a spare note-off is harmless
    return {k: v for k, v in count.items() if v}


@pytest.fixture
def jack_server(monkeypatch):
    """A private `jackd -d dummy` server (unique name) for the test; stopped and reaped afterwards."""
    jackd = shutil.which("jackd")
    if jackd is None:
        pytest.skip("jackd is not installed (apt-get install jackd2): no real MIDI ports to test against")
    name = f"jamtest-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("JACK_DEFAULT_SERVER", name)
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    monkeypatch.setenv("JACK_NO_AUDIO_RESERVATION", "1")
    cmd = [jackd, "--no-realtime", "-n", name, "-d", "dummy", "-r", "48000", "-p", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_jack(proc)
        yield name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_for_jack(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    import rtmidi

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jackd exited: {proc.stderr.read().decode(errors='replace')[-500:]}")
        try:
            probe = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="probe")
            probe.delete()
            return
        except Exception:  # server not up yet
            time.sleep(0.1)
    pytest.fail("jackd did not come up in time")
