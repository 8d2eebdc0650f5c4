"""Bundle loading: LoRA folded into the weights, weighted blends, dtype/quantization, registry resolution."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from realtime.bundle import BundleError, adapter_plan, load_bundle, load_model, note_limits, resolve_bundle
from realtime.bundle_format import read_bundle, write_bundle
from realtime.lora import UnsupportedAdapter, adapter_deltas, blend_deltas, merge_adapters

X = torch.tensor([[1, 40, 41, 200, 300, 7]])


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=X).logits[0].float()


def base_model(bundle):
    return LlamaForCausalLM.from_pretrained(bundle / "base", local_files_only=True).eval()


def peft_reference(bundle, weighted: list[tuple[float, str]]):
    """The same fold done by peft: add_weighted_adapter(cat) + merge_and_unload."""
    from peft import PeftModel

    names = [name for _, name in weighted]
    model = PeftModel.from_pretrained(base_model(bundle), bundle / "adapters" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(bundle / "adapters" / name, adapter_name=name)
    model.add_weighted_adapter(names, [w for w, _ in weighted], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.merge_and_unload().eval()


def test_blend_matches_peft_weighted_adapter(tiny_bundle_master):
    weighted = [(2.0, "style"), (1.0, "alt")]
    ours = merge_adapters(
        base_model(tiny_bundle_master), [(w, tiny_bundle_master / "adapters" / n) for w, n in weighted]
    )
    ref = peft_reference(tiny_bundle_master, weighted)
    torch.testing.assert_close(logits(ours), logits(ref), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(ours), logits(base_model(tiny_bundle_master)), atol=1e-3)  # it did something


def test_blend_is_the_weighted_sum_of_deltas(tiny_bundle_master):
    a = adapter_deltas(tiny_bundle_master / "adapters" / "style")
    b = adapter_deltas(tiny_bundle_master / "adapters" / "alt")
    mixed = blend_deltas([(2.0, a), (1.0, b)])
    assert set(mixed) == set(a) | set(b)
    for key in mixed:
        torch.testing.assert_close(mixed[key], 2.0 * a[key] + b[key])
    cfg = json.loads((tiny_bundle_master / "adapters/style/adapter_config.json").read_text())
    assert a[next(iter(a))].shape[0] > cfg["r"]  # full weight shape (out, in), not the rank


def test_adapter_plan_defaults_blends_and_normalizes():
    meta = {"adapters": {"a": "adapters/a", "b": "adapters/b"}, "default_adapter": "a"}
    assert adapter_plan(meta, None, True) == {"a": 1.0}
    assert adapter_plan(meta, {}, True) == {}
    assert adapter_plan(meta, {"a": 2, "b": 1}, True) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert adapter_plan(meta, {"a": 2, "b": 1}, False) == {"a": 2.0, "b": 1.0}
    with pytest.raises(BundleError, match="not in the bundle"):
        adapter_plan(meta, {"c": 1.0}, True)
    for weights in ({"a": 0.0}, {"a": 0.0, "b": -1.0}):  # silently playing the base model would be a surprise
        for normalize in (True, False):
            with pytest.raises(BundleError, match="all zero or negative"):
                adapter_plan(meta, weights, normalize)


def lean_logits(model) -> torch.Tensor:
    """The runner's forward over X (prefill, all positions)."""
    return model.forward(X[0].tolist(), model.new_cache(), keep=X.shape[1])


def test_note_limits_take_the_override_then_the_bundle_then_the_default():
    meta = {"max_note_beats": 3.5, "max_polyphony": 9}
    assert note_limits(meta) == (3.5, 9)
    assert note_limits(meta, max_note_beats=6.0, max_polyphony=4) == (6.0, 4)
    assert note_limits({}) == (8.0, None)  # an older bundle: the default limit, no polyphony rule


def test_load_bundle_folds_the_default_adapter(tiny_bundle_master):
    bundle = load_bundle(tiny_bundle_master, device="cpu")
    assert bundle.adapters == {"style": 1.0}
    ref = peft_reference(tiny_bundle_master, [(1.0, "style")])
    torch.testing.assert_close(lean_logits(bundle.model), logits(ref), atol=1e-4, rtol=1e-4)
    base_only = load_bundle(tiny_bundle_master, adapters={}, device="cpu")
    torch.testing.assert_close(lean_logits(base_only.model), logits(base_model(tiny_bundle_master)), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(load_model(tiny_bundle_master)), logits(ref), atol=1e-4, rtol=1e-4)


def test_blend_without_transformers_equals_the_module_merge(tiny_bundle_master):
    """`load_weights` folds into a state dict read from disk; `merge_adapters` into a transformers model."""
    plan = {"style": 0.5, "alt": 1.5}
    bundle = load_bundle(tiny_bundle_master, adapters=plan, normalize=False, device="cpu")
    ref = merge_adapters(
        base_model(tiny_bundle_master), [(w, tiny_bundle_master / "adapters" / n) for n, w in plan.items()]
    )
    torch.testing.assert_close(lean_logits(bundle.model), logits(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("dtype", "quantization"), [("bfloat16", "none"), ("float32", "dynamic_int8")])
def test_inference_dtypes(tiny_bundle_master, dtype, quantization):
    bundle = load_bundle(tiny_bundle_master, dtype=dtype, quantization=quantization, device="cpu")
    assert bundle.model.quantization == quantization and bundle.model.dtype == getattr(torch, dtype)
    out = lean_logits(bundle.model)
    assert torch.isfinite(out).all()
    assert out.argmax(-1).shape == (X.shape[1],)


def test_unsupported_adapters_go_through_peft(tiny_bundle):
    cfg_path = tiny_bundle / "adapters/style/adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules_to_save"] = ["lm_head"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapter, match="modules_to_save"):
        adapter_deltas(tiny_bundle / "adapters/style")


def test_bad_bundles_fail_clearly(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="not a bundle folder"):
        resolve_bundle(tmp_path)
    (tiny_bundle / "bundle.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(BundleError, match="format-1"):
        read_bundle(tiny_bundle)
    with pytest.raises(BundleError, match="no MLflow store"):
        resolve_bundle("models:/jam-partner@champion", f"sqlite:///{tmp_path}/missing.db")


def _register(client, tmp_path, bundle_dir, exp) -> str:
    """Log `bundle_dir` as a run's bundle artifact and register it; returns the new version."""
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(bundle_dir), "bundle")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version("jam-partner", f"runs:/{run.info.run_id}/bundle", run_id=run.info.run_id)
    return mv.version


def test_registry_alias_resolves_to_a_copy_cached_by_version(tmp_path, tiny_bundle_master, monkeypatch):
    from mlflow import MlflowClient

    import realtime.resolve as R

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("jam-partner", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("jam-partner")
    bundle_copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_master, bundle_copy)
    v1 = _register(client, tmp_path, bundle_copy, exp)
    client.set_registered_model_alias("jam-partner", "champion", v1)
    cache = tmp_path / "cache"
    path = resolve_bundle("models:/jam-partner@champion", uri, cache_dir=cache)
    assert read_bundle(path)["default_adapter"] == "style" and path.name == f"v{v1}"
    assert resolve_bundle(f"models:/jam-partner/{v1}", uri, cache_dir=cache) == path

    def no_download(*args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(R, "_download", no_download)
    assert resolve_bundle("models:/jam-partner@champion", uri, cache_dir=cache) == path  # a second start
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importing MLflow now fails: sqlite answers without it
    assert R.lookup(uri, "jam-partner", "champion", None).version == str(v1)
    monkeypatch.undo()
    client.set_registered_model_alias("jam-partner", "champion", _register(client, tmp_path, bundle_copy, exp))
    assert resolve_bundle("models:/jam-partner@champion", uri, cache_dir=cache).name == f"v{int(v1) + 1}"
    with pytest.raises(BundleError, match="not in the registry"):
        resolve_bundle("models:/jam-partner@nope", uri, cache_dir=cache)


def test_cached_copies_belong_to_one_store_file_and_one_registered_run(tmp_path, tiny_bundle_master, monkeypatch):
    """The project's relative store URI names another store in every checkout, and a store made again at the same
    path numbers its versions from 1 again: neither may take the other's cached copy."""
    from mlflow import MlflowClient

    import realtime.resolve as R

    keys = []
    for project in (tmp_path / "a", tmp_path / "b"):
        project.mkdir()
        monkeypatch.chdir(project)
        keys.append(R.store_key("sqlite:///mlruns/mlflow.db"))
    assert keys[0] != keys[1] and keys[1] == R.store_key(f"sqlite:///{tmp_path}/b/mlruns/mlflow.db")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("jam-partner", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("jam-partner")
    client.set_registered_model_alias("jam-partner", "champion", _register(client, tmp_path, tiny_bundle_master, exp))
    cache = tmp_path / "cache"
    path = resolve_bundle("models:/jam-partner@champion", uri, cache_dir=cache)
    stamp = (path / R.SOURCE_FILE).read_text()
    (path / R.SOURCE_FILE).write_text(stamp.replace(stamp.split("\n")[1], "another-run"))  # an older store's v1
    (path / "stale.txt").write_text("from the other store")
    assert resolve_bundle("models:/jam-partner@champion", uri, cache_dir=cache) == path
    assert (path / R.SOURCE_FILE).read_text() == stamp and not (path / "stale.txt").exists()  # downloaded again

    def no_download(*args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(R, "_download", no_download)
    assert resolve_bundle("models:/jam-partner@champion", uri, cache_dir=cache) == path  # its own copy: kept


def test_registry_copy_keeps_its_merged_weights(tmp_path, tiny_bundle_master, monkeypatch):
    from mlflow import MlflowClient

    import realtime.bundle as B

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("jam-partner", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("jam-partner")
    client.set_registered_model_alias("jam-partner", "champion", _register(client, tmp_path, tiny_bundle_master, exp))
    first = load_bundle("models:/jam-partner@champion", tracking_uri=uri, cache_dir=tmp_path / "cache", device="cpu")
    assert len(list((first.path / "merged").glob("*.safetensors"))) == 1

    def no_fold(*args):
        raise AssertionError("folded again")

    monkeypatch.setattr(B, "load_weights", no_fold)
    again = load_bundle("models:/jam-partner@champion", tracking_uri=uri, cache_dir=tmp_path / "cache", device="cpu")
    torch.testing.assert_close(lean_logits(again.model), lean_logits(first.model), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="folded again"):  # another blend is folded (and kept) once
        load_bundle("models:/jam-partner@champion", adapters={"alt": 1.0}, tracking_uri=uri,
                    cache_dir=tmp_path / "cache", device="cpu")  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / "tokenizer.json").unlink(), "tokenizer 'tokenizer.json' is missing"),
        (lambda b: (b / "base" / "config.json").unlink(), "has no config.json"),
        (lambda b: shutil.rmtree(b / "adapters" / "alt"), "adapter 'alt' has no adapter_config.json"),
        (lambda b: (b / "bundle.json").write_text("{oops"), "unreadable"),
    ],
)
def test_read_bundle_names_what_is_missing(tiny_bundle, damage, message):
    damage(tiny_bundle)
    with pytest.raises(BundleError, match=message):
        read_bundle(tiny_bundle)


def test_write_bundle_replaces_entries_and_keeps_other_files(tmp_path, tiny_bundle_master):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "report.json").write_text("{}")  # a stage's own file beside its bundle
    src = tiny_bundle_master
    write_bundle(dest, src / "base", src / "tokenizer.json", {"style": src / "adapters/style"}, step=3)
    first = read_bundle(dest)
    assert first["default_adapter"] == "style" and first["step"] == 3 and first["metrics"] == {}
    write_bundle(dest, dest / "base", dest / "tokenizer.json", {}, source_run_id="x")  # in place, adapters dropped
    again = read_bundle(dest)
    assert again["adapters"] == {} and again["default_adapter"] is None and again["source_run_id"] == "x"
    assert not (dest / "adapters" / "style").exists() and (dest / "report.json").exists()
    assert sorted(p.name for p in dest.iterdir()) == [
        "adapters",
        "base",
        "bundle.json",
        "report.json",
        "tokenizer.json",
    ]
    torch.testing.assert_close(logits(load_model(dest)), logits(base_model(src)))
