"""Shared fixtures: small real audio and MIDI made on the fly, a loopback HTTP server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import Config, config_from_dict
from pipeline.core.constants import OFFLINE_ENV
from pipeline.core.profile import client_env

for _key, _value in {**OFFLINE_ENV, "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
# (pitch, start s, end s): a C-major arpeggio then a few neighbours, one note every 0.5 s (120 BPM).
CLIP_NOTES = [
    (60, 0.0, 0.4),
    (64, 0.5, 0.9),
    (67, 1.0, 1.4),
    (72, 1.5, 1.9),
    (65, 2.0, 2.4),
    (69, 2.5, 2.9),
    (62, 3.0, 3.4),
    (71, 3.5, 3.9),
]


def make_midi(notes: list[tuple[int, float, float]], path: Path, program: int = 0) -> Path:
    """Write a one-track MIDI of `(pitch, start_s, end_s)` notes at velocity 90."""
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    inst = pretty_midi.Instrument(program=program)
    inst.notes = [pretty_midi.Note(velocity=90, pitch=p, start=s, end=e) for p, s, e in notes]
    pm.instruments.append(inst)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def render_midi(midi: Path, wav: Path, sample_rate: int = 22050) -> Path:
    """Render a MIDI file to a WAV with fluidsynth and the GM soundfont (skips the test when unavailable)."""
    if not shutil.which("fluidsynth") or not SOUNDFONT.exists():
        pytest.skip("fluidsynth or FluidR3_GM.sf2 not installed")
    wav.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["fluidsynth", "-ni", "-q", "-F", str(wav), "-r", str(sample_rate), str(SOUNDFONT), str(midi)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return wav


def sine_wav(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 44100, channels: int = 2) -> Path:
    """A plain sine tone WAV (stereo 44.1 kHz by default, so acquire has something to convert)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * freq * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.stack([y] * channels, axis=1) if channels > 1 else y, sr)
    return path


@pytest.fixture(scope="session")
def piano_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(wav, ground-truth mid) of `CLIP_NOTES` rendered on a GM piano: ~6 s including the release tail."""
    root = tmp_path_factory.mktemp("piano_clip")
    midi = make_midi(CLIP_NOTES, root / "clip.mid")
    return render_midi(midi, root / "clip.wav"), midi


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def do_HEAD(self) -> None:
        self.requests.append(self.path)
        super().do_HEAD()

    def copyfile(self, source, outputfile) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # yt-dlp reads only some responses' head
            super().copyfile(source, outputfile)


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1: yields (folder, base URL, list of requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_CountingHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


# --- the spot profile's services (tests/pipeline/test_services.py, tests/flows/test_deploy.py) ---

BUCKET = "jam-spot-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def spot_cfg(tmp: Path, ports: list[int], **project) -> Config:
    s3, mlflow, prefect = ports
    return config_from_dict({
        "project": {"data_dir": str(tmp / "data"), "mlflow_uri": f"http://127.0.0.1:{mlflow}", **project},
        "checkpoint": {"dir": f"s3://{BUCKET}/checkpoints"},
        "services": {
            "prefect_api_url": f"http://127.0.0.1:{prefect}/api",
            "mlflow_artifact_root": f"s3://{BUCKET}/mlflow",
            "dvc_remote": f"s3://{BUCKET}/dvc",
            "s3_endpoint_url": f"http://127.0.0.1:{s3}",
            "state_dir": str(tmp / "services"),
        },
    })  # fmt: skip


@pytest.fixture(scope="session")
def spot_stack(tmp_path_factory):
    """The spot profile's three real servers on free loopback ports, for the session (~12 s to start on 2 cores)."""
    from pipeline.services import down, up

    tmp = tmp_path_factory.mktemp("spot")
    cfg = spot_cfg(tmp, free_ports(3))
    with pytest.MonkeyPatch.context() as mp:  # the servers inherit the AWS variables; the session does not keep them
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        state = up(cfg)
    try:
        yield cfg, state
    finally:
        down(cfg.services.state_dir)


@pytest.fixture
def spot_services(spot_stack, monkeypatch):
    """(cfg, state) of the running servers, with this test's environment pointed at them as `jam` would.

    In-process Prefect clients get the spot server through a settings context too: an earlier test in the same
    session may have left Prefect's own settings on its temporary server, and those outrank the environment.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg, state = spot_stack
    for key, value in {**AWS_ENV, **client_env(cfg.services)}.items():
        monkeypatch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: cfg.services.prefect_api_url}):
        yield cfg, state
