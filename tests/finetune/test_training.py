"""The training loop end to end on a tiny random Llama: the loss goes down, a resumed run ends where an
uninterrupted one does, the PEFT adapter reloads with the same logits, full fine-tuning writes a loadable model,
gradient checkpointing changes nothing but memory, and a run that cannot fit is refused before it starts."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from qtool.config.finetune_schema import FinetuneConfig
from qtool.core.errors import QtoolError
from qtool.finetune.data import load_examples
from qtool.finetune.job import FinetuneJob, prepare_model, run_finetune, write_output
from qtool.finetune.packing import make_rows
from qtool.finetune.trainer import TrainingRun, train

# a wider init than transformers' 0.02: the logits of a random tiny model then span a range an adapter can use
SMALL = dict(num_hidden_layers=1, initializer_range=0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny_model_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny", seed=5, **SMALL)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, tiny_words):
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(tiny_words) for _ in range(rng.randint(4, 10))) for _ in range(6)]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(sentences * 6))  # a small text, repeated: learnable in a few steps
    return path


def config(**changes) -> FinetuneConfig:
    base = dict(rank=4, alpha=8, lr=2e-2, seqlen=48, batch_tokens=96, max_steps=6, schedule="constant")
    return FinetuneConfig(**{**base, **changes})


def test_lora_loss_goes_down(tmp_path, model_dir, text_file):
    result = run_finetune(FinetuneJob(str(model_dir), str(text_file), tmp_path / "out", config(max_steps=10), device="cpu"))
    losses = result.train.losses
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.6 * losses[0]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


class Interrupt(Exception):
    pass


def test_resume_reaches_the_uninterrupted_result(tmp_path, model_dir, text_file):
    settings = config(dropout=0.2, save_every=2, max_steps=5, schedule="cosine", warmup_steps=1)
    whole = run_finetune(FinetuneJob(str(model_dir), str(text_file), tmp_path / "whole", settings, device="cpu"))

    def stop_after_three(report):
        if report.step == 3:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run_finetune(FinetuneJob(str(model_dir), str(text_file), cut, settings, device="cpu"), progress=stop_after_three)
    assert not cut.exists() and (tmp_path / "cut-checkpoints" / "step-000002").is_dir()
    resumed = run_finetune(FinetuneJob(str(model_dir), str(text_file), cut, settings, resume=True, device="cpu"))
    assert resumed.train.resumed_from_step == 2
    assert len(resumed.train.losses) == 3 and resumed.train.losses == whole.train.losses[2:]
    expected = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    got = load_file(str(cut / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_a_fresh_run_refuses_old_checkpoints_without_force(tmp_path, model_dir, text_file):
    (tmp_path / "out-checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(QtoolError, match="checkpoints of an earlier run are in .*out-checkpoints .*--resume"):
        run_finetune(FinetuneJob(str(model_dir), str(text_file), tmp_path / "out", config(max_steps=1), device="cpu"))


def trained_in_memory(model_dir, text_file, settings):
    from qtool.checkpoints.sources import load_model

    loaded = load_model(str(model_dir), device="cpu")
    data = load_examples(text_file, loaded.tokenizer, settings.seqlen)
    model = prepare_model(loaded.model, settings)
    result = train(TrainingRun(model=model, config=settings, rows=make_rows(data.examples, settings.seqlen, True),
                               pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu")))
    return model.eval(), loaded.tokenizer, result


def test_the_peft_adapter_reloads_with_the_same_logits(tmp_path, model_dir, text_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtool.checkpoints.adapters import apply_adapter

    settings = config(max_steps=3, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    model, tokenizer, _ = trained_in_memory(model_dir, text_file, settings)
    write_output(tmp_path, model, tokenizer, settings, str(model_dir))
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        plain = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        merged = apply_adapter(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), tmp_path, quantized=False)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the adapter moved the logits: equal logits are not the base's


def test_gradient_checkpointing_gives_the_same_losses(model_dir, text_file):
    _, _, plain = trained_in_memory(model_dir, text_file, config(max_steps=2))
    _, _, checkpointed = trained_in_memory(model_dir, text_file, config(max_steps=2, grad_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_full_fine_tuning_writes_a_loadable_model(tmp_path, model_dir, text_file):
    from qtool.checkpoints.sources import load_model

    result = run_finetune(FinetuneJob(str(model_dir), str(text_file), tmp_path / "full", config(method="full", lr=1e-3, max_steps=4), device="cpu"))
    assert result.train.losses[-1] < result.train.losses[0]
    tuned = load_model(str(tmp_path / "full"), device="cpu").model
    base = load_model(str(model_dir), device="cpu").model
    changed = [name for name, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.embed_tokens.weight" in changed


def test_a_run_that_cannot_fit_is_refused_before_training(tmp_path, model_dir, text_file):
    with pytest.raises(QtoolError, match=r"fine-tuning needs about .* GiB more on cpu"):
        run_finetune(FinetuneJob(str(model_dir), str(text_file), tmp_path / "out", config(), device="cpu"), available_memory=1024)
    assert not (tmp_path / "out").exists()
