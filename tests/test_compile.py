"""``compile``: the compiled training step computes what the eager one does; unsupported falls back."""

from __future__ import annotations

import warnings

import pytest
import torch

import s2ap_lightning.models.compiled as compiled_module
from s2ap_lightning.models import build_model
from s2ap_lightning.models.compiled import ModelForward
from s2ap_lightning.stages import RobustPretrainer, ScoreSpaceSAMPruner

#: Fallback reasons that mean "no working compiler toolchain here", not a defect of the project.
TOOLCHAIN = ("InvalidCxxCompiler", "CppCompileError")


def one_step(module, batch, trainer_factory):
    """One real training step through a Trainer (the attack seeded); its logged loss."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=len(batch[0]))
    trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    torch.manual_seed(1)  # the attack's random start
    trainer.fit(module, train_dataloaders=loader)
    return float(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("stage", ["s2ap", "pretrain"])
def test_compiled_step_matches_eager(stage, fast_kwargs, trainer_factory):
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))
    extra = dict(gamma=0.05, warmup_epochs=0, sparsity=0.5) if stage == "s2ap" else {}
    cls = ScoreSpaceSAMPruner if stage == "s2ap" else RobustPretrainer

    def make(**kw):
        return cls(**extra, **kw, **fast_kwargs)

    eager, comp = make(), make(compile=True)
    comp.load_state_dict(eager.state_dict())
    learnt = (
        (lambda m: dict(m.method.items()))
        if stage == "s2ap"
        else (lambda m: dict(m.model.named_parameters()))
    )
    before = {n: t.detach().clone() for n, t in learnt(eager).items()}
    loss_eager = one_step(eager, (x, y), trainer_factory)
    loss_comp = one_step(comp, (x, y), trainer_factory)
    if not comp.forward_fn.compiled:
        reason = comp.forward_fn.fallback_reason
        # The designed fallback on a machine that cannot compile (no C++ toolchain, unsupported
        # Python) skips; any other fallback (TorchDynamo failing to trace the project's forward) fails.
        if compiled_module.compile_unsupported_reason() is not None or reason.startswith(TOOLCHAIN):
            pytest.skip(f"torch.compile unusable here: {reason}")
        pytest.fail(f"compile fell back to eager on a machine that can compile: {reason}")
    # Every graph a stage needs fits TorchDynamo's cache (past its limit it would run eager).
    assert torch._dynamo.config.recompile_limit >= compiled_module.RECOMPILE_LIMIT
    assert loss_comp == pytest.approx(loss_eager, rel=1e-4)
    # The step each took (learning rate times the gradient, the S2AP gradient taken at s + z).
    for name, start in before.items():
        step_eager = learnt(eager)[name].detach() - start
        step_comp = learnt(comp)[name].detach() - start
        scale = step_eager.abs().max().clamp_min(1e-12)
        assert (step_comp - step_eager).abs().max() / scale < 1e-3, name


def test_unsupported_compile_falls_back_to_eager_with_a_reason(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InvalidCxxCompiler

    model = build_model("small_cnn", 4, 3)
    x = torch.rand(2, 3, 8, 8)
    expected = model(x)

    calls = []

    def broken(fn, **options):
        def call(*args):
            calls.append(args)
            # What TorchDynamo raises when Inductor finds no g++: the reason is the wrapped error.
            raise BackendCompilerFailed(fn, InvalidCxxCompiler(), None)

        return call

    monkeypatch.setattr(torch, "compile", broken)
    fwd = ModelForward(model, compile=True)
    with pytest.warns(
        RuntimeWarning, match="compile=true is not usable here.*InvalidCxxCompiler: No working C"
    ):
        out = fwd(x)
    assert torch.equal(out, expected) and not fwd.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning ...
        assert torch.equal(fwd(x), expected)
    assert len(calls) == 1  # ... and no second attempt to compile


def test_errors_of_the_computation_are_not_swallowed(monkeypatch):
    """A wrong input (or out of memory) under compile raises as it would eager; compile stays on."""

    def failing(fn, **options):
        def call(*args):
            raise ValueError("expected input with 3 channels, got 5")

        return call

    monkeypatch.setattr(torch, "compile", failing)
    fwd = ModelForward(build_model("small_cnn", 4, 3), compile=True)
    with pytest.raises(ValueError, match="3 channels"):
        fwd(torch.rand(2, 5, 8, 8))
    assert fwd.compiled


def test_compile_unsupported_interpreter_is_reported_before_any_call(monkeypatch):
    monkeypatch.setattr(compiled_module, "compile_unsupported_reason", lambda: "Python 3.99 is not supported")
    model = build_model("small_cnn", 4, 3)
    fwd = ModelForward(model, compile=True)
    with pytest.warns(RuntimeWarning, match="Python 3.99"):
        fwd(torch.rand(2, 3, 8, 8))
    assert not fwd.compiled


def test_state_dict_stays_plain_with_compile(fast_kwargs):
    plain = RobustPretrainer(**fast_kwargs).state_dict().keys()
    assert RobustPretrainer(compile=True, **fast_kwargs).state_dict().keys() == plain
