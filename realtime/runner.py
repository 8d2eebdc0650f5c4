"""`run_jam(settings)`: load the bundle, open the transport, run the session, print the latency report.

The one entry point shared by `jam play` (pipeline/cli.py) and `python -m realtime`; it needs no pipeline code.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

import torch

from realtime import constants as C
from realtime.bundle import Bundle, load_bundle, note_limits
from realtime.codec import TokenCodec
from realtime.engine import Engine, Sampling
from realtime.session import JamSession
from realtime.settings import JamSettings
from realtime.transport import make_transport


def prepare(settings: JamSettings) -> Bundle:
    """Set torch threads and load the bundle as `settings` asks."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    return load_bundle(
        settings.model_ref,
        adapters=settings.adapters,
        normalize=settings.normalize_weights,
        dtype=settings.dtype,
        quantization=settings.quantization,
        device=settings.device,
        tracking_uri=settings.tracking_uri,
    )


def make_engine(bundle: Bundle, settings: JamSettings) -> Engine:
    """A streaming engine over a prepared bundle with the settings' sampling controls."""
    sampling = Sampling(settings.temperature, settings.top_p, settings.top_k, settings.seed)
    max_len = min(settings.max_seq_len or bundle.max_seq_len, bundle.max_seq_len)
    max_note, poly = note_limits(bundle.meta, settings.max_note_beats, settings.max_polyphony)
    codec = TokenCodec(bundle.tokenizer)
    return Engine(bundle.model, codec, max_len, sampling, max_note_beats=max_note, max_polyphony=poly)


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C (so `finally` runs all-notes-off); returns a function restoring the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    return lambda: signal.signal(signal.SIGTERM, old)


def run_jam(settings: JamSettings, bundle: Bundle | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run one session to its end and return its summary (latency percentiles, RTF, counts).

    Args:
        settings: what to load, how to listen and answer, where MIDI goes.
        bundle: an already prepared bundle (tests, benchmarks); loaded from `settings` if None.
        log: where progress lines go (stderr by default).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bundle = bundle or prepare(settings)
    log(f"jam: model {bundle.describe()}")
    engine = make_engine(bundle, settings)
    transport = make_transport(settings)
    tempo = settings.tempo_bpm or bundle.tempo_bpm
    session = JamSession(engine, transport, settings, tempo)
    log(f"jam: {settings.mode} at {tempo:g} BPM via {transport.description}; Ctrl-C to stop")
    restore = _sigterm_as_interrupt()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(C.GIL_SWITCH_S)  # threads waiting on the GIL (input, scheduler) get it sooner
    try:
        session.run()
    except KeyboardInterrupt:
        log("jam: stopped")
    finally:
        sys.setswitchinterval(switch)
        restore()
        summary = session.summary()
        if summary["responses"]:
            log(f"jam: {session.stats.report()}")
        if summary["record"]:
            log(f"jam: session recorded to {summary['record']}")
    return summary
