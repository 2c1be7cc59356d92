"""Models: forward and losses at many batch sizes, state-dict compatibility with the original, checkpoint loading."""
from __future__ import annotations

import os
import re

import pytest
import torch

import img_text_composition_models as M
import text_model
from errors import UserInputError

# A copy of ../shared/reference/original_state_dict_keys.txt (read off the original code), so the test runs anywhere.
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "original_state_dict_keys.txt")
TEXTS = ["red apple", "green apple", "blue ball", "red ball"]  # 5 words + <UNK> = 6 embedding rows
QUERIES = ["red", "replace red with blue", "green ball", "large", "small apple", "circle", "blue"]
EXPECTED_TERMS = {
    "imgonly": set(), "textonly": set(), "concat": set(), "tirg": set(), "tirg_lastconv": set(),
    "composeAE": {"L2_loss", "L2_loss_text", "rot_sym_loss"},
    "RealSpaceConcatAE": {"L2_loss", "L2_loss_text"},
}


def encoder(kind: str, bert_path: str | None = None):
    if kind == "lstm":
        return text_model.build_text_encoder("lstm", TEXTS)
    return text_model.build_text_encoder("bert", bert_model=bert_path)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def texts(n: int) -> list[str]:
    return [QUERIES[i % len(QUERIES)] for i in range(n)]


@pytest.mark.parametrize("name", list(M.MODELS))
@pytest.mark.parametrize("kind", ["lstm", "bert"])
def test_forward_and_losses_at_many_batch_sizes(name, kind, tiny_bert_32):
    torch.manual_seed(0)
    model = M.build_model(name, encoder(kind, tiny_bert_32))
    model.train()
    for i, batch in enumerate([2, 7, 32, 100]):
        loss_name = ("soft_triplet", "batch_based_classification")[i % 2]
        model.zero_grad()
        terms = model.compute_loss(images(batch, seed=i), texts(batch), images(batch, seed=i + 10), loss_name)
        assert set(terms) == {loss_name} | EXPECTED_TERMS[name]
        total = M.total_loss(terms, [1.0, 0.1, 0.1, 0.01])
        assert torch.isfinite(total)
        total.backward()
        assert model.img_model.conv1.weight.grad.abs().sum() > 0  # gradients reach the image encoder
        assert model.normalization_layer.norm_s.grad is not None
        if model.text_model is not None and name != "imgonly":
            assert model.text_model.embedding_layer.weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        out = model.compose_img_text(images(1), ["red"])["repres"]
        emb, state = model.image_features(images(3))
    assert out.shape == (1, 512) and emb.shape == (3, 512)
    assert state.shape[0] == 3


def read_reference() -> dict[str, dict[str, tuple]]:
    sections, current = {}, None
    with open(REFERENCE) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                current = sections.setdefault(line[3:], {})
            elif line and not line.startswith("#") and current is not None:
                key, shape = line.split("\t")
                current[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return sections


@pytest.mark.parametrize("section,name,kind", [
    ("TIRG (use_bert=False, image_embed_dim=512, text_embed_dim=512)", "tirg", "lstm"),
    ("TIRG (use_bert=True, image_embed_dim=512, text_embed_dim=768)", "tirg", "bert"),
    ("ComposeAE (use_bert=True, image_embed_dim=512, text_embed_dim=768)", "composeAE", "bert"),
    ("RealSpaceConcatAE (use_bert=True, image_embed_dim=512, text_embed_dim=768)", "RealSpaceConcatAE", "bert"),
])
def test_state_dict_keys_and_shapes_equal_the_original(section, name, kind, tiny_bert_768):
    reference = read_reference()[section]
    if kind == "bert":  # the original's unused LSTM inside BERT models is not part of this project's models
        reference = {k: v for k, v in reference.items() if not k.startswith("text_model.")}
    ours = {k: tuple(v.shape) for k, v in M.build_model(name, encoder(kind, tiny_bert_768)).state_dict().items()}
    assert list(ours) == list(reference)  # same keys, same order
    assert ours == reference


def test_baseline_keys_follow_google_tirg():
    """imgonly/textonly/concat/tirg_lastconv have no reference file; their keys follow google/tirg's modules."""
    concat = M.build_model("concat", encoder("lstm")).state_dict()
    assert {k for k in concat if k.startswith("composer.")} >= {"composer.m.0.weight", "composer.m.2.weight",
                                                               "composer.m.3.running_var", "composer.m.6.weight"}
    assert tuple(concat["composer.m.6.weight"].shape) == (512, 1024)
    last = M.build_model("tirg_lastconv", encoder("lstm")).state_dict()
    assert tuple(last["mod2d.1.weight"].shape) == (1024, 1024, 3, 3)
    assert tuple(last["mod2d_gate.3.weight"].shape) == (512, 1024, 3, 3)
    assert "text_proj.weight" not in M.build_model("textonly", encoder("lstm")).state_dict()


def original_style_state(model: M.ImgEncoderTextEncoderBase, vocab_rows: int = 6) -> dict[str, torch.Tensor]:
    """The state dict the original code would save for ``model``: BERT models also carry an unused LSTM."""
    state = dict(model.state_dict())
    if model.text_model is None:
        d = model.text_embed_dim
        state.update({"text_model.embedding_layer.weight": torch.randn(vocab_rows, d),
                      "text_model.lstm.weight_ih_l0": torch.randn(4 * d, d),
                      "text_model.lstm.weight_hh_l0": torch.randn(4 * d, d),
                      "text_model.lstm.bias_ih_l0": torch.randn(4 * d),
                      "text_model.lstm.bias_hh_l0": torch.randn(4 * d),
                      "text_model.fc_output.1.weight": torch.randn(d, d),
                      "text_model.fc_output.1.bias": torch.randn(d)})
    return state


@pytest.mark.parametrize("name", ["composeAE", "tirg", "RealSpaceConcatAE"])
def test_original_state_dict_loads_and_gives_the_same_features(name, tiny_bert_32, caplog):
    torch.manual_seed(1)
    source = M.build_model(name, encoder("bert", tiny_bert_32)).train()
    source.compute_loss(images(8), texts(8), images(8, seed=3), "batch_based_classification")  # move BN stats
    state = original_style_state(source)
    torch.manual_seed(2)
    loaded = M.build_model(name, encoder("bert", tiny_bert_32))
    with caplog.at_level("INFO"):
        M.load_model_state(loaded, state, "orig.pth")
    assert "skipping 7 unused LSTM" in caplog.text
    source.eval(), loaded.eval()
    with torch.inference_mode():
        a = source.compose_img_text(images(5, seed=7), texts(5))["repres"]
        b = loaded.compose_img_text(images(5, seed=7), texts(5))["repres"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_state_dict_is_a_user_error(tiny_bert_32):
    state = M.build_model("tirg", encoder("lstm")).state_dict()
    with pytest.raises(UserInputError, match="does not fit"):
        M.load_model_state(M.build_model("composeAE", encoder("bert", tiny_bert_32)), state, "x.pth")


def test_conjugate_rotation_negates_the_imaginary_part():
    proj = M.ComplexProjectionModule(16, 8).eval()
    img, txt = torch.randn(4, 16), torch.randn(4, 8)
    plus, minus = proj(img, txt, 1.0), proj(img, txt, -1.0)
    torch.testing.assert_close(plus["concat"][:, :16], minus["concat"][:, :16])
    torch.testing.assert_close(plus["concat"][:, 16:], -minus["concat"][:, 16:])
    z = plus["channels"][:, 0]
    torch.testing.assert_close(plus["concat"][:, :16] ** 2 + plus["concat"][:, 16:] ** 2, z ** 2)  # |z e^{i d}| = |z|
    torch.testing.assert_close(plus["channels"][:, 2], img)


def test_rot_sym_loss_is_the_base_loss_between_conjugate_composition_of_target_and_source(tiny_bert_32):
    torch.manual_seed(0)
    model = M.build_model("composeAE", encoder("bert", tiny_bert_32)).eval()  # eval: dropout/BN deterministic
    src, tgt, txt = images(6), images(6, seed=1), texts(6)
    terms = model.compute_loss(src, txt, tgt, "batch_based_classification")
    with torch.no_grad():
        t = model.extract_text_feature(txt)
        back = model.compose_img_text_features(model.extract_img_feature(tgt), t, conjugate=-1.0)["repres"]
        expected = M.torch_functions.batch_based_classification_loss(
            model.normalization_layer(back), model.normalization_layer(model.extract_img_feature(src)))
    torch.testing.assert_close(terms["rot_sym_loss"].detach(), expected)


def test_total_loss_weights_terms_by_name():
    terms = {"soft_triplet": torch.tensor(2.0), "L2_loss": torch.tensor(3.0), "L2_loss_text": torch.tensor(5.0),
             "rot_sym_loss": torch.tensor(7.0)}
    assert M.total_loss(terms, [1.0, 0.1, 0.1, 0.01]).item() == pytest.approx(2.0 + 0.3 + 0.5 + 0.07)
    assert M.total_loss({"batch_based_classification": torch.tensor(2.0)}, [0.5, 1, 1, 1]).item() == 1.0


def test_uint8_images_are_normalised_like_totensor_and_normalize():
    import torchvision.transforms as T
    from PIL import Image
    import numpy as np
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = T.Compose([T.ToTensor(), T.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD)])(Image.fromarray(arr))
    got = M.normalize_images(torch.from_numpy(arr).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(got, expected)


def test_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="unknown --model"):
        M.build_model("nope", encoder("lstm"))
    with pytest.raises(UserInputError, match="--image_weights"):
        M.build_image_encoder(512, str(tmp_path / "missing.pth"))
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bogus.pth")
    with pytest.raises(UserInputError, match="not a ResNet-18"):
        M.build_image_encoder(512, str(tmp_path / "bogus.pth"))


def test_image_weights_from_a_state_dict_file(tmp_path):
    import torchvision
    torch.manual_seed(3)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    enc = M.build_image_encoder(128, str(tmp_path / "r18.pth"))
    torch.testing.assert_close(enc.conv1.weight, ref.conv1.weight)
    assert enc.fc[0].weight.shape == (128, 512)


@pytest.mark.parametrize("name", ["composeAE", "tirg_lastconv", "tirg"])
def test_fused_image_pass_equals_two_passes_when_batchnorm_uses_running_stats(name, tiny_bert_32):
    """--fuse_image_passes only changes which images BatchNorm's batch statistics cover: with running statistics
    (eval mode) the loss terms are the same as the original's two passes."""
    torch.manual_seed(0)
    model = M.build_model(name, encoder("bert", tiny_bert_32)).eval()
    src, tgt, txt = images(6), images(6, seed=1), texts(6)
    two = model.compute_loss(src, txt, tgt, "batch_based_classification")
    model.fuse_image_passes = True
    one = model.compute_loss(src, txt, tgt, "batch_based_classification")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
    model.train()  # and it trains: in train mode the statistics cover all 12 images, so the value differs
    fused_train = model.compute_loss(src, txt, tgt, "batch_based_classification")
    assert torch.isfinite(M.total_loss(fused_train, [1, .1, .1, .01]))
