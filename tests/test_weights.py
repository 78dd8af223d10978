"""The tiny preset through the real loading code, and the loaders' errors on bad paths (no network)."""

from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from iedp.errors import InputError
from iedp.weights import (
    TINY_VERSION,
    learn_bpe_merges,
    load_clip,
    load_stable_diffusion,
    loaders,
    make_tiny,
    resolve_weights,
    tiny,
)

PROMPT = "a photo of a wall, floor and bed"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def clip(tiny_dir: Path) -> tuple:
    return load_clip(str(tiny_dir / "clip"))


def test_tiny_sd_has_sd_structure(tiny_dir: Path) -> None:
    unet, vae = load_stable_diffusion(str(tiny_dir))
    assert type(unet) is UNet2DConditionModel and type(vae) is AutoencoderKL
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert tuple(latents.shape) == (1, 4, 8, 8)  # VAE factor 8, 4 latent channels


def test_tiny_clip_embeddings_match_unet_context(tiny_dir: Path, clip: tuple) -> None:
    vision, text_model, tokenizer = clip
    assert type(vision) is CLIPVisionModelWithProjection
    assert type(text_model) is CLIPTextModelWithProjection
    assert isinstance(tokenizer, CLIPTokenizer)
    unet, _ = load_stable_diffusion(str(tiny_dir))
    size = vision.config.image_size
    tokens = tokenizer([PROMPT, "a photo of a kitchen"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        image_embeds = vision(pixel_values=torch.rand(2, 3, size, size)).image_embeds
        text_embeds = text_model(**tokens).text_embeds
        sample = unet(torch.rand(2, 4, 8, 8), 1, encoder_hidden_states=image_embeds[:, None]).sample
    assert image_embeds.shape == text_embeds.shape == (2, unet.config.cross_attention_dim)
    assert tokens.input_ids.shape == (2, 77)
    assert tuple(sample.shape) == (2, 4, 8, 8)


def test_tiny_tokenizer_round_trip(clip: tuple) -> None:
    tokenizer = clip[2]
    ids = tokenizer(PROMPT).input_ids
    # <|startoftext|> + one token per word and for the comma + <|endoftext|>.
    assert len(ids) == 11
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # CLIP decodes "</w>" as a space, so punctuation comes back spaced out, as with the real tokenizer.
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == PROMPT
    unseen = "Zebra-striped xylophone"
    assert (
        tokenizer.decode(tokenizer(unseen).input_ids, skip_special_tokens=True) == "zebra - striped xylophone"
    )


def test_load_clip_without_text(tiny_dir: Path) -> None:
    vision, text_model, tokenizer = load_clip(str(tiny_dir / "clip"), text=False)
    assert type(vision) is CLIPVisionModelWithProjection and text_model is None and tokenizer is None


def test_loaders_apply_dtype(tiny_dir: Path) -> None:
    unet, vae = load_stable_diffusion(str(tiny_dir), dtype=torch.bfloat16)
    vision, _, _ = load_clip(str(tiny_dir / "clip"), dtype=torch.bfloat16, text=False)
    assert {unet.dtype, vae.dtype, vision.dtype} == {torch.bfloat16}


def test_make_tiny_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again")
    other_seed = make_tiny(tmp_path / "seed1", seed=1)
    for weights_file in ("unet/diffusion_pytorch_model.safetensors", "clip/model.safetensors"):
        first = safetensors.torch.load_file(tiny_dir / weights_file)
        second = safetensors.torch.load_file(again / weights_file)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
        third = safetensors.torch.load_file(other_seed / weights_file)
        assert not all(torch.equal(first[key], third[key]) for key in first)
    for name in ("vocab.json", "merges.txt"):
        assert (tiny_dir / "clip" / name).read_bytes() == (again / "clip" / name).read_bytes()


def test_learn_bpe_merges_breaks_ties_by_smallest_pair() -> None:
    words = {("a", "b", "c</w>"): 2, ("a", "b</w>"): 1}
    # (a, b) and (b, c</w>) both occur twice: the smaller pair goes first.
    assert learn_bpe_merges(words) == [("a", "b"), ("ab", "c</w>"), ("a", "b</w>")]


def test_single_file_config_is_sd_v1_5() -> None:
    # The embedded LDM config must convert to SD v1.5's diffusers config, or a real v1.5 file would not load.
    unet = create_unet_diffusers_config_from_ldm(loaders._SD_V1_ORIGINAL_CONFIG, checkpoint={})
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["layers_per_block"]) == (768, 8, 2)
    assert unet["sample_size"] == 64 and unet["in_channels"] == unet["out_channels"] == 4
    vae = create_vae_diffusers_config_from_ldm(loaders._SD_V1_ORIGINAL_CONFIG, checkpoint={})
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert (vae["latent_channels"], vae["layers_per_block"], vae["scaling_factor"]) == (4, 2, 0.18215)


def test_sd_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(InputError, match=f"model.sd: {missing} does not exist"):
        load_stable_diffusion(str(missing))


def test_sd_folder_without_unet(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    with pytest.raises(InputError, match=f"model.sd: {tmp_path} has no unet/ folder"):
        load_stable_diffusion(str(tmp_path))


def test_sd_garbage_safetensors(tmp_path: Path) -> None:
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a checkpoint" * 4)
    with pytest.raises(InputError, match=f"model.sd: {garbage} is not a readable"):
        load_stable_diffusion(str(garbage))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd_file_without_sd_weights(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"other{suffix}"
    tensors = {"encoder.weight": torch.zeros(2, 2)}
    if suffix == ".safetensors":
        safetensors.torch.save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors}, path)
    with pytest.raises(InputError, match=f"model.sd: {path} is not a Stable Diffusion checkpoint"):
        load_stable_diffusion(str(path))


def test_sd_v2_single_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v2.safetensors"
    safetensors.torch.save_file(
        {loaders._SD_V1_PROBE_KEY: torch.zeros(4, 1024), "first_stage_model.x": torch.zeros(1)}, path
    )
    with pytest.raises(InputError, match="width 1024"):
        load_stable_diffusion(str(path))


def test_clip_folder_without_config(tiny_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_dir / "clip" / name).read_bytes())
    with pytest.raises(InputError, match=f"model.clip: {tmp_path} has no config.json"):
        load_clip(str(tmp_path))


def test_clip_folder_without_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_dir / "clip" / "config.json").read_bytes())
    with pytest.raises(InputError, match=f"model.clip: {tmp_path} has no tokenizer files"):
        load_clip(str(tmp_path))


def test_clip_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_clip(str(tmp_path / "missing"))
    a_file = tmp_path / "clip.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(InputError, match=f"model.clip: {a_file} is a file"):
        load_clip(str(a_file))


def test_clip_checkpoint_without_projection_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_dir / "clip" / name).read_bytes())
    tensors = safetensors.torch.load_file(tiny_dir / "clip" / "model.safetensors")
    del tensors["visual_projection.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="visual_projection.weight"):
        load_clip(str(tmp_path))


def test_resolve_weights_builds_tiny_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IEDP_CACHE", str(tmp_path))
    builds: list[Path] = []

    def counting_make_tiny(out_dir: Path) -> Path:
        builds.append(Path(out_dir))
        return make_tiny(out_dir)

    monkeypatch.setattr(tiny, "make_tiny", counting_make_tiny)
    expected = tmp_path / f"tiny-{TINY_VERSION}"
    assert resolve_weights("tiny") == (str(expected), str(expected / "clip"))
    assert resolve_weights("tiny") == (str(expected), str(expected / "clip"))
    assert len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [expected.name]  # no staging folder left
    sd_path, clip_path = resolve_weights("tiny")
    assert type(load_stable_diffusion(sd_path)[0]) is UNet2DConditionModel
    assert type(load_clip(clip_path)[0]) is CLIPVisionModelWithProjection


def test_resolve_weights_folder_and_overrides(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IEDP_CACHE", str(tmp_path / "cache"))
    assert resolve_weights(str(tiny_dir)) == (str(tiny_dir), str(tiny_dir / "clip"))
    assert resolve_weights(str(tiny_dir), clip="/other/clip") == (str(tiny_dir), "/other/clip")
    assert resolve_weights("tiny", sd="/sd.safetensors", clip="/clip") == ("/sd.safetensors", "/clip")
    assert not (tmp_path / "cache").exists()  # both parts overridden: nothing built
    with pytest.raises(InputError, match="model.weights: .* is not a folder"):
        resolve_weights(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", False),
        ("openai/clip-vit-large-patch14", False),
        ("./sd", True),
        ("~/sd", True),
        ("/abs/sd", True),
        ("models/sd/v1-5", True),
        ("sd.safetensors", True),
    ],
)
def test_hub_ids_are_told_from_local_paths(path: str, local: bool) -> None:
    assert loaders._looks_local(path) is local
