"""training/trainer.py on a method small enough to reason about: a linear regression whose loss has no randomness.

Training is deterministic per (seed, step), so a run that silently ignored its checkpoint and started over would end
with the same weights as one that resumed: every resume test here checks that the checkpoint's *state* was read
(the step, Adam's step count, the weights, the EMA), and that a checkpoint changed in a known way shows up in the
run that resumes from it."""
import logging

import pytest
import torch

from boothkit.backend.files import read_safetensors, write_safetensors
from boothkit.training.checkpoint import list_checkpoints, load_checkpoint
from boothkit.training.data import FolderDataset
from boothkit.training.trainer import Trainer, TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


class Rows:
    """A dataset of ``n`` rows with FolderDataset's own batching (order per (seed, epoch), positions)."""

    order = FolderDataset.order
    indices = FolderDataset.indices

    def __init__(self, n: int = 16):
        self.n = n

    def __len__(self):
        return self.n


class Regression:
    """y = Wx + b by mean squared error; the loss uses only the rows it is given (no noise), so the gradient of a
    batch is a plain function of its rows."""

    name = "regression"

    def __init__(self, n: int = 16, dim: int = 3, lr: float = 0.05):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, dim, generator=g), torch.randn(n, 2, generator=g)
        self.module = torch.nn.Linear(dim, 2)
        with torch.no_grad():
            self.module.weight.copy_(torch.randn(2, dim, generator=g))
            self.module.bias.zero_()
        self.lr = lr
        self.exported: dict[str, torch.Tensor] | None = None
        self.dtypes: list[torch.dtype] = []

    def param_groups(self):
        return [{"params": list(self.module.parameters()), "lr": self.lr}]

    def loss(self, indices, generator):
        pred = self.module(self.x[indices])
        self.dtypes.append(pred.dtype)
        return ((pred.float() - self.y[indices]) ** 2).mean()

    def export(self, path, weights, config):
        self.exported = {k: v.detach().clone() for k, v in weights.items()}
        return write_safetensors(path, self.exported, {"format": "test"})

    def sample(self, out_dir, step):
        return None

    def validate(self):
        return {}


def trainer(out, method=None, **settings) -> Trainer:
    s = dict(output_dir=str(out), steps=4, batch_size=4, checkpoint_every=1, keep_last=0, max_grad_norm=0.0)
    s.update(settings)
    return Trainer(method or Regression(), Rows(), TrainSettings(**s), {"test": True})


def adam_steps(opt: torch.optim.Optimizer) -> list[float]:
    return [float(st["step"]) for st in opt.state.values()]


def test_resume_reads_the_step_optimizer_schedule_weights_and_ema(tmp_path, caplog):
    """A run of 3 steps, then a new trainer that resumes: every piece of state equals the checkpoint's, and the run
    it finishes equals an uninterrupted one (the EMA, which is what is exported, included)."""
    common = dict(ema_decay=0.8, warmup_steps=10)
    first = trainer(tmp_path / "part", steps=3, **common)
    first.train()
    ckpt = tmp_path / "part" / "checkpoints" / "checkpoint-0000003.safetensors"
    step, weights, ema, *_ = load_checkpoint(ckpt)
    assert step == 3 and ema is not None

    second = trainer(tmp_path / "part", steps=6, **common)
    assert second.step == 0 and adam_steps(second.optimizer) == []
    with caplog.at_level(logging.INFO, logger="boothkit.training.trainer"):
        assert second.resume() is True
    assert f"resumed from {ckpt} at step 3" in caplog.text
    assert second.step == 3, "the step it resumed at"
    assert adam_steps(second.optimizer) == [3.0, 3.0], "Adam's step count (bias correction) came from the file"
    assert second.scheduler.last_epoch == 3 and second.scheduler.get_last_lr()[0] == pytest.approx(0.05 * 4 / 10)
    for n, p in second.weights().items():
        assert torch.equal(p, weights[n]), n
        assert torch.equal(second.ema[n], first.ema[n]) and not torch.equal(second.ema[n], p), n
        assert torch.equal(second.optimizer.state[dict(zip(second.names, second.params))[n]]["exp_avg"],
                           first.optimizer.state[dict(zip(first.names, first.params))[n]]["exp_avg"]), n
    second.train(resume=True)  # the folder holds the first run's checkpoints: continued, not refused

    straight = trainer(tmp_path / "straight", steps=6, **common)
    straight.train()
    for n in straight.method.exported:
        assert torch.equal(second.method.exported[n], straight.method.exported[n]), n
        assert torch.equal(second.method.exported[n], second.ema[n]), "the EMA is what is exported"


def test_a_checkpoint_changed_in_a_known_way_shows_up_in_the_resumed_run(tmp_path):
    """Weights moved by +5, EMA set to 7, Adam's step count set to 100 in checkpoint 2: resuming to step 2 exports
    exactly that EMA; one more step leaves the weights within one Adam step (lr = 0.05) of the moved ones, counts
    Adam's step 101, and blends the EMA from 7."""
    trainer(tmp_path / "run", steps=2, ema_decay=0.5).train()
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-0000002.safetensors"
    tensors, meta = read_safetensors(ckpt)
    moved = {k[len("weights."):]: v + 5 for k, v in tensors.items() if k.startswith("weights.")}
    for k in list(tensors):
        if k.startswith("weights."):
            tensors[k] = tensors[k] + 5
        elif k.startswith("ema."):
            tensors[k] = torch.full_like(tensors[k], 7.0)
        elif k.endswith(".step"):
            tensors[k] = torch.full_like(tensors[k], 100.0)
    write_safetensors(ckpt, tensors, meta)

    same = trainer(tmp_path / "run", steps=2, ema_decay=0.5)
    same.train(resume=True)
    assert all(torch.equal(v, torch.full_like(v, 7.0)) for v in same.method.exported.values()), \
        "nothing left to train: the file's EMA is exported as it is"

    more = trainer(tmp_path / "run", steps=3, ema_decay=0.5)
    more.train(resume=True)
    assert adam_steps(more.optimizer) == [101.0, 101.0]
    _, w3, ema3, opt3, *_ = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-0000003.safetensors")
    assert all(float(v) == 101.0 for k, v in opt3.items() if k.endswith(".step"))
    for n, w in w3.items():
        assert (w - moved[n]).abs().max() <= 4 * 0.05, n
        assert torch.allclose(ema3[n], 0.5 * 7.0 + 0.5 * w, atol=1e-6), n


def test_ema_decay_is_the_exported_running_average(tmp_path):
    """ema_k = d·ema_(k-1) + (1-d)·w_k from the initial weights, recomputed from the checkpoints' weights."""
    method = Regression()
    w0 = {n: p.detach().clone() for n, p in method.module.named_parameters()}
    t = trainer(tmp_path, method=method, steps=3, ema_decay=0.7)
    t.train()
    ema = dict(w0)
    for path in list_checkpoints(tmp_path / "checkpoints"):
        _, w, *_ = load_checkpoint(path)
        ema = {n: 0.7 * ema[n] + 0.3 * w[n] for n in ema}
    for n, v in method.exported.items():
        assert torch.allclose(v, ema[n], atol=1e-6), n
        assert (v - w[n]).abs().max() > 1e-2, "the EMA lags the last weights: the file is not the raw weights"
    plain = trainer(tmp_path / "plain", steps=3)
    plain.train()
    assert plain.ema is None
    assert all(torch.equal(plain.method.exported[n], w[n]) for n in w), "ema_decay 0 exports the weights"


@pytest.mark.parametrize("keep_last, kept", [(2, [4, 5]), (1, [5]), (0, [1, 2, 3, 4, 5])])
def test_keep_last_prunes_the_oldest_checkpoints(tmp_path, keep_last, kept):
    trainer(tmp_path, steps=5, keep_last=keep_last).train()
    assert [load_checkpoint(p)[0] for p in list_checkpoints(tmp_path / "checkpoints")] == kept


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """grad_accum 2 × batch 2 sees the rows of batch 4 (positions 2s, 2s+1 = rows 4s..4s+3) and averages the two
    halves' gradients: the same steps as batch 4, up to float summation order; batch 2 alone differs by far more."""
    runs, losses = {}, {}
    for name, bs, accum in (("accum", 2, 2), ("big", 4, 1), ("small", 2, 1)):
        t = trainer(tmp_path / name, steps=4, batch_size=bs, grad_accum=accum, max_grad_norm=1.0)
        losses[name] = [t.optimizer_step() for _ in range(4)]
        runs[name] = {n: p.clone() for n, p in t.weights().items()}
    assert losses["accum"] == pytest.approx(losses["big"], abs=1e-6), "the step's loss is the mean over its batch"
    for n in runs["big"]:
        assert torch.allclose(runs["accum"][n], runs["big"][n], atol=1e-6), n
    assert max((runs["small"][n] - runs["big"][n]).abs().max() for n in runs["big"]) > 1e-3


def test_bf16_trains_under_autocast_and_keeps_fp32_weights(tmp_path):
    fp32 = trainer(tmp_path / "fp32", steps=3)
    fp32.train()
    bf16 = trainer(tmp_path / "bf16", steps=3, mixed_precision="bf16")
    bf16.train()
    assert set(fp32.method.dtypes) == {torch.float32} and set(bf16.method.dtypes) == {torch.bfloat16}
    for n, v in bf16.method.exported.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), n
        assert torch.allclose(v, fp32.method.exported[n], atol=0.05), n  # bf16 keeps ~3 significant digits
    assert any(not torch.equal(v, fp32.method.exported[n]) for n, v in bf16.method.exported.items())


def test_settings_errors(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision is 'fp8'; expected no, bf16 or fp16"):
        trainer(tmp_path, mixed_precision="fp8")
    with pytest.raises(ValueError, match="must be positive"):
        trainer(tmp_path, grad_accum=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
            trainer(tmp_path, mixed_precision="fp16")
