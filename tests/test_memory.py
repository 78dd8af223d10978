"""Training-memory options on the tiny preset: gradient checkpointing gives the same step, the 8-bit optimizer
trains, and the options are checked when the config loads."""

import pytest
import torch

from iedp.config import ModelConfig, load_config
from iedp.errors import InputError
from iedp.models.attention import ClassAttentionProcessor
from iedp.models.build import build_model

SIZE = 64


def seg_model(**kw):
    torch.manual_seed(0)
    config = ModelConfig(
        task="seg", method="iedp", classes="synthetic", neck_channels=16, head_channels=16, **kw
    )
    return build_model(config).train()


def seg_batch(num_classes, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(B, 3, SIZE, SIZE, generator=g) * 2 - 1,
        "label": torch.randint(0, num_classes, (B, SIZE, SIZE), generator=g),
        "prompt": ["a photo of a wall and floor"] * B,
    }


def one_step(model, batch, monkeypatch):
    """Loss, gradients, captured class attention, capture-processor calls (forward, total) and the store's layer
    counts after backward."""
    calls = []
    original = ClassAttentionProcessor.__call__
    monkeypatch.setattr(
        ClassAttentionProcessor, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    captured = {}
    hook = model.backbone.register_forward_hook(
        lambda _m, _a, out: captured.update({s: m.detach().clone() for s, m in out.class_attention.items()})
    )
    model.zero_grad()
    torch.manual_seed(3)  # the head's dropout
    loss = model(batch)["loss"]
    forward_calls = len(calls)
    loss.backward()
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    store = model.backbone.store
    return loss.detach(), grads, captured, (forward_calls, len(calls)), dict(store.counts), store.recording


def test_gradient_checkpointing_gives_the_same_step_and_captures_once(monkeypatch):
    plain, checkpointed = seg_model(), seg_model(gradient_checkpointing=True)
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    batch = seg_batch(plain.num_classes)
    loss_a, grads_a, maps_a, calls_a, counts_a, _ = one_step(plain, batch, monkeypatch)
    loss_b, grads_b, maps_b, calls_b, counts_b, recording = one_step(checkpointed, batch, monkeypatch)

    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100  # the UNet's, the adapter's, the head's
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sorted(maps_a) == sorted(maps_b) == [16, 32]
    for stride in maps_a:
        torch.testing.assert_close(maps_b[stride], maps_a[stride], rtol=0, atol=0)
    # The backward pass recomputed the checkpointed transformer blocks, capture processors included ...
    assert calls_a[1] == calls_a[0] > 0 and calls_b == (calls_a[0], 2 * calls_a[0])
    # ... and the recomputation captured nothing: as many maps per resolution as without checkpointing.
    assert counts_b == counts_a and sum(counts_a.values()) == calls_a[0] and not recording
    assert checkpointed.backbone._features == {}


def test_gradient_checkpointing_is_a_checked_boolean():
    config = load_config(None, ["model.gradient_checkpointing=true"])
    assert config.model.gradient_checkpointing is True
    with pytest.raises(InputError, match="model.gradient_checkpointing: 'maybe' is not a boolean"):
        load_config(None, ["model.gradient_checkpointing=maybe"])


def train_losses(name, steps=8):
    """Losses of ``steps`` steps of ``train.optimizer=name`` on one batch, and the model and optimizer."""
    from iedp.engine.optim import build_optimizer

    model = seg_model()
    config = load_config(None, [f"train.optimizer={name}", "train.lr=1e-3", "train.warmup_steps=0"]).train
    optimizer, _ = build_optimizer(model, model.unet, config)
    batch = seg_batch(model.num_classes)
    losses = []
    for _ in range(steps):
        torch.manual_seed(3)
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model, optimizer


def test_8bit_adamw_trains_like_adamw_with_8bit_moments():
    pytest.importorskip(
        "bitsandbytes", reason='train.optimizer=adamw8bit needs pip install "iedp[optim8bit]"'
    )
    losses, model, optimizer = train_losses("adamw8bit")
    reference, _, _ = train_losses("adamw")
    assert type(optimizer).__name__ == "AdamW8bit"
    assert (
        all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)) and losses[-1] < 0.92 * losses[0]
    ), losses
    # The same path down as 32-bit AdamW, within the quantization's noise.
    assert losses[-1] == pytest.approx(reference[-1], rel=0.01) and reference[-1] < 0.92 * reference[0]
    # The UNet's large tensors (>= 4096 elements) keep both moments in one byte per element.
    large = [p for p in model.unet.parameters() if p.requires_grad and p.numel() >= 4096]
    assert large and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    assert all(optimizer.state[p]["state2"].dtype == torch.uint8 for p in large)


def test_8bit_adamw_without_bitsandbytes_says_what_to_install(monkeypatch):
    import builtins

    from iedp.engine.optim import optimizer_class

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(
        ImportError, match=r'^train.optimizer=adamw8bit needs bitsandbytes: pip install "iedp\[optim8bit\]"$'
    ):
        optimizer_class("adamw8bit")
    assert optimizer_class("adamw") is torch.optim.AdamW
    with pytest.raises(InputError, match="train.optimizer: 'adam' is not one of adamw, adamw8bit"):
        load_config(None, ["train.optimizer=adam"])
