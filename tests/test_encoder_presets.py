"""Each timm ViT preset against its model card (issue 15): the reference is the card's own definition typed
out in ``tests/encoder_references.py`` (the card's ``timm.create_model`` arguments, its torchvision
transform on a PIL image, its output rule on ``model(x)``), with random weights saved to a safetensors file
by the reference's own key names; ``build_encoder(name, file)`` must give the same features on the same
uint8 patches. Built with one block (``depth=1``) through the very code path of the full model; the
full-size check per family is ``benchmarks/encoder_fidelity.py`` (results in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from encoder_references import (IMAGENET, REFERENCES, min_cosine, randomize_, reference_features,
                                tissue_patches)
from safetensors.torch import save_file
from torchvision import transforms as T

from slidechat.features.encoders import (build_encoder, format_preset_table, get_preset, preset_table,
                                         registered_presets)
from slidechat.utils.errors import SlideChatError

DEPTH = 1
# The bound. Both sides run the same float32 operations on the same pixels (the project's PIL resize
# is bit exact, tests/test_encoders.py), so the observed cosines are 1 - 1e-15; a near-miss moves them below
# the bound: test_bound_rejects_near_misses measures two (0.999952 and 0.999913 on these patches).
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def patches():
    """Two synthetic tissue patches at each size (the four classes): the authors' tile size and one that
    the card's transform resizes."""
    return {224: tissue_patches(224, 2, seed=3), 256: tissue_patches(256, 2, seed=3, first_class=2),
            384: tissue_patches(384, 2, seed=3, first_class=1)}


def _card_weights(name: str, tmp_path, seed: int = 0):
    """The card's model with random weights, and the safetensors file holding them by its key names."""
    model = randomize_(REFERENCES[name].model(DEPTH), seed=seed)
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


# presets that read the same card model (H0-mini's two output rules) share one reference and one file
CASES = [("uni",), ("uni2_h",), ("virchow",), ("virchow2",), ("h_optimus_0",), ("h_optimus_1",),
         ("h0_mini", "h0_mini_cls"), ("gigapath",), ("musk", "musk_ms")]


def test_cases_cover_every_reference():
    assert sorted(n for case in CASES for n in case) == sorted(REFERENCES)


@pytest.mark.parametrize("names", CASES, ids=lambda names: "+".join(names))
def test_preset_gives_its_model_cards_features(names, patches, tmp_path):
    model, path = _card_weights(names[0], tmp_path)
    for name in names:
        ref = REFERENCES[name]
        encoder = build_encoder(name, path, depth=DEPTH)
        assert encoder.embed_dim == ref.dim == get_preset(name)[0].dim
        assert encoder.provenance()["encoder_preset"] == name and encoder.checkpoint_sha256 != "none"
        for size in ref.sizes:
            want = reference_features(ref, model, patches[size])
            with torch.inference_mode():
                got = encoder(torch.from_numpy(patches[size]))
            assert got.shape == want.shape == (len(patches[size]), ref.dim)
            assert min_cosine(got, want) >= MIN_COSINE, (name, size, min_cosine(got, want))


def test_bound_rejects_near_misses(patches):
    """The bound is tight enough to catch the mistakes a preset could make silently: Virchow2's register
    tokens averaged in with the patch tokens, and torchvision's default bilinear for the card's bicubic."""
    ref = REFERENCES["virchow2"]
    model = randomize_(ref.model(DEPTH), seed=0)
    right = reference_features(ref, model, patches[256])
    registers_averaged = dataclasses.replace(ref, output=REFERENCES["virchow"].output)
    bilinear = dataclasses.replace(ref, transform=lambda size: T.Compose(
        [T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(**IMAGENET)]))
    assert min_cosine(reference_features(registers_averaged, model, patches[256]), right) < MIN_COSINE
    assert min_cosine(reference_features(bilinear, model, patches[256]), right) < MIN_COSINE
    # and the features are not a constant: the two tissue classes differ
    assert float(torch.nn.functional.cosine_similarity(right[:1], right[1:])) < 0.99


def _one_line_error_naming(path, call) -> str:
    with pytest.raises(SlideChatError) as err:
        call()
    text = str(err.value)
    assert str(path) in text and "\n" not in text, text
    return text


@pytest.mark.parametrize("change", ["missing", "unexpected", "another_model"])
def test_checkpoint_must_hold_exactly_the_cards_keys(change, tmp_path):
    model, path = _card_weights("h0_mini", tmp_path)
    sd, encoder = model.state_dict(), "h0_mini"
    if change == "missing":
        sd.pop("blocks.0.mlp.fc2.bias")
    elif change == "unexpected":
        sd["head.weight"] = torch.zeros(10, 768)
    else:  # the same family's small model passed for its large one: same key names, other shapes
        encoder = "h_optimus_0"
    bad = tmp_path / f"{change}.safetensors"
    save_file(sd, str(bad))
    text = _one_line_error_naming(bad, lambda: build_encoder(encoder, bad, depth=DEPTH))
    # missing/unexpected keys name the flag to fix; a shape mismatch names the shapes
    assert f"--encoder {encoder}" in text if change != "another_model" else "(768,) vs model (1536,)" in text


def test_musk_tokens_equal_torchscales_elementwise(tmp_path):
    """Every output token of the image tower, not just the cosine of the feature: a cosine bound cannot see
    the tanh approximation of GELU (0.99999993 at full size), an element-wise one can. Tolerance: both sides
    run float32 in different summation orders (torchscale's bmm + softmax against PyTorch's fused attention:
    2.4e-6 max abs on tokens up to 6.3, with 1 or 2 threads); tanh-GELU moves tokens by 1e-3."""
    model = randomize_(REFERENCES["musk"].model(DEPTH), seed=2)
    path = tmp_path / "musk.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if k != "beit3.text_embed.weight"}, str(path))
    encoder = build_encoder("musk", path, depth=DEPTH)
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.beit3(visual_tokens=x)["encoder_out"]
        got = encoder.beit3.encoder(encoder.beit3.vision_embed(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["no_text_side", "missing", "unexpected"])
def test_musk_loads_the_image_side_strictly(change, tmp_path):
    """MUSK's file is the whole vision-language model: the text side (multiway branch B, the text embedding,
    the heads) is left unused by name, so a file without it loads too; the image side is strict."""
    model = randomize_(REFERENCES["musk_ms"].model(DEPTH), seed=0)
    sd = {k: v for k, v in model.state_dict().items() if k != "beit3.text_embed.weight"}  # 262 MB, unused
    if change == "missing":
        sd.pop("beit3.encoder.layers.0.self_attn.inner_attn_ln.A.weight")
    elif change == "unexpected":
        sd["beit3.encoder.layers.0.self_attn.rel_pos_bias.A.weight"] = torch.zeros(3)
    path = tmp_path / f"{change}.safetensors"
    save_file(sd, str(path))
    if change == "no_text_side":
        assert build_encoder("musk", path, depth=DEPTH).checkpoint_sha256 != "none"
    else:
        assert "--encoder musk_ms" in _one_line_error_naming(path, lambda: build_encoder("musk_ms", path,
                                                                                          depth=DEPTH))


def test_no_two_presets_write_to_one_trident_folder():
    """TRIDENT's ``musk`` is the class token: the multi-scale features must not land in ``features_musk`` too."""
    from slidechat.features.encoders.registry import register_encoder
    folders = [p.trident_name or p.name for p in registered_presets()]  # the rule, written out
    assert len(folders) == len(set(folders)) and get_preset("musk")[0].trident_name == "musk"
    musk = get_preset("musk")[0]
    with pytest.raises(ValueError, match="features_musk"):  # another preset claiming TRIDENT's musk
        register_encoder(lambda: dataclasses.replace(musk, name="musk_other", trident_name="musk", aliases=()))
    with pytest.raises(ValueError, match="features_musk_ms"):  # a TRIDENT name equal to another preset's name
        register_encoder(lambda: dataclasses.replace(musk, name="musk_again", trident_name="musk_ms", aliases=()))
    assert not {"musk_other", "musk_again"} & {p.name for p in registered_presets()}


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SlideChatError, match="needs local weights.*--checkpoint"):
        build_encoder("virchow2")
    missing = tmp_path / "nowhere.safetensors"
    _one_line_error_naming(missing, lambda: build_encoder("gigapath", missing))


def test_list_encoders_table_comes_from_the_registry():
    """Every registered preset is a row, with the registry's name and dimension (the model's real width is
    checked against the preset's when it is built, and by the fidelity test above)."""
    from slidechat.features.encoders import registered_presets

    table = format_preset_table(preset_table()).splitlines()
    assert table[0].split()[:2] == ["name", "dim"]
    rows = {line.split()[0]: line.split()[1] for line in table[1:]}
    presets = {p.name + ("<model_name>" if p.parametric else ""): p for p in registered_presets()}
    assert set(rows) == set(presets)
    for name, ref in REFERENCES.items():
        assert rows[name] == str(presets[name].dim) == str(ref.dim)
