"""Benchmark models: the networks users bring, built deterministically (issue 14's table).

Every constructor takes ``seed`` and builds its weights under a private RNG state
(``torch.random.fork_rng``), so the same call gives bit-identical parameters in every
process and never disturbs the caller's random stream. Models that hold batch statistics
or dropout are returned in ``eval()`` mode (samples independent). :func:`inputs` makes the
matching deterministic inputs.

* :func:`sequential_mlp` — ``nn.Sequential`` MLP ``d → width × depth → k`` (ReLU), standard
  PyTorch initialization; :func:`as_lazyfast_mlp` copies it into the same network as a
  :class:`lazyfast.MLP` (standard parametrization, identical function and kernel).
* :class:`SharedLinear` — one ``nn.Linear`` applied twice per forward (weight sharing).
* :func:`torchvision_resnet18` — the torchvision ``resnet18`` architecture (BasicBlock
  [2, 2, 2, 2], 7×7 stem, max-pool, BatchNorm, adaptive average pool) with its
  initialization. torchvision itself does not install beside the CPU torch used here (its
  default wheel for torch 2.13 is a CUDA build), so the architecture is written out in this
  file; the parameter names and shapes follow torchvision's. BatchNorm running statistics
  are set by a few deterministic training-mode forwards, then the model is put in eval mode.
* :class:`TransformerRegressor` — a 2-layer ``nn.TransformerEncoder`` (d=128, eval, dropout 0)
  with a mean-pooled linear head, on float inputs (n, seq, d) or, with ``vocab``, on integer
  token ids (n, seq) through an ``nn.Embedding``.
* :class:`ConvNet3` — three 3×3 convolutions (64 channels, 'same' padding, ReLU) on 32×32
  images, global average pool, linear head with 1 or 10 outputs: the CNN of the
  neural-tangents comparison (benchmarks/bench_nt.py writes the same network in JAX).
* ``vgg11`` / ``resnet18`` — lazyfast's BN-free CNNs (:mod:`lazyfast.models`), seeded.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
from torch import nn

from lazyfast.models import MLP, resnet18 as _resnet18, vgg11 as _vgg11

__all__ = ["sequential_mlp", "as_lazyfast_mlp", "SharedLinear", "shared_linear", "torchvision_resnet18",
           "TransformerRegressor", "transformer", "token_transformer", "ConvNet3", "conv3", "vgg11", "resnet18",
           "inputs", "MODELS", "build", "double", "TIMM_MODELS", "HF_MODELS", "OPTIONAL", "timm_model", "hf_model",
           "HFLogits", "import_timm", "import_transformers"]


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _to(model: nn.Module, dtype) -> nn.Module:
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------- MLPs
def sequential_mlp(d: int = 100, width: int = 1024, depth: int = 3, k: int = 1, *, seed: int = 0,
                   dtype=None) -> nn.Sequential:
    """``nn.Sequential(Linear(d, width), ReLU, …, Linear(width, k))`` with ``depth`` hidden layers."""
    def make():
        layers, c = [], d
        for _ in range(depth):
            layers += [nn.Linear(c, width), nn.ReLU()]
            c = width
        layers.append(nn.Linear(c, k))
        return nn.Sequential(*layers)

    return _to(_seeded(seed, make), dtype)


def as_lazyfast_mlp(seq: nn.Sequential):
    """The same network as a :class:`lazyfast.MLP` (standard parametrization, weights copied):
    identical outputs and tangent kernel."""

    lins = [m for m in seq if isinstance(m, nn.Linear)]
    if not lins or any(not isinstance(m, (nn.Linear, nn.ReLU)) for m in seq):
        raise ValueError("as_lazyfast_mlp needs an nn.Sequential of nn.Linear and nn.ReLU layers")
    w = lins[0].weight
    with torch.random.fork_rng(devices=[]):  # its own init is overwritten: leave the caller's RNG alone
        mlp = MLP(lins[0].in_features, [m.out_features for m in lins[:-1]], lins[-1].out_features,
                  bias=lins[0].bias is not None, parametrization="standard", dtype=w.dtype, device=w.device)
    with torch.no_grad():
        for dst, src in zip(mlp.layers, lins):
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)
    return mlp


class SharedLinear(nn.Module):
    """``head(relu(lin(relu(lin(x)))))``: the same ``nn.Linear(d, d)`` applied twice."""

    def __init__(self, d: int = 512, k: int = 1):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        h = torch.relu(self.lin(h))
        return self.head(h)


def shared_linear(d: int = 512, k: int = 1, *, seed: int = 0, dtype=None) -> SharedLinear:
    return _to(_seeded(seed, lambda: SharedLinear(d, k)), dtype)


# ----------------------------------------------------------------------------- torchvision ResNet-18
class _TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TVResNet18(nn.Module):
    """torchvision's ``ResNet(BasicBlock, [2, 2, 2, 2])`` (same modules, names and init)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [_TVBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [_TVBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_resnet18(num_classes: int = 10, *, seed: int = 0, dtype=None, calibrate: bool = True) -> TVResNet18:
    """torchvision-architecture ResNet-18 with BatchNorm, in eval mode.

    ``calibrate``: set the BatchNorm running statistics by 4 training-mode forwards on
    seeded random 32×32 inputs (as after some training), so eval-mode BatchNorm is a
    non-trivial affine map; the parameters are unchanged."""
    def make():
        m = TVResNet18(num_classes)
        if calibrate:
            g = torch.Generator().manual_seed(seed + 1)
            m.train()
            with torch.no_grad():
                for _ in range(4):
                    m(torch.randn(16, 3, 32, 32, generator=g))
        return m.eval()

    return _to(_seeded(seed, make), dtype)


# ----------------------------------------------------------------------------- Transformers
class TransformerRegressor(nn.Module):
    """``nn.TransformerEncoder`` (``layers`` × ``nn.TransformerEncoderLayer(d, nhead,
    dim_feedforward, dropout=0, batch_first=True)``), mean over the sequence, ``Linear(d, k)``.
    With ``vocab`` the input is integer token ids (n, seq) fed through ``nn.Embedding(vocab, d)``;
    otherwise float (n, seq, d)."""

    def __init__(self, d: int = 128, nhead: int = 4, layers: int = 2, dim_feedforward: int = 512, k: int = 1,
                 vocab: Optional[int] = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d) if vocab else None
        layer = nn.TransformerEncoderLayer(d, nhead, dim_feedforward=dim_feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        return self.head(self.encoder(h).mean(1))


def transformer(d: int = 128, nhead: int = 4, layers: int = 2, dim_feedforward: int = 512, k: int = 1, *,
                seed: int = 0, dtype=None) -> TransformerRegressor:
    """2-layer TransformerEncoder d=128 + head on float inputs (n, seq, d); eval, dropout 0."""
    return _to(_seeded(seed, lambda: TransformerRegressor(d, nhead, layers, dim_feedforward, k)), dtype).eval()


def token_transformer(vocab: int = 1000, d: int = 128, nhead: int = 4, layers: int = 2, dim_feedforward: int = 512,
                      k: int = 1, *, seed: int = 0, dtype=None) -> TransformerRegressor:
    """Embedding(token ids) + the same 2-layer TransformerEncoder + head; eval, dropout 0."""
    return _to(_seeded(seed, lambda: TransformerRegressor(d, nhead, layers, dim_feedforward, k, vocab)),
               dtype).eval()


# ----------------------------------------------------------------------------- CNNs
class ConvNet3(nn.Module):
    """conv3×3(c_in→c) ReLU, conv3×3(c→c) ReLU, conv3×3(c→c) ReLU (stride 1, padding 1, with
    bias), global average pool, ``Linear(c, k)``."""

    def __init__(self, channels: int = 64, k: int = 1, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, k)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.head(h.mean((2, 3)))


def conv3(channels: int = 64, k: int = 1, *, seed: int = 0, dtype=None) -> ConvNet3:
    return _to(_seeded(seed, lambda: ConvNet3(channels, k)), dtype)


def vgg11(num_classes: int = 10, *, seed: int = 0, dtype=None):
    """:func:`lazyfast.vgg11` (BN-free), seeded."""

    return _to(_seeded(seed, lambda: _vgg11(num_classes)), dtype)


def resnet18(num_classes: int = 10, *, seed: int = 0, dtype=None):
    """:func:`lazyfast.resnet18` (BN-free), seeded."""

    return _to(_seeded(seed, lambda: _resnet18(num_classes)), dtype)


# ----------------------------------------------------------------------------- timm and Hugging Face
# Optional dependencies (benchmarks and their tests only): `pip install timm transformers torchvision==0.28.0`
# beside torch 2.13.0. Random init only (no weights are downloaded); every model in eval mode, small enough
# for the torch.func baseline at n = 16-64 on a CPU.
TIMM_MODELS = {
    "timm_resnet10t": ("resnet10t", dict(), 64),
    "timm_efficientnet_b0": ("efficientnet_b0", dict(), 64),
    "timm_mobilenetv3": ("mobilenetv3_small_050", dict(), 64),
    "timm_convnext_atto": ("convnext_atto", dict(), 64),
    "timm_vit_tiny": ("vit_tiny_patch16_224", dict(img_size=64), 64),
}
HF_MODELS = ("hf_bert", "hf_distilbert", "hf_gpt2", "hf_vit")


def _torchvision_schemas() -> None:
    """torchvision 0.28 from PyPI registers fake kernels for ``torchvision::nms`` / ``qnms`` at import;
    beside the CPU torch its compiled ops are not loaded, so the schemas are defined first (timm imports
    torchvision; no torchvision op is used by these models)."""
    for name in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined (torchvision's own extension, or an earlier call)
            pass


def import_timm():
    """``timm``, importable beside the CPU torch (see :func:`_torchvision_schemas`); ImportError when absent."""
    _torchvision_schemas()
    import timm  # optional dependency

    return timm


def import_transformers():
    """``transformers`` (ImportError when absent)."""
    _torchvision_schemas()
    import transformers  # optional dependency

    return transformers


class HFLogits(nn.Module):
    """A Hugging Face classifier seen as ``x → logits`` (its ModelOutput's ``logits``): the model is a
    submodule, so parameter names are the model's with a ``model.`` prefix."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def timm_model(name: str, num_classes: int = 10, *, seed: int = 0, dtype=None) -> nn.Module:
    """A timm model of :data:`TIMM_MODELS` (random init, eval mode)."""
    timm = import_timm()
    arch, kw, _ = TIMM_MODELS[name]
    return _to(_seeded(seed, lambda: timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw).eval()),
               dtype)


def hf_model(name: str, num_classes: int = 10, *, seed: int = 0, dtype=None) -> nn.Module:
    """A small random-init Hugging Face classifier (eval mode, SDPA attention, dropout off in eval),
    returning logits: ``hf_bert`` / ``hf_distilbert`` / ``hf_gpt2`` (token ids (n, 32), vocab 1000; GPT-2
    with tied embeddings) or ``hf_vit`` (images (n, 3, 32, 32), patch 8)."""
    tr = import_transformers()
    common = dict(num_labels=num_classes, attn_implementation="sdpa")  # every config

    def make():
        if name == "hf_bert":
            cfg = tr.BertConfig(**common, vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=512, max_position_embeddings=64)
            m = tr.BertForSequenceClassification(cfg)
        elif name == "hf_distilbert":
            cfg = tr.DistilBertConfig(**common, vocab_size=1000, dim=128, n_layers=2, n_heads=4, hidden_dim=512,
                                      max_position_embeddings=64)
            m = tr.DistilBertForSequenceClassification(cfg)
        elif name == "hf_gpt2":
            cfg = tr.GPT2Config(**common, vocab_size=1000, n_embd=128, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=1, eos_token_id=1,
                                tie_word_embeddings=True, pad_token_id=0)
            m = tr.GPT2ForSequenceClassification(cfg)
        elif name == "hf_vit":
            cfg = tr.ViTConfig(**common, image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=512)
            m = tr.ViTForImageClassification(cfg)
        else:
            raise ValueError(f"unknown Hugging Face model {name!r}; choose from {HF_MODELS}")
        return HFLogits(m).eval()

    if name not in HF_MODELS:
        raise ValueError(f"unknown Hugging Face model {name!r}; choose from {HF_MODELS}")
    return _to(_seeded(seed, make), dtype)


# ----------------------------------------------------------------------------- registry
# name → (constructor(**kw), input kind); input kinds: ("vec", d), ("img", C, H, W), ("seq", L, d), ("tok", L, vocab)
MODELS: Dict[str, tuple] = {
    "mlp1024": (lambda **kw: sequential_mlp(100, 1024, 3, 1, **kw), ("vec", 100)),
    "mlp1024_k10": (lambda **kw: sequential_mlp(100, 1024, 3, 10, **kw), ("vec", 100)),
    "lazyfast_mlp1024": (lambda **kw: as_lazyfast_mlp(sequential_mlp(100, 1024, 3, 1, **kw)), ("vec", 100)),
    "mlp2048": (lambda **kw: sequential_mlp(100, 2048, 3, 1, **kw), ("vec", 100)),
    "shared_linear": (lambda **kw: shared_linear(512, 1, **kw), ("vec", 512)),
    "vgg11": (lambda **kw: vgg11(10, **kw), ("img", 3, 32, 32)),
    "resnet18": (lambda **kw: resnet18(10, **kw), ("img", 3, 32, 32)),
    "tv_resnet18": (lambda **kw: torchvision_resnet18(10, **kw), ("img", 3, 32, 32)),
    "transformer": (lambda **kw: transformer(**kw), ("seq", 16, 128)),
    "token_transformer": (lambda **kw: token_transformer(**kw), ("tok", 16, 1000)),
    "conv3_k1": (lambda **kw: conv3(64, 1, **kw), ("img", 3, 32, 32)),
    "conv3_k10": (lambda **kw: conv3(64, 10, **kw), ("img", 3, 32, 32)),
    # tiny versions for `lazyfast bench --quick` and the tests
    "tiny_mlp": (lambda **kw: sequential_mlp(20, 64, 3, 1, **kw), ("vec", 20)),
    "tiny_mlp_k3": (lambda **kw: sequential_mlp(20, 64, 2, 3, **kw), ("vec", 20)),
    "tiny_shared": (lambda **kw: shared_linear(32, 1, **kw), ("vec", 32)),
    "tiny_cnn": (lambda **kw: conv3(8, 3, **kw), ("img", 3, 8, 8)),
    "tiny_transformer": (lambda **kw: transformer(16, 2, 1, 32, 1, **kw), ("seq", 6, 16)),
    "tiny_tokens": (lambda **kw: token_transformer(50, 16, 2, 1, 32, 1, **kw), ("tok", 6, 50)),
}
for _name, (_arch, _kw, _size) in TIMM_MODELS.items():
    MODELS[_name] = ((lambda _n: lambda **kw: timm_model(_n, **kw))(_name), ("img", 3, _size, _size))
for _name in HF_MODELS:
    MODELS[_name] = ((lambda _n: lambda **kw: hf_model(_n, **kw))(_name),
                     ("img", 3, 32, 32) if _name == "hf_vit" else ("tok", 32, 1000))
OPTIONAL = tuple(TIMM_MODELS) + HF_MODELS  # need timm / transformers


def build(name: str, *, seed: int = 0, dtype=None) -> nn.Module:
    """A model of :data:`MODELS` by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name][0](seed=seed, dtype=dtype)


def inputs(name: str, n: int, *, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Deterministic inputs for model ``name``: N(0, 1) features/images/sequences, or uniform
    token ids (int64) for token models."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    kind = MODELS[name][1]
    g = torch.Generator().manual_seed(seed)
    if kind[0] == "tok":
        return torch.randint(0, kind[2], (n, kind[1]), generator=g)
    return torch.randn((n,) + tuple(kind[1:]), generator=g).to(dtype)


def double(model: nn.Module) -> nn.Module:
    """A float64 copy (for the reference kernel); the model itself is unchanged."""
    return copy.deepcopy(model).double()
