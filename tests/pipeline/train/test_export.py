"""A bundle exported by the real pretrain + fine-tune stages plays in the jam runner as the trained model computed."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.graph import run_stage
from pipeline.train import finetune
from pipeline.train.model import Vocab
from realtime.bundle import load_bundle, load_model, load_weights
from realtime.bundle_format import read_bundle, special_ids
from realtime.lora import adapter_deltas, peft_merge
from realtime.synthetic import make_tokenizer
from tests.pipeline.train.test_model import tiny_cfg, token_windows, write_token_data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(bundle folder, the fine-tuned model as training left it in memory, vocab) after pretrain + finetune.

    The fine-tune trains on a full-precision base (`quantization: none`): with NF4 the trained model differs from
    the shipped fp32 base by the quantization error, and this test is about the export, not about QLoRA.
    """
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg(root, finetune={"quantization": "none"})
    tokenizer = make_tokenizer()  # a real MIDILike tokenizer: the runner refuses any other kind
    ids = special_ids(tokenizer)
    vocab = Vocab(len(tokenizer), ids["pad_id"], ids["bos_id"], ids["eos_id"])
    tok_dir = write_token_data(cfg.project.data_dir, vocab=vocab)
    tokenizer.save(tok_dir / "tokenizer.json")
    trained = {}
    export = finetune.export_bundle

    def keep_model(result, *args, **kwargs):
        trained["model"] = result.model
        return export(result, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune, "export_bundle", keep_model)
        run_stage("pretrain", cfg)
        run_stage("finetune", cfg)
    return cfg.stage_dir("finetune") / "bundle", trained["model"].eval(), vocab


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _runner_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The runner's forward (realtime.llama) over each window, all positions: (windows, seq, vocab)."""
    return torch.stack([model.forward(row.tolist(), model.new_cache(), keep=len(row)) for row in ids])


def test_runner_plays_the_trained_model(exported):
    bundle_dir, trained, vocab = exported
    ids = torch.from_numpy(token_windows(3, 5, 7, vocab=vocab)).long()
    bundle = load_bundle(bundle_dir, device="cpu")  # the jam runner's loader and forward
    assert bundle.adapters == {"style": 1.0}
    torch.testing.assert_close(_runner_logits(bundle.model, ids), _logits(trained, ids), atol=1e-4, rtol=1e-5)
    merged = load_model(bundle_dir)  # what evaluation scores: the same fold as a transformers model
    assert not any("lora" in name or "token_adapter" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), atol=1e-5, rtol=1e-5)


def test_fast_merge_equals_peft_merge_with_trained_tokens(exported):
    bundle_dir, _, vocab = exported
    from transformers import LlamaForCausalLM

    meta = read_bundle(bundle_dir)
    adapter = bundle_dir / meta["adapters"]["style"]
    base = LlamaForCausalLM.from_pretrained(bundle_dir / meta["base"]).eval()
    deltas = adapter_deltas(adapter, base)  # the fast path takes this adapter (no UnsupportedAdapter)
    assert deltas["model.embed_tokens"].abs().max() > 0  # train_embeddings moved the token rows
    ids = torch.from_numpy(token_windows(3, 5, 7, vocab=vocab)).long()
    ours = load_model(bundle_dir)
    theirs = peft_merge(LlamaForCausalLM.from_pretrained(bundle_dir / meta["base"]), [(1.0, adapter)]).eval()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # tied: one merged table
    torch.testing.assert_close(ours.model.embed_tokens.weight, theirs.model.embed_tokens.weight, atol=0, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-5, rtol=1e-5)
    assert (_logits(ours, ids) - _logits(base, ids)).abs().max() > 1e-3  # the adapter matters
    _, folded = load_weights(bundle_dir, {"style": 1.0})  # the runner's fold, on a state dict read from disk
    torch.testing.assert_close(folded["model.embed_tokens.weight"], theirs.model.embed_tokens.weight, atol=0, rtol=0)
