from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import Config, ConfigError, load_config, parse_override, section_json

REPO = Path(__file__).resolve().parents[3]  # tests/pipeline/core/ -> repo root


def test_repo_params_validate():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.tokenize.max_seq_len > cfg.tokenize.overlap
    assert cfg.demo.enabled


def test_missing_default_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("params.yaml") == Config()


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_types_and_dotted_keys(tmp_path):
    cfg = load_config(None, ["augment.pitch_offsets=[-1, 1]", "clean.min_notes=3", "project.data_dir=/x"])
    assert cfg.augment.pitch_offsets == [-1, 1]
    assert cfg.clean.min_notes == 3
    assert cfg.project.data_dir == Path("/x")


@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        ("tokenize.max_seq_len=4", "tokenize.max_seq_len"),
        ("clean.min_notes=abc", "clean.min_notes"),
        ("transcribe.nonsense=1", "transcribe.nonsense"),
        ("augment.tempo_factors=[0, 1]", "augment.tempo_factors"),
    ],
)
def test_bad_value_names_the_dotted_key(override, dotted):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert dotted in str(err.value)


def test_dvc_remote_is_a_url_or_an_absolute_path():
    assert load_config(None, ["services.dvc_remote=/content/drive/MyDrive/dvc"]).services.dvc_remote.startswith("/")
    assert load_config(None, ["services.dvc_remote=s3://b/dvc"]).services.dvc_remote == "s3://b/dvc"
    with pytest.raises(ConfigError, match=r"services.dvc_remote.*absolute path"):
        load_config(None, ["services.dvc_remote=relative/dvc"])


def test_cross_field_rule_is_reported():
    with pytest.raises(ConfigError, match="split"):
        load_config(None, ["split.valid_fraction=0.6", "split.test_fraction=0.5"])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        parse_override("clean.min_notes")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["clean.segment_s=30", "augment.tempo_factors=[0.8]"])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(path) == cfg
    assert json.loads(section_json(cfg.clean))["segment_s"] == 30


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value; mappings that are values (beat_res, storage_options, adapters) stay whole."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix == "":
            out.update(_leaves(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def test_params_yaml_is_complete_and_agrees_with_the_code_defaults():
    """One source of defaults: params.yaml spells out every key, with the code's value (None keys may be omitted)."""
    written = _leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    defaults = _leaves(Config().model_dump(mode="json"))
    resolved = _leaves(load_config(REPO / "params.yaml").model_dump(mode="json"))
    missing = sorted(k for k, v in defaults.items() if k not in written and v is not None)
    unknown = sorted(k for k in written if k not in defaults)
    differ = {k: (resolved[k], v) for k, v in defaults.items() if resolved[k] != v}
    assert not missing, f"params.yaml lacks {missing}"
    assert not unknown, f"params.yaml has keys the code does not: {unknown}"
    assert not differ, f"params.yaml (first) and the code defaults (second) disagree: {differ}"
