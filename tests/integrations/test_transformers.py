"""NormlabCallback in a real Hugging Face Trainer run: a tiny GPT-2 built from a config in code (no download),
CPU, offline, a few steps."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
pytest.importorskip("accelerate", reason="the transformers extra (accelerate) is not installed")

from normlab.diagnostics import load_diagnostics  # noqa: E402
from normlab.diagnostics import metrics as m  # noqa: E402
from normlab.integrations.transformers import NormlabCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count=48, length=12, vocab=40):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class GradientProbe(transformers.TrainerCallback):
    """Keeps the norm of one weight's gradient at each optimizer step, as the optimizer sees it, and the losses
    the Trainer logs."""

    def __init__(self):
        self.norms, self.losses = {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms[state.global_step] = torch.linalg.vector_norm(model.transformer.h[0].mlp.c_fc.weight.grad).item()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def test_the_callback_records_a_trainer_run_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    probe = GradientProbe()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_steps=6, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    callback = NormlabCallback(every=2, histogram_every=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback, probe])
    trainer.train()
    run_dir = tmp_path / "out" / "normlab"
    diagnostics = load_diagnostics(run_dir)
    assert diagnostics.steps() == [0, 2, 4]
    assert (run_dir / "report.html").is_file()
    for step in diagnostics.steps():
        assert diagnostics.value("transformer.h.0.mlp.c_fc.weight", m.PARAM_GRAD_NORM, step) == pytest.approx(
            probe.norms[step], rel=1e-5
        )
        # the step's mean loss, as the Trainer logs it (for the step after: its global_step has advanced)
        assert diagnostics.value("", m.LOSS, step) == pytest.approx(probe.losses[step + 1], rel=1e-3)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.act", "lm_head"} <= set(diagnostics.layers(m.ACT_STD))
    assert not any("#" in name for name in diagnostics.modules)  # one micro-batch of outputs per step
    assert set(diagnostics.parameters) == {name for name, p in model.named_parameters() if p.requires_grad} - {
        "lm_head.weight"  # tied to the token embedding: recorded once, as transformer.wte.weight
    }
