"""Image-text composition models: TIRG and its baselines (Vo et al., CVPR 2019, arXiv 1812.07119) and ComposeAE
(Anwaar, Labintcev and Kleinsteuber, WACV 2021, arXiv 2006.11149) with its real-space ablation.

Every model has the original code's layers, sizes, order and state-dict keys (outside the text encoder), so that
checkpoints written by the original code load here. The text width follows the text encoder (768 for BERT-base,
384 for MiniLM, 512 for the LSTM); nothing assumes a batch size or a device.
"""
from __future__ import annotations

import argparse

import functools
import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision

import distributed
import torch_functions
from text_model import BertTextEncoder, TextLSTMModel
from errors import UserInputError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Index of each named loss term in --loss_weights (the first weight is the base loss, whatever its name).
LOSS_WEIGHT_INDEX = {"L2_loss": 1, "L2_loss_text": 2, "rot_sym_loss": 3}


def normalize_images(imgs: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ToTensor's /255 then ImageNet normalisation, on the input's device.

    Float input is taken as already normalised and returned unchanged.
    """
    if imgs.dtype != torch.uint8:
        return imgs
    mean, std = _imagenet_stats(imgs.device)
    return (imgs.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) ImageNet mean and std on ``device``, made once per device: ``torch.tensor(..., device=cuda)``
    on every call was a blocking host-to-device copy (a host sync) per image batch."""
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors even when first called in evaluation
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device)
    return mean, std


def _read_resnet_state(path: str) -> dict:
    """The state dict in ``path`` for --image_weights; anything else (a text file, a bare tensor, a main.py
    checkpoint) is a UserInputError saying what it is."""
    expected = "pass a ResNet-18 state dict file (torchvision key names), imagenet or none"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, a text file, a torn or unsafe pickle
        lines = str(exc).strip().splitlines() or [""]
        raise UserInputError(f"--image_weights {path}: cannot read it as a PyTorch file ({type(exc).__name__}: "
                             f"{lines[0][:100]}); {expected}") from None
    if isinstance(state, dict) and "model_state_dict" in state:
        raise UserInputError(f"--image_weights {path}: this is a main.py checkpoint (a whole model with its "
                             f"training state), not a ResNet-18 state dict; evaluate it with --model_checkpoint, "
                             f"resume it with --resume, or {expected}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"--image_weights {path}: it holds a {type(state).__name__}, not a mapping of names to "
                             f"tensors; {expected}")
    return state


def build_image_encoder(image_embed_dim: int = 512, weights: str = "none") -> torchvision.models.ResNet:
    """torchvision ResNet-18, global average pooling, ``fc`` replaced by Sequential(Linear(512, image_embed_dim)).

    weights: ``imagenet`` (torchvision's ImageNet weights, the papers' setting), ``none`` (random init), or a path to
    a ResNet-18 state dict (torchvision key names; its ``fc`` is ignored).
    """
    if weights == "imagenet":
        try:
            model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except Exception as exc:  # no network and no cached file
            raise UserInputError(
                f"--image_weights imagenet: cannot get torchvision's ResNet-18 ImageNet weights ({exc}); put "
                f"resnet18-f37072fd.pth under $TORCH_HOME/hub/checkpoints, or pass --image_weights PATH or none"
            ) from None
    else:
        model = torchvision.models.resnet18(weights=None)
        if weights != "none":
            state = _read_resnet_state(weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("fc.")]:
                raise UserInputError(f"--image_weights {weights}: not a ResNet-18 state dict "
                                     f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # torchvision's avgpool is already a global AdaptiveAvgPool2d((1, 1)), the original's GlobalAvgPool2d.
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, image_embed_dim))
    return model


class ConCatModule(torch.nn.Module):
    """Concatenates a tuple of (B, *) tensors along dim 1."""

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tuple(x), dim=1)


class ImgEncoderTextEncoderBase(torch.nn.Module):
    """A ResNet-18 image encoder, a text encoder, a learnable-scale normalisation and the retrieval losses.

    Subclasses define ``compose_img_text_features`` and, where the paper adds them, extra loss terms.
    """

    uses_conjugate = False

    def __init__(self, text_encoder: TextLSTMModel | BertTextEncoder, image_embed_dim: int = 512,
                 image_weights: str = "none", normalize_scale: float = 4.0):
        super().__init__()
        self.normalization_layer = torch_functions.NormalizationLayer(normalize_scale=normalize_scale, learn_scale=True)
        self.img_model = build_image_encoder(image_embed_dim, image_weights)
        self.image_embed_dim = image_embed_dim
        self.text_embed_dim = text_encoder.dim
        if isinstance(text_encoder, torch.nn.Module):
            self.text_model = text_encoder  # trained with the model; keys text_model.* as in the original
            self.bert = None
        else:
            self.text_model = None
            # BERT is frozen and kept out of the state dict (the original ran it in a separate server).
            object.__setattr__(self, "bert", text_encoder)
        self.triplet_grad_scale = 0.5  # the original's effective soft-triplet gradient (see soft_triplet_loss)
        # Draws the soft-triplet negatives. Give it the same seed on every process so that all of them sample the
        # same triplets of the global batch; None uses the global RNG.
        self.loss_generator: torch.Generator | None = None
        self.fuse_image_passes = False  # see compute_loss

    # -- device handling: nn.Module.to/cuda/cpu all go through _apply; move the unregistered BERT along.
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.bert is not None:
            probe = fn(torch.zeros(1))
            self.bert.to(probe.device)
        return self

    # -- encoders
    def extract_img_feature(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or normalised float -> (B, image_embed_dim)."""
        return self.img_model(normalize_images(imgs))

    def image_features(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embedding (B, D) for the gallery, state for composition). The state is the embedding here."""
        emb = self.extract_img_feature(imgs)
        return emb, emb

    def extract_text_feature(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """B strings -> (B, text_embed_dim) on the model's device.

        A tensor is taken as the features of a frozen encoder computed beforehand and returned as it is (the CUDA
        graph step looks BERT's vectors up outside the graph); a trainable encoder needs the strings.
        """
        if isinstance(texts, torch.Tensor):
            if self.text_model is not None:
                raise ValueError("precomputed text features need a frozen text encoder (BERT): the LSTM trains")
            return texts
        if self.text_model is not None:
            return self.text_model(texts)
        return self.bert(texts)

    # -- composition
    def compose_img_text_features(self, img_state: torch.Tensor, text_features: torch.Tensor) -> dict:
        raise NotImplementedError

    def compose_img_text(self, imgs: torch.Tensor, texts: Sequence[str] | torch.Tensor) -> dict:
        _, state = self.image_features(imgs)
        return self.compose_img_text_features(state, self.extract_text_feature(texts))

    # -- losses
    def base_loss(self, name: str, composed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The base loss over the whole (global) batch: with several processes the features are all-gathered."""
        return torch_functions.base_retrieval_loss(
            name, distributed.gather_batch(composed), distributed.gather_batch(target),
            generator=self.loss_generator, triplet_grad_scale=self.triplet_grad_scale)

    def compute_loss(self, imgs_query: torch.Tensor, texts: Sequence[str] | torch.Tensor, imgs_target: torch.Tensor,
                     loss: str = "soft_triplet") -> dict[str, torch.Tensor]:
        """Named loss terms for one batch; the caller weights and sums them (see ``total_loss``).

        The base term is named by ``loss`` (``soft_triplet`` or ``batch_based_classification``), as the original
        logged it. The query and target images go through the image encoder in two passes, as in the original, so
        each pass has its own BatchNorm batch statistics. ``fuse_image_passes`` (opt-in, not the original) runs one
        pass over both: fewer, larger kernels, but BatchNorm then normalises with the statistics of all 2B images.
        """
        if self.fuse_image_passes:  # opt-in speed path: one ResNet pass over [query; target] (B + B images)
            b = imgs_query.shape[0]
            emb, state = self.image_features(torch.cat([imgs_query, imgs_target]))
            out = self.compose_img_text_features(state[:b], self.extract_text_feature(texts))
            target_raw = emb[b:]  # (B, D)
        else:
            out = self.compose_img_text(imgs_query, texts)
            target_raw = self.extract_img_feature(imgs_target)  # (B, D)
        composed = self.normalization_layer(out["repres"])
        target = self.normalization_layer(target_raw)
        terms = {loss: self.base_loss(loss, composed, target)}
        terms.update(self.extra_loss_terms(out, target_raw, loss))
        return terms

    def extra_loss_terms(self, out: dict, target_raw: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, imgs_query: torch.Tensor, texts: Sequence[str] | torch.Tensor, imgs_target: torch.Tensor,
                loss: str = "soft_triplet") -> dict[str, torch.Tensor]:
        """The training forward pass is ``compute_loss`` (so DistributedDataParallel can wrap the model)."""
        return self.compute_loss(imgs_query, texts, imgs_target, loss)


def total_loss(terms: dict[str, torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of named loss terms: ``weights[0]`` for the base loss, then L2_loss, L2_loss_text, rot_sym_loss
    (ComposeAE Eq. 13, default weights 1.0, 0.1, 0.1, 0.01 as the original's ``loss_weights``)."""
    return sum(weights[LOSS_WEIGHT_INDEX.get(name, 0)] * value for name, value in terms.items())


class SimpleModelImageOnly(ImgEncoderTextEncoderBase):
    """TIRG's image-only baseline: the query is the source image's feature."""

    def compose_img_text_features(self, img_state, text_features):
        return {"repres": img_state}


class SimpleModelTextOnly(ImgEncoderTextEncoderBase):
    """TIRG's text-only baseline: the query is the text feature.

    With a text encoder whose width differs from the image embedding (BERT), a Linear ``text_proj`` maps it to the
    image width (the original had no text-only BERT model).
    """

    def __init__(self, text_encoder, image_embed_dim=512, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        if self.text_embed_dim != image_embed_dim:
            self.text_proj = torch.nn.Linear(self.text_embed_dim, image_embed_dim)
        else:
            self.text_proj = torch.nn.Identity()

    def compose_img_text_features(self, img_state, text_features):
        return {"repres": self.text_proj(text_features)}


class Concat(ImgEncoderTextEncoderBase):
    """TIRG's concatenation baseline: an MLP over [image, text]."""

    def __init__(self, text_encoder, image_embed_dim=512, dropout: float = 0.1, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        merged = image_embed_dim + self.text_embed_dim

        class Composer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = torch.nn.Sequential(
                    torch.nn.BatchNorm1d(merged), torch.nn.ReLU(), torch.nn.Linear(merged, merged),
                    torch.nn.BatchNorm1d(merged), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                    torch.nn.Linear(merged, image_embed_dim))

            def forward(self, x):
                return self.m(torch.cat(x, dim=1))

        self.composer = Composer()

    def compose_img_text_features(self, img_state, text_features):
        return {"repres": self.composer((img_state, text_features))}


class TIRG(ImgEncoderTextEncoderBase):
    """TIRG (Vo et al. 2019, Eq. 1-3): phi = w_g * sigmoid(f_gate([x, t])) * x + w_r * f_res([x, t]).

    ``a`` holds the learnable weights [1, 10, 1, 1]; a[0] = w_g, a[1] = w_r.
    """

    def __init__(self, text_encoder, image_embed_dim=512, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        merged = image_embed_dim + self.text_embed_dim
        self.gated_feature_composer = torch.nn.Sequential(
            ConCatModule(), torch.nn.BatchNorm1d(merged), torch.nn.ReLU(), torch.nn.Linear(merged, image_embed_dim))
        self.res_info_composer = torch.nn.Sequential(
            ConCatModule(), torch.nn.BatchNorm1d(merged), torch.nn.ReLU(), torch.nn.Linear(merged, merged),
            torch.nn.ReLU(), torch.nn.Linear(merged, image_embed_dim))

    def compose_img_text_features(self, img_state, text_features):
        gate = self.gated_feature_composer((img_state, text_features))  # (B, D)
        res = self.res_info_composer((img_state, text_features))  # (B, D)
        return {"repres": torch.sigmoid(gate) * img_state * self.a[0] + res * self.a[1]}


class TIRGLastConv(ImgEncoderTextEncoderBase):
    """TIRG applied to the last convolutional map (Vo et al. 2019, Sec. 3.2, 'spatial' variant).

    The composition state of an image is its layer4 map (B, 512, h, w); the composed map is pooled and sent through
    ``img_model.fc``.
    """

    def __init__(self, text_encoder, image_embed_dim=512, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        ch = 512 + self.text_embed_dim

        def block():
            return torch.nn.Sequential(
                torch.nn.BatchNorm2d(ch), torch.nn.Conv2d(ch, ch, [3, 3], padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(ch, 512, [3, 3], padding=1))

        self.mod2d = block()
        self.mod2d_gate = block()

    def conv_map(self, imgs: torch.Tensor) -> torch.Tensor:
        """ResNet-18 up to layer4: (B, 3, H, W) -> (B, 512, h, w)."""
        m = self.img_model
        x = m.maxpool(m.relu(m.bn1(m.conv1(normalize_images(imgs)))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def pool_fc(self, x: torch.Tensor) -> torch.Tensor:
        return self.img_model.fc(torch.flatten(self.img_model.avgpool(x), 1))

    def image_features(self, imgs):
        x = self.conv_map(imgs)
        return self.pool_fc(x), x

    def compose_img_text_features(self, img_state, text_features):
        x = img_state  # (B, 512, h, w)
        y = text_features[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # (B, T, h, w)
        z = torch.cat((x, y), dim=1)
        x = self.a[0] * torch.sigmoid(self.mod2d_gate(z)) * x + self.a[1] * self.mod2d(z)
        return {"repres": self.pool_fc(x)}


class ComplexProjectionModule(torch.nn.Module):
    """ComposeAE Sec. 3.2: project the image to the complex space and rotate it by the text.

    z = gamma(x) (image_features), delta = eta(t) (bert_features); the query is z * e^{i delta} (Eq. 4), given as
    its real part z cos(delta) and imaginary part z * conj * sin(delta), where conj = -1 gives the complex conjugate
    rotation used by the rotational symmetry loss (Eq. 10).
    """

    def __init__(self, image_embed_dim: int = 512, text_embed_dim: int = 768, dropout: float = 0.5):
        super().__init__()
        self.bert_features = torch.nn.Sequential(
            torch.nn.BatchNorm1d(text_embed_dim), torch.nn.Linear(text_embed_dim, image_embed_dim), torch.nn.ReLU(),
            torch.nn.Linear(image_embed_dim, image_embed_dim))
        self.image_features = torch.nn.Sequential(
            torch.nn.BatchNorm1d(image_embed_dim), torch.nn.Linear(image_embed_dim, image_embed_dim),
            torch.nn.Dropout(p=dropout), torch.nn.ReLU(), torch.nn.Linear(image_embed_dim, image_embed_dim))

    def forward(self, img: torch.Tensor, text: torch.Tensor, conjugate: float = 1.0) -> dict[str, torch.Tensor]:
        z = self.image_features(img)  # (B, D)
        delta = self.bert_features(text)  # (B, D): the text as a rotation angle per dimension
        re = z * torch.cos(delta)
        im = z * (conjugate * torch.sin(delta))
        return {"concat": torch.cat([re, im], 1),  # (B, 2D)
                # the 5 channels of the convolutional mapping, in the original's order
                "channels": torch.stack([z, delta, img, re, im], dim=1)}  # (B, 5, D)


def bn_relu_mlp(in_dim: int, out_dim: int) -> torch.nn.Sequential:
    """BatchNorm, ReLU, Linear(in, out), ReLU, Linear(out, out): the original's mapping and decoder block (keys .0,
    .2, .4)."""
    return torch.nn.Sequential(torch.nn.BatchNorm1d(in_dim), torch.nn.ReLU(), torch.nn.Linear(in_dim, out_dim),
                               torch.nn.ReLU(), torch.nn.Linear(out_dim, out_dim))


class LinearMapping(torch.nn.Module):
    """ComposeAE's rho: the complex query [Re, Im] (B, 2D) mapped back to the image space (B, D)."""

    def __init__(self, image_embed_dim: int = 512):
        super().__init__()
        self.mapping = bn_relu_mlp(2 * image_embed_dim, image_embed_dim)

    def forward(self, projected: dict) -> torch.Tensor:
        return self.mapping(projected["concat"])


class ConvMapping(torch.nn.Module):
    """ComposeAE's rho_conv: Conv1d over the 5 stacked channels (z, delta, x, Re, Im), adaptive max pooling to
    ``pool`` positions, flattened (64 * 16 = 1024 in the original) and an MLP to the image space."""

    def __init__(self, image_embed_dim: int = 512, channels: int = 64, pool: int = 16):
        super().__init__()
        flat = channels * pool
        self.mapping = bn_relu_mlp(flat, image_embed_dim)
        self.conv = torch.nn.Conv1d(5, channels, kernel_size=3, padding=1)
        self.adaptivepooling = torch.nn.AdaptiveMaxPool1d(pool)

    def forward(self, projected: dict) -> torch.Tensor:
        x = self.adaptivepooling(self.conv(projected["channels"]))  # (B, channels, pool)
        return self.mapping(x.flatten(1))


def _decoders(image_embed_dim: int, text_embed_dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ComposeAE's decoders (Sec. 3.3): theta -> image features, theta -> text features."""
    return bn_relu_mlp(image_embed_dim, image_embed_dim), bn_relu_mlp(image_embed_dim, text_embed_dim)


class _AutoencoderBase(ImgEncoderTextEncoderBase):
    """Shared by ComposeAE and RealSpaceConcatAE: theta = a[1] * rho(.) + a[0] * rho_conv(.), two decoders and
    their reconstruction losses (ComposeAE Eq. 8-9, logged as L2_loss and L2_loss_text)."""

    def __init__(self, text_encoder, image_embed_dim=512, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        self.a = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))

    def _add_decoders(self):
        self.decoder, self.txtdecoder = _decoders(self.image_embed_dim, self.text_embed_dim)

    def extra_loss_terms(self, out, target_raw, loss):
        # The original ran both decoders inside every composition (evaluation and the conjugate pass included),
        # which only updated their BatchNorm running statistics more often; they are never used for retrieval,
        # so here the decoders run once per step, in the loss.
        theta = out["repres"]
        return {"L2_loss": F.mse_loss(self.decoder(theta), out["img_features"]),
                "L2_loss_text": F.mse_loss(self.txtdecoder(theta), out["text_features"])}


class ComposeAE(_AutoencoderBase):
    """ComposeAE (Anwaar et al., WACV 2021): complex-space rotation of the image by the text, mapped back to the
    image space by a linear and a convolutional mapping, with decoders and a rotational symmetry loss."""

    def __init__(self, text_encoder, image_embed_dim=512, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        t = self.text_embed_dim
        self.encoderLinear = torch.nn.Sequential(ComplexProjectionModule(image_embed_dim, t), LinearMapping(image_embed_dim))
        self.encoderWithConv = torch.nn.Sequential(ComplexProjectionModule(image_embed_dim, t), ConvMapping(image_embed_dim))
        self._add_decoders()

    def compose_img_text_features(self, img_state, text_features, conjugate: float = 1.0):
        """Eq. 5-7: theta = a[1] * rho(z e^{i delta}) + a[0] * rho_conv(z e^{i delta}).

        ``conjugate=-1`` rotates by the conjugate (the original passed a fixed (32, 1) CUDA tensor of +-1; a scalar
        works for any batch size and device)."""
        theta_linear = self.encoderLinear[1](self.encoderLinear[0](img_state, text_features, conjugate))
        theta_conv = self.encoderWithConv[1](self.encoderWithConv[0](img_state, text_features, conjugate))
        theta = theta_linear * self.a[1] + theta_conv * self.a[0]  # (B, D)
        return {"repres": theta, "img_features": img_state, "text_features": text_features}

    def extra_loss_terms(self, out, target_raw, loss):
        """Adds the rotational symmetry loss (Eq. 10-11): the target composed with the conjugate rotation of the text
        must match the source, under the same base loss."""
        terms = super().extra_loss_terms(out, target_raw, loss)
        back = self.compose_img_text_features(target_raw, out["text_features"], conjugate=-1.0)["repres"]
        terms["rot_sym_loss"] = self.base_loss(loss, self.normalization_layer(back),
                                               self.normalization_layer(out["img_features"]))
        return terms


class RealConCatModule(torch.nn.Module):
    """Concatenation [image, text] in the real space."""

    def forward(self, img: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.cat([img, text], -1)  # (B, D + T)


class RealLinearMapping(torch.nn.Module):
    """The real-space ablation's rho: MLP from [x, t] (B, D + T) to the image space."""

    def __init__(self, image_embed_dim: int = 512, text_embed_dim: int = 768):
        super().__init__()
        merged = image_embed_dim + text_embed_dim
        self.mapping = bn_relu_mlp(merged, image_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x)


class RealConvMapping(torch.nn.Module):
    """The real-space ablation's rho_conv: Conv1d(1, 64) over [x, t], adaptive max pooling to 20 positions (64 * 20
    = 1280 in the original) and an MLP."""

    def __init__(self, image_embed_dim: int = 512, text_embed_dim: int = 768, channels: int = 64, pool: int = 20):
        super().__init__()
        flat = channels * pool
        self.mapping = bn_relu_mlp(flat, image_embed_dim)
        self.conv1 = torch.nn.Conv1d(1, channels, kernel_size=3, padding=1)
        self.adaptivepooling = torch.nn.AdaptiveMaxPool1d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adaptivepooling(self.conv1(x.unsqueeze(1)))  # (B, channels, pool)
        return self.mapping(x.flatten(1))


class RealSpaceConcatAE(_AutoencoderBase):
    """ComposeAE with the composition in the real space (the paper's ablation, Table 5 'Concat in real space')."""

    def __init__(self, text_encoder, image_embed_dim=512, **kw):
        super().__init__(text_encoder, image_embed_dim, **kw)
        t = self.text_embed_dim
        self.encoderLinear = torch.nn.Sequential(RealConCatModule(), RealLinearMapping(image_embed_dim, t))
        self.encoderWithConv = torch.nn.Sequential(RealConCatModule(), RealConvMapping(image_embed_dim, t))
        self._add_decoders()

    def compose_img_text_features(self, img_state, text_features):
        theta_linear = self.encoderLinear[1](self.encoderLinear[0](img_state, text_features))
        theta_conv = self.encoderWithConv[1](self.encoderWithConv[0](img_state, text_features))
        theta = theta_linear * self.a[1] + theta_conv * self.a[0]  # (B, D)
        return {"repres": theta, "img_features": img_state, "text_features": text_features}


MODELS: dict[str, Callable[..., ImgEncoderTextEncoderBase]] = {
    "imgonly": SimpleModelImageOnly,
    "textonly": SimpleModelTextOnly,
    "concat": Concat,
    "tirg": TIRG,
    "tirg_lastconv": TIRGLastConv,
    "composeAE": ComposeAE,
    "RealSpaceConcatAE": RealSpaceConcatAE,
}


def build_model(name: str, text_encoder, *, image_embed_dim: int = 512, image_weights: str = "none",
                triplet_grad_scale: float = 0.5) -> ImgEncoderTextEncoderBase:
    """The model called ``name`` (the original's --model names) around ``text_encoder``."""
    if name not in MODELS:
        raise UserInputError(f"unknown --model {name!r}: use one of {', '.join(MODELS)}")
    model = MODELS[name](text_encoder, image_embed_dim, image_weights=image_weights)
    model.triplet_grad_scale = triplet_grad_scale
    return model


def load_model_state(model: ImgEncoderTextEncoderBase, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Loads a state dict written by this project or by the original code (strict on everything it uses).

    The original kept an unused LSTM ``text_model`` inside its BERT models; those weights are skipped (said once).
    """
    if model.text_model is None:
        skipped = [k for k in state_dict if k.startswith("text_model.")]
        if skipped:
            logger.info("%s: skipping %d unused LSTM text_model.* weights (the original kept an LSTM inside its BERT "
                        "models)", source or "checkpoint", len(skipped))
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("text_model.")}
    expected = model.state_dict()
    bad = [k for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if bad or missing or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("shape mismatch", bad), ("missing", missing),
                                               ("unexpected", unexpected)) if keys)
        raise UserInputError(f"{source or 'checkpoint'} does not fit --model {type(model).__name__} with this text "
                             f"encoder ({detail}); check --model, --use_bert and --bert_model")
    model.load_state_dict(state_dict)
