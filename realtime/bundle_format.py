"""The model bundle format: its file names, its one writer, its one reader, its tokenizer and special ids.

A bundle (docs/ARCHITECTURE.md, "Model bundle") is a folder:
  bundle.json       {"format": 1, "tokenizer", "base", "adapters": {name: folder}, "default_adapter", "tempo_bpm",
                    "max_seq_len", "source_run_id", "step", "metrics", "config", ...}
  tokenizer.json    miditok params file (the kind is recorded inside)
  base/             transformers `save_pretrained` of a LlamaForCausalLM
  adapters/<name>/  peft `save_pretrained` of a LoRA adapter
Training writes it (`write_bundle`); evaluation, the registry and the jam runner read it (`read_bundle`). It lives in
realtime/ because the runner may not import pipeline/; pipeline/ imports it from here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = 1
BUNDLE_ARTIFACT = "bundle"  # artifact path of the bundle folder inside a training run
TOKENIZER_FILE = "tokenizer.json"
BASE_DIR = "base"
ADAPTERS_DIR = "adapters"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file in every adapter folder
MODEL_CONFIG = "config.json"  # transformers' file in the base folder
SPECIAL_TOKENS = ("PAD", "BOS", "EOS")  # miditok names them "<NAME>_None"; no MASK: the model is a causal LM


class BundleError(RuntimeError):
    """A bundle (or its tokenizer) that cannot be found or used; the message says what is wrong and where."""


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path | str):
    """The miditok tokenizer saved at `path` (any kind; the kind is read from the file, no hub access).

    Raises:
        BundleError: the file is missing, unreadable or names no miditok tokenizer.
    """
    import miditok

    path = Path(path)
    try:
        kind = json.loads(path.read_text()).get("tokenization")
    except (OSError, ValueError, AttributeError) as err:
        raise BundleError(f"{path}: unreadable tokenizer ({err})") from None
    if not isinstance(kind, str) or not isinstance(getattr(miditok, kind, None), type):
        raise BundleError(f"{path}: not a miditok tokenizer file (tokenization {kind!r})")
    return getattr(miditok, kind)(params=path)


def special_ids(tokenizer) -> dict[str, int]:
    """`{"pad_id", "bos_id", "eos_id"}` as they appear in encoded sequences (base ids survive BPE unchanged).

    Raises:
        BundleError: a special token is missing, or BPE moved one (windows would be padded wrongly).
    """
    import miditok

    ids = {}
    for name in SPECIAL_TOKENS:
        token = f"{name}_None"
        if token not in tokenizer.vocab:
            raise BundleError(f"tokenizer has no {token} token (needs {', '.join(SPECIAL_TOKENS)})")
        ids[f"{name.lower()}_id"] = tokenizer.vocab[token]
    if tokenizer.is_trained:
        for key, base_id in ids.items():
            if tokenizer.vocab_model.get(chr(base_id + miditok.constants.CHR_ID_START)) != base_id:
                raise BundleError(f"{key}: BPE moved special token {base_id}; windows would be padded wrongly")
    return ids


def base_config(vocab_size: int, ids: dict[str, int], max_seq_len: int, **arch: Any):
    """The `LlamaConfig` of a bundle's base: `ids` from `special_ids`, `arch` = LlamaConfig size fields."""
    from transformers import LlamaConfig

    arch.setdefault("num_key_value_heads", arch.get("num_attention_heads"))
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_seq_len,
        pad_token_id=ids["pad_id"],
        bos_token_id=ids["bos_id"],
        eos_token_id=ids["eos_id"],
        **arch,
    )


# ---------------------------------------------------------------- read


def read_bundle(path: Path | str) -> dict[str, Any]:
    """bundle.json of the bundle folder `path`, checked against the format-1 contract and the files it names.

    Raises:
        BundleError: no bundle.json, an unreadable or other-format one, or a named file or folder missing.
    """
    path = Path(path)
    file = path / BUNDLE_FILE
    if not file.is_file():
        raise BundleError(f"{path}: not a bundle folder (no {BUNDLE_FILE})")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{file}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT or not meta.get("base"):
        raise BundleError(f"{file}: not a format-{BUNDLE_FORMAT} bundle (needs format, base, tokenizer)")
    if not meta.get("tokenizer"):
        raise BundleError(f"{file}: not a format-{BUNDLE_FORMAT} bundle (needs format, base, tokenizer)")
    if not (path / meta["base"] / MODEL_CONFIG).is_file():
        raise BundleError(f"{file}: base {meta['base']!r} has no {MODEL_CONFIG} (not a save_pretrained folder)")
    if not (path / meta["tokenizer"]).is_file():
        raise BundleError(f"{file}: tokenizer {meta['tokenizer']!r} is missing")
    adapters = meta.setdefault("adapters", {}) or {}
    for name, rel in adapters.items():
        if not (path / rel / ADAPTER_CONFIG).is_file():
            raise BundleError(f"{file}: adapter {name!r} has no {ADAPTER_CONFIG} under {rel!r}")
    default = meta.setdefault("default_adapter", None)
    if default and default not in adapters:
        raise BundleError(f"{file}: default adapter {default!r} is not one of its adapters {sorted(adapters)}")
    return meta


# ---------------------------------------------------------------- write


def write_bundle(
    dest: Path,
    base: Any,
    tokenizer: Any,
    adapters: dict[str, Any] | None = None,
    *,
    step: int = 0,
    metrics: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write (or replace) the bundle entries in `dest`; bundle.json goes last, so a reader never sees a half bundle.

    Each of `base`, `tokenizer` and the adapters is a path to copy or an object to save (`save_pretrained`,
    miditok's `save`). Entries are staged in a hidden folder inside `dest`, then renamed into place.

    Args:
        dest: bundle folder (may hold other files: reports, plots; they are left alone).
        base: a save_pretrained folder, or a transformers model.
        tokenizer: a miditok tokenizer.json, or a miditok tokenizer.
        adapters: name -> peft save_pretrained folder, or a peft model (its default adapter is saved).
        step: optimizer steps the weights were trained for.
        metrics: the training's final metrics (train_loss, valid_loss...).
        config: the resolved config the training ran with (JSON-able dict).
        **meta: more bundle.json keys (tempo_bpm, max_seq_len, source_run_id, base_ref...).

    Returns:
        The path of bundle.json.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / BUNDLE_FILE).unlink(missing_ok=True)  # the old bundle is gone the moment its entries start changing
    stage = Path(tempfile.mkdtemp(prefix=".bundle-", dir=dest))
    try:
        _save(base, stage / BASE_DIR)
        _save(tokenizer, stage / TOKENIZER_FILE)
        (stage / ADAPTERS_DIR).mkdir()
        for name, src in (adapters or {}).items():
            _save(src, stage / ADAPTERS_DIR / name)
        for entry in (BASE_DIR, TOKENIZER_FILE, ADAPTERS_DIR):
            _replace(stage / entry, dest / entry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    names = list(adapters or {})
    info = {"format": BUNDLE_FORMAT, "tokenizer": TOKENIZER_FILE, "base": BASE_DIR,
            "adapters": {name: f"{ADAPTERS_DIR}/{name}" for name in names},
            "default_adapter": names[0] if names else None,
            "step": int(step), "metrics": dict(metrics or {}), "config": config or {}}  # fmt: skip
    _write_text(dest / BUNDLE_FILE, json.dumps({**info, **meta}, indent=2, sort_keys=True) + "\n")
    return dest / BUNDLE_FILE


def _base_digest(bundle: Path, meta: dict[str, Any]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((bundle / meta["base"]).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def combine_bundles(dest: Path, bundles: dict[str, Path], **meta: Any) -> Path:
    """One bundle holding the adapter of each of `bundles` (name -> a one-style bundle on the same base).

    The first name is the default adapter. bundle.json's `styles` keeps, per name, the source bundle's run id, step
    and metrics; the rest (tempo, context, note limit, config) comes from the first bundle, overridden by `meta`.

    Raises:
        BundleError: a source is not a bundle, lacks its adapter, or sits on different base weights.
    """
    infos = {name: read_bundle(path) for name, path in bundles.items()}
    first_name = next(iter(bundles))
    first, digest = infos[first_name], _base_digest(bundles[first_name], infos[first_name])
    adapters = {}
    for name, info in infos.items():
        if name not in info["adapters"]:
            raise BundleError(f"{bundles[name]}: no adapter {name!r} (has {sorted(info['adapters'])})")
        if name != first_name and _base_digest(bundles[name], info) != digest:
            raise BundleError(f"{bundles[name]}: base weights differ from {first_name}'s: adapters cannot be combined")
        adapters[name] = bundles[name] / info["adapters"][name]
    styles = {n: {k: i.get(k) for k in ("source_run_id", "step", "metrics")} for n, i in infos.items()}
    layout = ("format", "tokenizer", "base", "adapters", "default_adapter", "step", "metrics", "style")
    keep = {k: v for k, v in first.items() if k not in layout}  # step and metrics are per style, under `styles`
    base, tokenizer = bundles[first_name] / first["base"], bundles[first_name] / first["tokenizer"]
    keep.update(styles=styles, source_run_id="", **meta)
    return write_bundle(dest, base, tokenizer, adapters, **keep)


def _save(src: Any, staged: Path) -> None:
    """Put `src` at `staged`: copy a path (even one that already is the bundle's entry), save an object."""
    import miditok

    if isinstance(src, (str, Path)):
        (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, staged)
    elif isinstance(src, miditok.MusicTokenizer):
        src.save(staged)  # its own save_pretrained would make a hub-style folder
    elif hasattr(src, "peft_config"):
        for peft_cfg in src.peft_config.values():
            peft_cfg.base_model_name_or_path = BASE_DIR  # bundle-relative: no hub, no training machine path
        src.save_pretrained(staged, save_embedding_layers=False)  # False: no hub lookup for the base's embeddings
    else:
        src.save_pretrained(staged)


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    src.rename(dst)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
