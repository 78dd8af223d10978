"""IEDP's implicit branch (learnable queries over frozen CLIP image tokens) and the explicit token sequence."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from test_model import depth_config, seg_config

from iedp.config import Config
from iedp.errors import InputError
from iedp.model_files import CONFIG_NAME, load_model, save_model
from iedp.models.build import build_model
from iedp.models.guidance import class_token_bank
from iedp.models.implicit_queries import ImplicitQueries

SIZE = 64


def seg_batch(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(B, 3, SIZE, SIZE, generator=g) * 2 - 1,
        "label": torch.randint(0, model.num_classes, (B, SIZE, SIZE), generator=g),
        "prompt": ["a photo of a wall and floor", "a photo of a bed, lamp and sofa"][:B],
    }


@pytest.fixture(scope="module")
def iedp_seg():
    torch.manual_seed(0)
    return build_model(seg_config())


def reference_queries(module: ImplicitQueries, visual: torch.Tensor) -> torch.Tensor:
    """The paper's equations written out with plain matrix products, from the module's own weights."""

    def attention(mha, q_in, kv_in):
        D, h = mha.embed_dim, mha.num_heads
        wq, wk, wv = mha.in_proj_weight.split(D)
        bq, bk, bv = mha.in_proj_bias.split(D)
        q, k, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
        B = q.shape[0]
        q, k, v = (t.view(B, -1, h, D // h).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) / (D // h) ** 0.5, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(B, -1, D)
        return out @ mha.out_proj.weight.T + mha.out_proj.bias

    projected = module.projector(visual)
    q = module.queries.expand(visual.shape[0], -1, -1)
    for layer in module.layers:
        x = F.layer_norm(q, (q.shape[-1],), layer.norm_self.weight, layer.norm_self.bias)
        q_s = q + attention(layer.self_attn, x, x)
        v = F.layer_norm(projected, (q.shape[-1],), layer.norm_visual.weight, layer.norm_visual.bias)
        x = F.layer_norm(q_s, (q.shape[-1],), layer.norm_cross.weight, layer.norm_cross.bias)
        q_c = q_s + attention(layer.cross_attn, x, v)
        x = F.layer_norm(q_c, (q.shape[-1],), layer.norm_ffn.weight, layer.norm_ffn.bias)
        q = q_c + layer.ffn[2](F.gelu(layer.ffn[0](x)))
    return q


@pytest.mark.parametrize("num_layers", [1, 2])
def test_query_module_computes_the_papers_equations(num_layers):
    torch.manual_seed(0)
    module = ImplicitQueries(visual_dim=24, dim=16, num_queries=5, num_layers=num_layers, num_heads=4).eval()
    visual = torch.randn(3, 9, 24)
    out = module(visual)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out, reference_queries(module, visual), atol=1e-5, rtol=1e-5)
    weights = module.cross_attention(visual)
    assert weights.shape == (3, 5, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    # the queries read the image: other visual tokens, other implicit tokens
    assert (module(visual) - module(visual.flip(0))).abs().amax() > 1e-3


def test_query_module_at_real_size_on_meta_device():
    with torch.device("meta"):
        module = ImplicitQueries(visual_dim=1024, dim=768)  # CLIP ViT-L/14 -> SD v1.5's context width
        out = module(torch.empty(2, 257, 1024))
    assert out.shape == (2, 77, 768)
    # projector (1024·768 + 768 + 768² + 768) + queries (77·768) + one layer (2 attentions, FFN ×4, 4 norms)
    layer = 2 * (4 * 768 * 768 + 4 * 768) + (8 * 768 * 768 + 5 * 768) + 4 * 2 * 768
    expected = 1024 * 768 + 768 + 768 * 768 + 768 + 77 * 768 + layer
    assert sum(p.numel() for p in module.parameters()) == expected
    with pytest.raises(ValueError, match="implicit_heads"):
        ImplicitQueries(visual_dim=8, dim=30, num_heads=8)


def test_iedp_trains_the_queries_and_keeps_clip_frozen(iedp_seg):
    model = iedp_seg.train()
    assert not model.implicit.training and not model.implicit.image_encoder.training
    assert all(not p.requires_grad for p in model.implicit.parameters())
    queries = dict(model.implicit_queries.named_parameters())
    assert {"queries", "projector.0.weight", "layers.0.cross_attn.in_proj_weight"} <= set(queries)
    assert all(p.requires_grad for p in queries.values())
    losses = model(seg_batch(model))
    names = [
        "queries",
        "projector.0.weight",
        "layers.0.self_attn.in_proj_weight",
        "layers.0.cross_attn.in_proj_weight",
        "layers.0.ffn.2.weight",
    ]
    implicit = torch.autograd.grad(losses["loss_implicit"], [queries[n] for n in names], retain_graph=True)
    for name, grad in zip(names, implicit, strict=True):
        assert grad.abs().sum() > 0, name
    model.zero_grad()


def test_only_the_implicit_loss_trains_the_queries():
    """With per-sample head norms the explicit loss leaves the queries untouched; with BatchNorm the 2B call's
    shared batch statistics are the only link between the branches."""
    torch.manual_seed(0)
    model = build_model(seg_config(head_norm="gn")).train()
    losses = model(seg_batch(model))
    params = list(model.implicit_queries.parameters())
    grads = torch.autograd.grad(losses["loss_explicit"], params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_both_branches_share_one_unet_call_equal_to_separate_calls(iedp_seg):
    model = iedp_seg.eval()
    batch = seg_batch(model)
    C, T = model.num_classes, 77
    implicit = model.context(model.guidance_tokens("implicit", batch["image"], batch), 2)
    explicit = model.context(model.guidance_tokens("explicit", batch["image"], batch), 2)
    assert implicit.shape == explicit.shape == (2, C + T, model.unet.config.cross_attention_dim)
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            together = model.run_branches(("implicit", "explicit"), batch)
            assert calls == [4]
            apart = {b: model.run_branches((b,), batch)[b] for b in ("implicit", "explicit")}
    finally:
        hook.remove()
    for branch in ("implicit", "explicit"):
        torch.testing.assert_close(together[branch], apart[branch], atol=1e-5, rtol=1e-5)
    assert (together["implicit"] - together["explicit"]).abs().amax() > 1e-4


def autograd_nodes(output: torch.Tensor) -> list:
    """Every node of ``output``'s backward graph."""
    nodes, stack = [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            stack.extend(child for child, _ in node.next_functions)
    return nodes


def test_the_shared_call_splits_the_branches_before_resizing_to_the_input(iedp_seg):
    """The 2B head output is split at the head's size, so the backward never joins two full-size logit maps."""
    K = iedp_seg.num_classes
    nodes = autograd_nodes(iedp_seg.train()(seg_batch(iedp_seg))["loss"])

    def inputs_of(op: str) -> list[tuple[int, ...]]:
        """Shapes of the logit maps (K channels) that ``op`` took in the forward."""
        sizes = [tuple(node._saved_self_sym_sizes) for node in nodes if node.name() == op]
        return [size for size in sizes if len(size) == 4 and size[1] == K]

    (split,) = inputs_of("SplitBackward0")
    assert split[0] == 4 and split[-1] < SIZE  # both branches, at the head's size
    assert inputs_of("UpsampleBilinear2DBackward0") == [(2, *split[1:])] * 2


def test_explicit_sequence_is_the_text_encoders_last_hidden_states(iedp_seg):
    explicit = iedp_seg.explicit
    prompts = ["a photo of a wall and floor", "a photo"]
    tokens = explicit(prompts)
    ids = explicit.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = explicit.text_encoder.text_model(input_ids=ids).last_hidden_state
    assert tokens.shape == (2, 77, explicit.text_encoder.config.hidden_size)
    torch.testing.assert_close(tokens, expected)


def test_implicit_pooled_is_the_frozen_image_embedding():
    torch.manual_seed(0)
    model = build_model(seg_config(implicit="pooled", explicit_tokens="projected")).eval()
    assert model.implicit_queries is None
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        expected = model.implicit.image_encoder(pixel_values=model.implicit.preprocess(images)).image_embeds
        text = model.explicit.text_encoder(**model.explicit.tokenizer(["a photo"], return_tensors="pt"))
    torch.testing.assert_close(model.guidance_tokens("implicit", images, {}), expected[:, None])
    torch.testing.assert_close(
        model.guidance_tokens("explicit", images, {"prompt": ["a photo"]}), text.text_embeds[:, None]
    )


def test_methods_without_the_implicit_branch_have_no_query_module():
    for method in ("vpd", "explicit"):
        assert build_model(seg_config(method)).implicit_queries is None
    assert build_model(depth_config("implicit")).implicit_queries is not None


def test_checkpoint_carries_the_queries_and_needs_no_text_tower(tmp_path):
    torch.manual_seed(0)
    model_cfg = depth_config(implicit_queries=7, implicit_layers=2)
    model = build_model(model_cfg).eval()
    save_model(model, Config(model=model_cfg), tmp_path / "ckpt")
    loaded, config = load_model(tmp_path / "ckpt")
    assert loaded.explicit is None and config.model.implicit_queries == 7
    assert loaded.implicit_queries.queries.shape == (7, model.unet.config.cross_attention_dim)
    for key, value in model.implicit_queries.state_dict().items():
        assert torch.equal(value, loaded.implicit_queries.state_dict()[key]), key
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            model({"image": image}, mode="predict"), loaded({"image": image}, mode="predict")
        )


def test_checkpoint_from_before_the_query_module_still_loads(tmp_path):
    torch.manual_seed(0)
    model_cfg = seg_config(implicit="pooled", explicit_tokens="projected", class_embedding="projected")
    model = build_model(model_cfg).eval()
    save_model(model, Config(model=model_cfg), tmp_path / "old")
    meta = json.loads((tmp_path / "old" / CONFIG_NAME).read_text())
    old_model = {
        k: v
        for k, v in meta["config"]["model"].items()
        if not k.startswith(("implicit", "explicit_tokens", "class_max"))
    }
    meta["config"]["model"] = old_model | {"implicit_tokens": "pooled"}  # the keys of iedp before this change
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps(meta))
    loaded, config = load_model(tmp_path / "old")
    assert (config.model.implicit, config.model.explicit_tokens) == ("pooled", "projected")
    batch = seg_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(batch, mode="predict"), loaded(batch, mode="predict"))


def test_scene_tokens_average_clip80_templates_with_spaces(iedp_seg, tmp_path):
    explicit = iedp_seg.explicit
    bank = class_token_bank(explicit, ["living_room", "office"], "clip80", "pooled", tmp_path, max_length=20)
    from iedp.resources import read_names

    templates = read_names("clip80_templates.txt")
    assert len(templates) == 80 and all("{}" in t for t in templates)
    expected = explicit.embed([t.format("living room") for t in templates], "pooled", max_length=20).mean(0)
    torch.testing.assert_close(bank[0], expected, atol=1e-5, rtol=1e-5)
    single = class_token_bank(explicit, ["living_room"], "a photo of a {}.", "pooled", tmp_path)
    with torch.no_grad():
        ids = explicit.tokenizer(["a photo of a living room."], return_tensors="pt").input_ids
        pooled = explicit.text_encoder.text_model(input_ids=ids).pooler_output  # un-projected, VPD's
    torch.testing.assert_close(single[0], pooled[0], atol=1e-5, rtol=1e-5)


def test_bad_query_settings_are_one_line_errors():
    with pytest.raises(InputError, match="model.implicit_queries"):
        Config(model=seg_config(implicit_queries=0))
    with pytest.raises(InputError, match="model.implicit: 'clip'"):
        Config(model=dataclasses.replace(seg_config(), implicit="clip"))


def test_implicit_attention_maps_over_clip_patches(iedp_seg):
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    maps = iedp_seg.implicit_attention(images)
    config = iedp_seg.implicit.image_encoder.config
    grid = config.image_size // config.patch_size
    assert maps.shape == (2, 77, grid, grid)
    cls_share = iedp_seg.implicit_queries.cross_attention(iedp_seg.implicit(images))[..., 0]
    torch.testing.assert_close(maps.sum((-1, -2)) + cls_share, torch.ones(2, 77))
    with pytest.raises(ValueError, match="model.implicit=queries"):
        build_model(seg_config("vpd")).implicit_attention(images)
