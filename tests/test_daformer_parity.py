"""Our DAFormer decoder and full DAFormer against DAFormer's own code (lhoyer/DAFormer), on
the same random weights, in eval mode.

The files are imported from the checkout named by $DAFORMER_SOURCE: the head
(`mmseg/models/decode_heads/daformer_head.py`, with the files it builds on:
`aspp_head.py`, `sep_aspp_head.py`, `decode_head.py`, `segformer_head.py`, `mmseg/ops`)
and the encoder (`mmseg/models/backbones/mix_transformer.py`). The head is built from the
decode_head dicts of `configs/_base_/models/daformer_conv1_mitb5.py` with the fusion of
`daformer_sepaspp_mitb5.py` (merged as mmcv merges `_delete_=True`), read from the
checkout. mmcv-full 1.x does not build here, and mmseg's package `__init__`s import all
of it, so these are stubbed:

- `mmcv.cnn.ConvModule`, `DepthwiseSeparableConvModule`: torch equivalents written here
  with mmcv 1.x's structure and names (conv -> BN -> ReLU as `conv`, `bn`, `activate`;
  bias only without a norm; a depthwise ConvModule then a 1x1 ConvModule as
  `depthwise_conv`, `pointwise_conv`);
- `mmcv.runner`: `BaseModule` (a torch Module keeping `init_cfg`), `auto_fp16` and
  `force_fp32` (decorators that change nothing), the checkpoint loaders (never called);
- registries and what only training uses: `HEADS`/`BACKBONES` (the decorator returns the
  class), `build_loss`, `build_pixel_sampler`, `losses.accuracy`, the logger;
- `isa_head.ISALayer` (only the unused 'isa' fusion type needs it);
- the `__init__`s of `mmseg`, `mmseg.models`, `mmseg.models.decode_heads`,
  `mmseg.models.backbones` (packages whose modules load from the checkout's files).

(a) The head alone on random levels of a non-square image (ceil sizes, so the upsampling
is by non-integer factors), float64 on both sides, tolerance 1e-10. (b) DAFormer's mit_b0
+ the head: the state dict that mmseg's EncoderDecoder has (`backbone.*`,
`decode_head.*`), saved as a released UDA checkpoint (`state_dict` with `model.*`,
`ema_model.*`, `imnet_model.*`) and converted with `wsda_jax.models.convert`; the logits
(the head's, bilinearly upsampled to the image as mmseg's `encode_decode`) compared in
float64 (1e-10) and in float32 (our error at most twice the reference's own).

Run: DAFORMER_SOURCE=/path/to/DAFormer /work/venv-torch/bin/python -m pytest -n 0 -s \
         tests/test_daformer_parity.py -q
"""

import copy
import importlib
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the parity test needs it)")
SOURCE = os.environ.get("DAFORMER_SOURCE", "")
if not SOURCE:
    pytest.skip("DAFORMER_SOURCE (a DAFormer checkout) is not set", allow_module_level=True)

from configs import synthetic_coarse  # noqa: E402
from wsda_jax.models import convert, daformer_head  # noqa: E402

HEIGHT, WIDTH = 97, 130
NUM_CLASSES = 19
FLOAT64_TOLERANCE = 1e-10
RELU = {"type": "ReLU"}  # mmcv's default act_cfg.


class ConvModule(torch.nn.Module):
    """mmcv 1.x ConvModule for what DAFormer uses: conv, optional BN, optional ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias="auto", conv_cfg=None, norm_cfg=None,
                 act_cfg=RELU, **unused):  # fmt: skip
        super().__init__()
        assert conv_cfg is None and not unused, (conv_cfg, unused)
        with_norm = norm_cfg is not None
        self.conv = torch.nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias=not with_norm if bias == "auto" else bias,
        )  # fmt: skip
        if with_norm:
            assert norm_cfg["type"] == "BN", norm_cfg
            self.bn = torch.nn.BatchNorm2d(out_channels)
        self.with_norm = with_norm
        assert act_cfg is None or act_cfg["type"] == "ReLU", act_cfg
        self.activate = torch.nn.ReLU() if act_cfg is not None else None

    def forward(self, x):
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return x if self.activate is None else self.activate(x)


class DepthwiseSeparableConvModule(torch.nn.Module):
    """mmcv 1.x DepthwiseSeparableConvModule: depthwise ConvModule, then a 1x1 one."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, norm_cfg=None, act_cfg=RELU, **unused):  # fmt: skip
        super().__init__()
        assert not unused, unused
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, stride, padding, dilation,
            groups=in_channels, norm_cfg=norm_cfg, act_cfg=act_cfg,
        )  # fmt: skip
        self.pointwise_conv = ConvModule(
            in_channels, out_channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg
        )

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class BaseModule(torch.nn.Module):
    """mmcv.runner.BaseModule's constructor interface (init_cfg kept, nothing else)."""

    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg


def _stub_modules(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the parity test loads weights itself")

    def module(name, path=None, **attributes):
        stub = types.ModuleType(name)
        if path is not None:  # A package whose modules are the checkout's files.
            stub.__path__ = [os.path.join(SOURCE, path)]
        for key, value in attributes.items():
            setattr(stub, key, value)
        monkeypatch.setitem(sys.modules, name, stub)

    keep = lambda *args, **kwargs: lambda function: function  # noqa: E731
    registry = types.SimpleNamespace(register_module=lambda *a, **k: lambda cls: cls)
    module("mmcv")
    module("mmcv.cnn", ConvModule=ConvModule,
           DepthwiseSeparableConvModule=DepthwiseSeparableConvModule)  # fmt: skip
    module("mmcv.runner", BaseModule=BaseModule, auto_fp16=keep, force_fp32=keep,
           load_checkpoint=never, _load_checkpoint=never)  # fmt: skip
    module("mmseg", "mmseg")
    module("mmseg.utils", get_root_logger=lambda *a, **k: None)
    module("mmseg.core", build_pixel_sampler=never)
    module("mmseg.models", "mmseg/models")
    module("mmseg.models.builder", HEADS=registry, BACKBONES=registry,
           build_loss=lambda cfg: None)  # fmt: skip
    module("mmseg.models.losses", accuracy=never)
    module("mmseg.models.backbones", "mmseg/models/backbones")
    module("mmseg.models.decode_heads", "mmseg/models/decode_heads")
    module("mmseg.models.decode_heads.isa_head", ISALayer=never)
    monkeypatch.delitem(sys.modules, "mmseg.ops", raising=False)


def _config_file(name: str) -> dict:
    namespace = {}
    path = os.path.join(SOURCE, "configs", "_base_", "models", name)
    exec(compile(open(path).read(), path, "exec"), namespace)  # noqa: S102 - a config file.
    return namespace["model"]


def decode_head_config() -> dict:
    """The decode_head of daformer_sepaspp_mitb5: daformer_conv1_mitb5's, with the fusion
    replaced (`_delete_=True`) by daformer_sepaspp_mitb5's."""
    head = copy.deepcopy(_config_file("daformer_conv1_mitb5.py")["decode_head"])
    fusion = _config_file("daformer_sepaspp_mitb5.py")["decode_head"]["decoder_params"]
    fusion = {k: v for k, v in fusion["fusion_cfg"].items() if k != "_delete_"}
    head["decoder_params"]["fusion_cfg"] = fusion
    assert head.pop("type") == "DAFormerHead"
    return head


@pytest.fixture(scope="module")
def reference():
    """(DAFormer's daformer_head module, its mix_transformer module)."""
    monkeypatch = pytest.MonkeyPatch()
    _stub_modules(monkeypatch)
    head = importlib.import_module("mmseg.models.decode_heads.daformer_head")
    backbone = importlib.import_module("mmseg.models.backbones.mix_transformer")
    yield types.SimpleNamespace(head=head, backbone=backbone)
    monkeypatch.undo()


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Random weights of a trained net's scale: BN affine parameters and running
    statistics distinct per channel, biases N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            shape = tensor.shape
            uniform = torch.rand(shape, generator=generator)
            normal = torch.randn(shape, generator=generator)
            if name.endswith("running_var") or (name.endswith("weight") and len(shape) == 1):
                tensor.copy_(0.5 + uniform)
            elif name.endswith(("bias", "running_mean")):
                tensor.copy_(0.1 * normal)
            else:  # Conv / Linear weight: unit-variance outputs.
                tensor.copy_(normal / np.sqrt(np.prod(shape[1:])))


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: "torch.Tensor") -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_head_matches_daformer_head(reference):
    """(a) The decoder on random levels, float64, eval mode."""
    config = decode_head_config()
    theirs = reference.head.DAFormerHead(**config).eval()
    _randomise(theirs, seed=1)  # float32 values: the converter's dtype.
    theirs.double()
    channels = config["in_channels"]  # MiT-B5's (64, 128, 320, 512).
    rng = np.random.default_rng(2)
    levels = [
        rng.standard_normal((2, -(-HEIGHT // s), -(-WIDTH // s), c))
        for s, c in zip((4, 8, 16, 32), channels, strict=True)
    ]
    with torch.no_grad():
        want = _nhwc(theirs([_nchw(x) for x in levels]))

    ours = daformer_head.DAFormerHead(NUM_CLASSES, decoder_dim=config["channels"])
    with jax.enable_x64(True):
        inputs = [jnp.asarray(x) for x in levels]
        shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), inputs, train=False))
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
        full = {"params": {"backbone": {}, "head": zeros["params"]},
                "batch_stats": {"head": zeros["batch_stats"]}}  # fmt: skip
        state_dict = {f"decode_head.{k}": v.numpy() for k, v in theirs.state_dict().items()}
        variables = _float64(_head_only(daformer_head.convert_state_dict(state_dict, full)))
        got, _ = ours.clone(dtype=jnp.float64).apply(variables, inputs, train=False)
    assert got.shape == want.shape == (2, 25, 33, NUM_CLASSES)
    diff = np.abs(np.asarray(got) - want).max()
    print(
        f"DAFormer head, float64: max abs diff {diff:.2e} (logits up to {np.abs(want).max():.1f})"
    )
    assert diff < FLOAT64_TOLERANCE


def _head_only(variables):
    return {"params": variables["params"]["head"], "batch_stats": variables["batch_stats"]["head"]}


class EncoderDecoder(torch.nn.Module):
    """mmseg's EncoderDecoder as DAFormer evaluates it (`encode_decode`): the backbone,
    the head, the logits bilinearly resized to the image (align_corners=False, with the
    checkout's own `mmseg.ops.resize`); its state dict has the same `backbone.*`,
    `decode_head.*` keys."""

    def __init__(self, backbone, decode_head, resize):
        super().__init__()
        self.backbone, self.decode_head, self.resize = backbone, decode_head, resize

    def forward(self, images):
        out = self.decode_head(self.backbone(images))
        return self.resize(out, size=images.shape[2:], mode="bilinear", align_corners=False)


def _reference_daformer(reference, seed: int) -> EncoderDecoder:
    head_config = decode_head_config()
    head_config["in_channels"] = [32, 64, 160, 256]  # mit_b0's widths.
    net = EncoderDecoder(
        reference.backbone.mit_b0(),
        reference.head.DAFormerHead(**head_config),
        importlib.import_module("mmseg.ops").resize,
    ).eval()
    _randomise(net, seed)
    return net


def test_converted_daformer_checkpoint_matches_daformer(reference, tmp_path):
    """(b) A released-checkpoint layout of DAFormer (mit_b0), converted: equal logits."""
    student, teacher = _reference_daformer(reference, 3), _reference_daformer(reference, 4)
    numpy_dict = lambda net: {k: v.numpy() for k, v in net.state_dict().items()}  # noqa: E731
    state_dict = {f"model.{k}": v for k, v in student.state_dict().items()}
    state_dict.update({f"ema_model.{k}": v for k, v in teacher.state_dict().items()})
    state_dict.update({f"imnet_model.{k}": v for k, v in student.backbone.state_dict().items()})
    path = str(tmp_path / "daformer.pth")
    torch.save({"meta": {"iter": 40000, "CLASSES": ("road",)}, "state_dict": state_dict}, path)

    config = synthetic_coarse.get_config("tiny")
    config.num_classes = NUM_CLASSES
    config.model.arch, config.model.mit, config.model.proj_dim = "daformer", "b0", 16
    config.model.mit_embed_dims, config.model.mit_depths, config.model.decoder_dim = (), (), 256
    state, notes = convert.converted_state_and_notes(config, path)
    assert notes == [convert.NO_PROJECTION]
    # The teacher is ema_model.*, converted as the student is.
    variables = jax.device_get(state.student_variables())
    want_teacher = daformer_head.convert_state_dict(numpy_dict(teacher), variables)
    want_teacher["params"]["head"]["projection"] = variables["params"]["head"]["projection"]
    jax.tree.map(np.testing.assert_array_equal, state.teacher_variables(), want_teacher)

    images = np.random.default_rng(5).standard_normal((2, HEIGHT, WIDTH, 3))
    with torch.no_grad():
        theirs32 = _nhwc(student(_nchw(images.astype(np.float32))))
        theirs64 = _nhwc(student.double()(_nchw(images)))
    model = daformer_head.DAFormer(NUM_CLASSES, variant="b0", proj_dim=16)
    ours32 = np.asarray(model.apply(variables, images.astype(np.float32), train=False).logits)
    with jax.enable_x64(True):
        ours64 = model.clone(dtype=jnp.float64).apply(
            _float64(variables), jnp.asarray(images), train=False
        )
        ours64 = np.asarray(ours64.logits)
    assert ours64.shape == theirs64.shape == (2, HEIGHT, WIDTH, NUM_CLASSES)
    diff64 = np.abs(ours64 - theirs64).max()
    ours_error, their_error = np.abs(ours32 - theirs64).max(), np.abs(theirs32 - theirs64).max()
    print(
        f"DAFormer mit_b0 + head, converted: float64 max abs diff {diff64:.2e} (logits up to "
        f"{np.abs(theirs64).max():.1f}); float32 vs reference float64: ours {ours_error:.2e}, "
        f"reference {their_error:.2e}"
    )
    assert diff64 < FLOAT64_TOLERANCE
    assert ours_error <= 2 * their_error
