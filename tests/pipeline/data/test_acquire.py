"""acquire: local audio/MIDI, yt-dlp from a loopback server, incremental re-runs, and each kind of bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import soundfile as sf

from pipeline.core.files import sha256_file
from pipeline.core.graph import run_stage
from pipeline.core.items import AllItemsFailed
from pipeline.data.acquire import ARCHIVE_NAME, AcquireError, Source, acquire_source, expand_sources
from tests.conftest import make_midi, sine_wav

FAST_NET = {"retries": 1, "backoff_s": 0.01, "socket_timeout_s": 5}


def _manifest(cfg) -> dict[str, dict]:
    path = cfg.stage_dir("acquire") / "manifest.jsonl"
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True, timeout=60)


def _no_temp_files(cfg) -> bool:
    return not [p for p in cfg.stage_dir("acquire").rglob("*") if ".tmp" in p.name]


def _bad(tmp_path: Path, name: str) -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    return tmp_path / "in" / name


def _good_midi(tmp_path: Path) -> Path:
    return make_midi([(60, 0.0, 0.5), (64, 0.5, 1.0)], tmp_path / "in" / "good.mid")


def _run_with_bad(make_cfg, tmp_path: Path, bad: Path | str) -> tuple[dict, object]:
    cfg = make_cfg(sources=[str(_good_midi(tmp_path)), str(bad)])
    report = run_stage("acquire", cfg)
    assert len(report.processed) == 1 and len(report.failed) == 1, report
    assert _no_temp_files(cfg)
    return report.failed, cfg


def test_local_audio_and_midi_then_cached_then_pruned(tmp_path, make_cfg):
    folder = tmp_path / "in"
    wav = sine_wav(folder / "My Take #1.wav", seconds=1.0, sr=44100, channels=2)
    mid = make_midi([(60, 0.0, 0.5), (67, 0.5, 1.0)], folder / "sub" / "tune.mid")
    (folder / "notes.txt").write_text("not a source")
    cfg = make_cfg(sources=[str(folder)])
    assert [s.kind for s in expand_sources(cfg)] == ["audio", "midi"]

    report = run_stage("acquire", cfg)
    rows = _manifest(cfg)
    audio_id = f"my-take-1-{sha256_file(wav)[:8]}"
    assert set(rows) == {audio_id, f"tune-{sha256_file(mid)[:8]}"} and sorted(report.processed) == sorted(rows)
    stored = cfg.stage_dir("acquire") / "audio" / f"{audio_id}.wav"
    info = sf.info(str(stored))
    assert (info.channels, info.samplerate) == (1, 22050) and abs(info.duration - 1.0) < 0.01
    row = rows[audio_id]
    assert row["kind"] == "audio" and row["sha256"] == sha256_file(stored) and row["source"] == str(wav)
    assert {"title", "uploader", "duration_s", "license", "fetched_at"} <= set(row)
    midi_row = next(r for r in rows.values() if r["kind"] == "midi")
    assert (cfg.stage_dir("acquire") / "midi" / f"{midi_row['id']}.mid").read_bytes() == mid.read_bytes()

    again = run_stage("acquire", cfg)
    assert again.processed == [] and sorted(again.cached) == sorted(rows)

    wav.unlink()
    third = run_stage("acquire", cfg)
    assert audio_id not in _manifest(cfg) and not stored.exists() and third.stats["pruned_sources"] == [audio_id]


def test_url_download_from_loopback_then_no_network(tmp_path, make_cfg, http_server):
    root, base, requests = http_server
    sine_wav(root / "take.wav", seconds=1.5)
    url = f"{base}/take.wav"
    cfg = make_cfg(sources=[url], acquire=FAST_NET)

    report = run_stage("acquire", cfg)
    (row,) = _manifest(cfg).values()
    assert report.processed == [row["id"]] and row["id"].startswith("generic-take-")
    assert row["source"] == url and row["kind"] == "audio" and abs(row["duration_s"] - 1.5) < 0.01
    assert sf.info(str(cfg.stage_dir("acquire") / "audio" / f"{row['id']}.wav")).samplerate == 22050
    assert (cfg.stage_dir("acquire") / ARCHIVE_NAME).read_text() == "generic take\n"
    assert requests

    requests.clear()
    again = run_stage("acquire", cfg)
    assert again.cached == [row["id"]] and requests == []  # index + files on disk: not even a listing

    # Index and manifest lost but audio and archive kept: the URL is listed again, the file is not re-downloaded.
    (cfg.stage_dir("acquire") / "index.json").unlink()
    (cfg.stage_dir("acquire") / "manifest.jsonl").unlink()
    third = acquire_source(Source("url", url), cfg, cfg.stage_dir("acquire"))
    assert third[0]["id"] == row["id"] and len(requests) == 1


def test_too_long_download_is_dropped(tmp_path, make_cfg, http_server):
    root, base, _ = http_server
    sine_wav(root / "long.wav", seconds=3.0)
    sources = [f"{base}/long.wav", str(_good_midi(tmp_path))]
    cfg = make_cfg(sources=sources, acquire={"max_duration_s": 2.0, **FAST_NET})
    report = run_stage("acquire", cfg)
    assert next(iter(report.dropped.values())).startswith("longer than acquire.max_duration_s")
    assert not list((cfg.stage_dir("acquire") / "audio").glob("*.wav"))


def _feed(base: str, items: list[tuple[str, str, int | None]]) -> str:
    """A podcast-style RSS feed: yt-dlp's generic extractor lists its enclosures as a playlist."""
    entries = "".join(
        f"<item><title>{title}</title><guid>{title}</guid><enclosure url='{base}/{name}' type='audio/wav' length='1'/>"
        + (f"<itunes:duration>{seconds}</itunes:duration>" if seconds else "")
        + "</item>"
        for title, name, seconds in items
    )
    ns = "xmlns:itunes='http://www.itunes.com/dtds/podcast-1.0.dtd'"
    return f"<?xml version='1.0'?><rss version='2.0' {ns}><channel><title>Takes</title>{entries}</channel></rss>"


def test_playlist_entries_fail_drop_and_succeed_independently(tmp_path, make_cfg, http_server):
    root, base, requests = http_server
    sine_wav(root / "one.wav", seconds=1.0)
    sine_wav(root / "long.wav", seconds=1.0)  # the feed says 999 s: yt-dlp's match_filter skips it
    (root / "bad.wav").write_text("not audio\n" * 50)
    items = [("one", "one.wav", 1), ("long", "long.wav", 999), ("bad", "bad.wav", None)]
    (root / "feed.xml").write_text(_feed(base, items))
    cfg = make_cfg(sources=[f"{base}/feed.xml"], acquire={"max_duration_s": 60, **FAST_NET})

    report = run_stage("acquire", cfg)
    assert len(report.processed) == 1 and len(report.dropped) == 1 and len(report.failed) == 1, report
    (row,) = _manifest(cfg).values()
    assert row["title"] == "one" and row["source"] == f"{base}/one.wav" and row["duration_s"] == 1.0
    assert "longer than" in next(iter(report.dropped.values()))
    assert next(iter(report.failed.values())).startswith("cannot decode audio")

    requests.clear()  # a failed entry: the feed is listed again, the stored take is not fetched again
    again = run_stage("acquire", cfg)
    assert again.processed == [row["id"]] and "/one.wav" not in requests and "/feed.xml" in requests
    assert _manifest(cfg) == {row["id"]: row}

    (root / "feed.xml").unlink()  # the feed goes away (or the network is down): keep what was fetched
    third = run_stage("acquire", cfg)
    assert "HTTP Error 404" in third.failed[f"{base}/feed.xml"] and third.cached == [row["id"]]
    assert _manifest(cfg) == {row["id"]: row}


def test_truncated_wav_fails(tmp_path, make_cfg):
    full = sine_wav(tmp_path / "full.wav", seconds=2.0, channels=1).read_bytes()
    bad = _bad(tmp_path, "cut.wav")
    bad.write_bytes(full[: len(full) // 2 + 1])  # mid-sample: the header promises twice as much
    failed, _ = _run_with_bad(make_cfg, tmp_path, bad)
    assert "corrupt or truncated" in next(iter(failed.values()))


def test_truncated_mp3_fails(tmp_path, make_cfg):
    src = sine_wav(tmp_path / "full.wav", seconds=3.0)
    _ffmpeg("-i", str(src), str(tmp_path / "full.mp3"))
    data = (tmp_path / "full.mp3").read_bytes()
    bad = _bad(tmp_path, "cut.mp3")
    bad.write_bytes(data[: len(data) // 2])
    failed, _ = _run_with_bad(make_cfg, tmp_path, bad)
    assert "truncated audio" in next(iter(failed.values()))


def test_text_file_with_audio_extension_fails(tmp_path, make_cfg):
    bad = _bad(tmp_path, "notes.mp3")
    bad.write_text("these are liner notes, not audio\n" * 20)
    failed, cfg = _run_with_bad(make_cfg, tmp_path, bad)
    assert next(iter(failed.values())).startswith("cannot decode audio")
    assert not (cfg.stage_dir("acquire") / "audio").exists() or not list((cfg.stage_dir("acquire") / "audio").iterdir())


def test_zero_length_file_fails(tmp_path, make_cfg):
    bad = _bad(tmp_path, "empty.wav")
    bad.write_bytes(b"")
    failed, _ = _run_with_bad(make_cfg, tmp_path, bad)
    assert next(iter(failed.values())) == "empty file (0 bytes)"


def test_midi_without_notes_fails(tmp_path, make_cfg):
    bad = make_midi([], tmp_path / "in" / "silent.mid")
    failed, _ = _run_with_bad(make_cfg, tmp_path, bad)
    assert next(iter(failed.values())) == "MIDI has no notes"


def test_malformed_midi_fails_and_failure_is_cached(tmp_path, make_cfg):
    bad = _bad(tmp_path, "broken.mid")
    bad.write_bytes(b"MThd\x00\x00\x00\x06garbage" + bytes(range(40)))
    failed, cfg = _run_with_bad(make_cfg, tmp_path, bad)
    assert next(iter(failed.values())).startswith("malformed MIDI")
    again = run_stage("acquire", cfg)  # same bytes: reported again without re-parsing
    assert again.failed == failed and again.processed == []


def test_unsupported_url_fails(tmp_path, make_cfg, http_server):
    root, base, _ = http_server
    (root / "page.html").write_text("<html><body>no media here</body></html>")
    failed, _ = _run_with_bad(make_cfg, tmp_path, f"{base}/page.html")
    assert "Unsupported URL" in next(iter(failed.values()))


def test_unreachable_url_fails_fast(tmp_path, make_cfg):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/take.wav"
    cfg = make_cfg(sources=[url, str(_good_midi(tmp_path))], acquire={"retries": 3, "backoff_s": 5.0})
    t0 = time.perf_counter()
    report = run_stage("acquire", cfg)
    assert time.perf_counter() - t0 < 5.0  # connection refused is not retried
    assert "Connection refused" in report.failed[url]


def test_url_serving_non_audio_fails_and_cleans_up(tmp_path, make_cfg, http_server):
    root, base, _ = http_server
    (root / "fake.mp3").write_text("not audio at all\n" * 50)
    cfg = make_cfg(sources=[f"{base}/fake.mp3", str(_good_midi(tmp_path))], acquire=FAST_NET)
    report = run_stage("acquire", cfg)
    assert next(iter(report.failed.values())).startswith("cannot decode audio")
    assert not (cfg.stage_dir("acquire") / ARCHIVE_NAME).read_text()  # never archived: retried next run
    assert _no_temp_files(cfg)


def test_missing_and_unsupported_paths(tmp_path, make_cfg):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "doc.pdf").write_bytes(b"%PDF")
    cfg = make_cfg(sources=[str(tmp_path / "nope.wav"), str(tmp_path / "in" / "doc.pdf")])
    with pytest.raises(AllItemsFailed):
        run_stage("acquire", cfg)
    report = json.loads((cfg.stage_dir("acquire") / "report.json").read_text())
    assert report["failed"] == {
        str(tmp_path / "nope.wav"): "no such file",
        str(tmp_path / "in" / "doc.pdf"): "unsupported file type '.pdf'",
    }
    with pytest.raises(AcquireError, match="no such file"):
        acquire_source(Source("invalid", str(tmp_path / "nope.wav")), cfg, tmp_path)


def test_yt_dlp_does_the_retrying_with_doubling_backoff(tmp_path, make_cfg):
    from pipeline.data.acquire.url import _ydl_options

    opts = _ydl_options(make_cfg(acquire={"retries": 4, "backoff_s": 0.5}), tmp_path)
    assert opts["retries"] == opts["fragment_retries"] == opts["extractor_retries"] == 4
    assert [opts["retry_sleep_functions"]["http"](n) for n in range(3)] == [0.5, 1.0, 2.0]


def test_rows_carry_their_style_and_a_source_listed_by_two_styles_belongs_to_neither(tmp_path, make_cfg):
    a, b = (make_midi([(p, 0.0, 0.5), (p + 4, 0.5, 1.0)], tmp_path / f"{n}.mid") for p, n in ((60, "a"), (62, "b")))
    both = tmp_path / "both"
    shared = make_midi([(67, 0.0, 0.5), (71, 0.5, 1.0)], both / "shared.mid")
    styles = {"jazz": {"sources": [str(a), str(shared)]}, "folk": {"sources": [str(b), str(both)]}}
    cfg = make_cfg(styles=styles)
    report = run_stage("acquire", cfg)
    assert {r["style"] for r in _manifest(cfg).values()} == {"jazz", "folk"}
    assert {r["source"]: r["style"] for r in _manifest(cfg).values()} == {str(a): "jazz", str(b): "folk"}
    assert list(report.failed.values()) == ["listed by styles jazz and folk"]
    assert report.stats["styles"] == {"jazz": 1, "folk": 1}
    # moving a source to the other style re-labels its item without acquiring it again
    moved = make_cfg(styles={"jazz": {"sources": [str(a), str(b)]}, "folk": {"sources": [str(shared)]}})
    again = run_stage("acquire", moved)
    assert {r["source"]: r["style"] for r in _manifest(moved).values()} == {str(a): "jazz", str(b): "jazz",
                                                                             str(shared): "folk"}  # fmt: skip
    assert len(again.processed) == 1  # only the shared file, no longer in two styles
