"""Random-weight bundles and simulated human phrases, for tests and the latency benchmark.

`make_random_bundle` writes a complete format-1 bundle (tokenizer.json, base/, adapters/<name>/, bundle.json) with
the same tokenizer settings as the pipeline's tokenize stage. The music it plays is noise; its shapes and costs are
those of a real demo model, which is what latency measurements need.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from realtime import constants as C
from realtime.bundle_format import SPECIAL_TOKENS, base_config, special_ids, write_bundle
from realtime.codec import NoteEvent

TOKENIZER_PARAMS = {  # mirrors pipeline.data.tokenize.make_tokenizer (realtime may not import pipeline)
    "pitch_range": (21, 109),
    "beat_res": {(0, 4): 8, (4, 12): 4},
    "num_velocities": 16,
    "special_tokens": list(SPECIAL_TOKENS),
    "use_programs": False,
    "encode_ids_split": "bar",
}


def random_phrase(rng: random.Random, start: float, n_notes: int = 8, step_s: float = 0.125) -> list[NoteEvent]:
    """A monophonic run of `n_notes` notes, one every `step_s` seconds from `start`, each held ~80% of a step."""
    events, pitch = [], rng.randint(55, 72)
    for i in range(n_notes):
        pitch = min(96, max(36, pitch + rng.choice([-4, -3, -2, -1, 1, 2, 3, 5])))
        on = start + i * step_s
        events += [NoteEvent("on", pitch, rng.randint(50, 110), on), NoteEvent("off", pitch, 0, on + 0.8 * step_s)]
    return sorted(events, key=lambda e: e.time)


def write_phrases_midi(path: Path, phrases: int, seed: int = 0, gap_s: float = 1.0, n_notes: int = 8) -> Path:
    """A MIDI file of `phrases` short phrases separated by `gap_s` of silence (120 BPM, one track)."""
    import mido

    rng, events, t = random.Random(seed), [], 0.0
    for _ in range(phrases):
        phrase = random_phrase(rng, t, n_notes)
        events += phrase
        t = phrase[-1].time + gap_s
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(120))])
    last = 0
    for e in events:
        tick = round(e.time * 960)  # 480 ticks per beat at 2 beats per second
        kind = "note_on" if e.kind == "on" else "note_off"
        track.append(mido.Message(kind, note=e.pitch, velocity=e.velocity, time=tick - last))
        last = tick
    midi.tracks.append(track)
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.save(str(path))
    return path


def make_tokenizer(bpe_vocab: int | None = None, seed: int = 0):
    """A MIDILike tokenizer like the pipeline's; BPE-trained on random phrases to `bpe_vocab` ids if given."""
    import miditok

    params = dict(TOKENIZER_PARAMS)
    tokenizer = miditok.MIDILike(miditok.TokenizerConfig(**params))
    if bpe_vocab and bpe_vocab > len(tokenizer):
        with tempfile.TemporaryDirectory() as tmp:
            files = [write_phrases_midi(Path(tmp) / f"{i}.mid", 12, seed + i, 0.5) for i in range(24)]
            tokenizer.train(vocab_size=bpe_vocab, model="BPE", files_paths=files)
    return tokenizer


def make_random_bundle(
    dst: Path,
    hidden: int = 192,
    layers: int = 4,
    heads: int = 6,
    intermediate: int = 512,
    kv_heads: int | None = None,
    bpe_vocab: int | None = 1024,
    max_seq_len: int = 256,
    adapters: tuple[str, ...] = ("style",),
    lora_r: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random bundle folder and return it.

    Args:
        dst: folder to create (must not hold a bundle already).
        hidden, layers, heads, intermediate: LlamaForCausalLM size (demo default: ~2M parameters).
        kv_heads: grouped-query attention's key/value heads (None: `heads`).
        bpe_vocab: BPE vocabulary size; None keeps the ~400 base tokens.
        max_seq_len: context length (max_position_embeddings and bundle.json).
        adapters: names of random LoRA adapters (q/k/v/o projections) saved under adapters/<name>.
        lora_r: adapter rank.
        seed: torch and BPE seed.
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer(bpe_vocab, seed)
    torch.manual_seed(seed)
    arch = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
            "tie_word_embeddings": True}  # fmt: skip
    base = LlamaForCausalLM(base_config(len(tokenizer), special_ids(tokenizer), max_seq_len, **arch))
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(Path(tmp) / "base")
        folders = {name: Path(tmp) / name for name in adapters}
        for i, folder in enumerate(folders.values()):
            save_random_adapter(Path(tmp) / "base", folder, lora_r, seed + 1 + i)
        meta = {"tempo_bpm": C.DEFAULT_TEMPO_BPM, "max_seq_len": max_seq_len, "source_run_id": "random"}
        write_bundle(dst, Path(tmp) / "base", tokenizer, folders, **meta)
    return dst


def save_random_adapter(base_dir: Path, out_dir: Path, r: int, seed: int) -> Path:
    """A peft LoRA adapter on the attention projections with random (non-zero) B, saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from realtime.lora import quiet_peft

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, local_files_only=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # peft starts B at zero (a no-op adapter); make it do something
    peft_model.save_pretrained(out_dir)
    return out_dir
