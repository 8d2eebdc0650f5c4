"""Facts the jam runner shares. Tunable values come from `params.yaml` (`realtime:`) through `RealtimeSettings`."""

from __future__ import annotations

# Model bundle file names and format: realtime.bundle_format.
STREAMING_TOKENIZERS = ("MIDILike",)  # wire-order events: NoteOn/NoteOff/TimeShift, no duration at onset

# Registry models (`models:/name@alias`) are copied here once per model version; `$JAM_MODEL_CACHE` overrides.
MODEL_CACHE_DIR = "~/.cache/jam-partner/models"
MODEL_CACHE_ENV = "JAM_MODEL_CACHE"
MERGED_DIR = "merged"  # beside a cached copy: its weights with an adapter plan folded in, one file per plan

# Special tokens as miditok names them (vocabulary keys).
PAD_TOKEN = "PAD_None"
BOS_TOKEN = "BOS_None"
EOS_TOKEN = "EOS_None"
TIME_SIG_TOKEN = "TimeSig_4/4"  # miditok starts every encoded piece with it when time signatures are on

# MIDI wire facts.
MIDI_MAX = 127
CC_SUSTAIN = 64
CC_ALL_SOUND_OFF = 120
CC_ALL_NOTES_OFF = 123
PEDAL_DOWN_MIN = 64  # CC value >= 64 is "pressed"
CLOCK_PPQN = 24  # MIDI clock ticks per quarter note

# Tempo bounds for MIDI-clock following (BPM): outside them the clock is treated as noise.
MIN_BPM = 20.0
MAX_BPM = 400.0
CLOCK_WINDOW = 24  # clock intervals averaged: one beat
CLOCK_MIN_INTERVALS = 6  # intervals needed before a clock tempo is trusted
CLOCK_MAX_GAP_S = 0.5  # seconds between clocks beyond which the clock is considered stopped

# Timing.
IDLE_POLL_S = 0.05  # seconds: generation thread wake-up when there is nothing to do (checks the stop flag)
SHUTDOWN_JOIN_S = 5.0  # seconds to wait for the generation thread to finish its current token at exit
JOIN_POLL_S = 0.1  # seconds: main thread wait step, so Ctrl-C is delivered promptly
GIL_SWITCH_S = 0.0005  # seconds; Python's default 5 ms would let generation hold the GIL past a send deadline
PRE_REST_LEAD_S = 0.2  # seconds before a phrase deadline at which its silence is prefilled (at most half the gap)
HELD_KEYS_GAP_FACTOR = 4.0  # phrase ends after this many silence gaps even if a key looks held (lost note-off)
# Seconds a MIDI port stays open after the last send, so queued messages get out. JACK moves them on its next
# process cycles (5 ms each at 256 frames), but a JACK server without realtime scheduling on a busy machine can
# skip 100 ms and more: at 0.1 s a loaded CI box once lost the last two note-offs of the closing all-notes-off.
OUTPUT_FLUSH_S = 0.5
RECORD_TPQ = 480  # ticks per quarter note in the recorded session file

# Generation.
SLIDE_KEEP_FRACTION = 0.5  # share of max_seq_len kept (and re-prefilled) when the context window slides
ANSWER_ROOM_DIVISOR = 4  # call_response keeps max_seq_len / 4 ids free for the next answer's first notes
MAX_TOKENS_PER_BEAT = 64  # safety cap on tokens generated per beat of music (a model stuck on zero-time tokens)
DEFAULT_TEMPO_BPM = 120.0
# Beats: the note-ending rule's limit for bundles written before bundle.json recorded `max_note_beats` (the
# tokenize stage's 99.5th percentile note length); two 4/4 bars, longer than almost any sustained piano note.
DEFAULT_MAX_NOTE_BEATS = 8.0
