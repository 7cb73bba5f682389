"""``trainer.test`` with :class:`EvaluationCallback` gives exactly :func:`evaluate`'s record (one
checkpoint, one figure), logs it, and never replaces a record."""

import json

import lightning as L
import pytest
import torch
from digits_models import THREAT, held_out, one_thread, trained_mlp
from torch.utils.data import DataLoader, TensorDataset

from s2ap_lightning.data.subsets import IndexedDataset
from s2ap_lightning.evaluation import EvalProtocol, EvaluatedModule, EvaluationCallback, evaluate

PROTOCOL = EvalProtocol(pgd_steps=5, aa_images=12, batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Digits(L.LightningDataModule):
    def __init__(self, n: int = 48) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.test_set = IndexedDataset(TensorDataset(*held_out(n)))  # (x, y, index), as s2ap's

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=20)  # not the protocol's batch size: no matter


class DigitsUnderTest(L.LightningModule):
    """The contract, and nothing else: the callback does the evaluation."""

    def __init__(self, threat=THREAT, evaluation=PROTOCOL) -> None:
        super().__init__()
        self.net = trained_mlp()
        self.threat, self.evaluation = threat, evaluation
        self.trained_hparams = {"norm": "linf", "eps": 0.1, "step_size": 0.025, "attack_steps": 5}

    def evaluated_network(self):
        return self.net

    def test_step(self, batch, batch_idx):
        return None


def _json(value):
    return json.loads(json.dumps(value))


def test_callback_record_equals_evaluate(tmp_path, capsys, trainer_factory):
    module, data = DigitsUnderTest(), Digits()
    assert isinstance(module, EvaluatedModule)
    callback = EvaluationCallback()
    results = trainer_factory(default_root_dir=tmp_path, callbacks=[callback]).test(module, datamodule=data)
    record = json.loads((tmp_path / "eval.json").read_text())

    expected = evaluate(trained_mlp(), held_out(48), THREAT, PROTOCOL).as_dict()
    assert expected["n_aa_images"] == 12 and expected["aa_acc"] is not None
    assert {k: record[k] for k in expected} == _json(expected)
    assert record["threat_model"]["eps"] == 0.1 and record["protocol"]["pgd_steps"] == 5
    assert record["hyper_parameters"]["attack_steps"] == 5 and record["stage"] == "DigitsUnderTest"
    # Flat keys of the module's hparams (as older checkpoints hold them), named as the threat block does.
    assert record["trained_threat_model"] == {"norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 5}
    assert record["dataset"] == {"n": 48} and record["world_size"] == 1 and record["checkpoint"] is None
    logged = results[0]
    assert logged["test/robust_acc"] == pytest.approx(expected["pgd_acc"])
    assert logged["test/pgd10_acc"] == pytest.approx(expected["pgd_fewer_acc"])
    assert logged["test/aa_acc"] == pytest.approx(expected["aa_acc"])
    assert logged["test/eps"] == pytest.approx(0.1) and logged["test/pgd_steps"] == 5
    out = capsys.readouterr().out
    assert "threat model: linf eps 0.1; PGD-5 (step 0.025, 1 restart(s)); AutoAttack standard on 12" in out
    assert "NOT the training" not in out


def test_second_evaluation_of_a_checkpoint_gets_its_own_record(tmp_path, capsys, trainer_factory):
    data, protocol = Digits(24), EvalProtocol(pgd_steps=3, aa_images=0)
    trainer = trainer_factory(default_root_dir=tmp_path, callbacks=[EvaluationCallback()])
    trainer.test(DigitsUnderTest(evaluation=protocol), datamodule=data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    trainer.test(DigitsUnderTest(evaluation=protocol), datamodule=data, ckpt_path=str(ckpt))
    first = (tmp_path / "model.eval.json").read_bytes()
    wider = THREAT.with_eps(0.2)
    trainer.test(DigitsUnderTest(threat=wider, evaluation=protocol), datamodule=data, ckpt_path=str(ckpt))
    assert (tmp_path / "model.eval.json").read_bytes() == first, "a record is never replaced"
    second = json.loads((tmp_path / "model.eval.2.json").read_text())
    assert second["threat_model"]["eps"] == 0.2 and second["checkpoint"] == str(ckpt)
    assert second["hyper_parameters"]["eps"] == 0.1, "as trained"
    assert "NOT the training threat model (linf eps 0.1)" in capsys.readouterr().out


def test_module_without_the_contract_fails_before_evaluating(tmp_path, trainer_factory):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def test_step(self, batch, batch_idx):
            return None

    trainer = trainer_factory(default_root_dir=tmp_path, callbacks=[EvaluationCallback()])
    with pytest.raises(TypeError, match="lacks evaluated_network, threat, evaluation, trained_hparams"):
        trainer.test(Plain(), datamodule=Digits(8))
