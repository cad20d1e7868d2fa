"""Our DeepLabV2 against the reference's own DeepV2R101 (anurag-198/WDASS) on the same weights.

The reference network is built at test time from the reference checkout named by
$WDASS_SOURCE (its `network/deepv2.py`, `network/Resnet.py`, `config.py`,
`utils/init_func.py`), given random weights and BatchNorm statistics, saved as the
reference saves a checkpoint and converted with `wsda_jax.models.convert`. Stubbed, as
the minimum for the import: the `runx` logger module (not installed), `cfg.MODEL.BNFUNC`
= `torch.nn.BatchNorm2d` (what the reference's `assert_and_infer_cfg` sets without
SyncBN), and `model_zoo.load_url` (the ImageNet download; it returns a fresh ResNet-101
state dict instead).

The comparisons run in float64 on both sides (torch `.double()`, JAX `enable_x64`):
there the networks agree to ~1e-10, far below the 1e-4 bound, so any conversion or
structure error shows. In float32 a random ResNet-101 amplifies rounding: the
reference's own float32 logits differ from its float64 ones by ~1e-3 (logits ~10), so
float32 is checked as "our float32 error is no larger than twice the reference's own".

Run: WDASS_SOURCE=/path/to/WDASS /work/venv-torch/bin/python -m pytest \
         tests/test_reference_parity.py -q
"""

import copy
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the parity test needs it)")
SOURCE = os.environ.get("WDASS_SOURCE", "")
if not SOURCE:
    pytest.skip("WDASS_SOURCE (a reference checkout) is not set", allow_module_level=True)

from reference_layout import torch_layout  # noqa: E402

from configs import gta2cs_coarse  # noqa: E402
from wsda_jax import optim  # noqa: E402
from wsda_jax.models import convert, deeplab  # noqa: E402

SIZE = 65  # Odd: catches off-by-one padding, pooling and resizing.
TOLERANCE = 1e-4  # Max abs diff of eval/train-mode outputs (float64).
# One SGD step (float64): max |our update - reference update| over a leaf, relative to
# the leaf's largest reference update.
UPDATE_TOLERANCE = 1e-6
NUM_CLASSES = 19


def _stub_reference_imports(monkeypatch) -> None:
    """The minimum that lets `network.deepv2` import and build without network access."""
    logx_module = types.ModuleType("runx.logx")
    logx_module.logx = types.SimpleNamespace(msg=lambda *args, **kwargs: None)
    runx = types.ModuleType("runx")
    runx.logx = logx_module
    monkeypatch.setitem(sys.modules, "runx", runx)
    monkeypatch.setitem(sys.modules, "runx.logx", logx_module)
    monkeypatch.syspath_prepend(SOURCE)


@pytest.fixture(scope="module")
def reference():
    """(the reference module deepv2, Resnet, init_func), imported from $WDASS_SOURCE."""
    monkeypatch = pytest.MonkeyPatch()
    _stub_reference_imports(monkeypatch)
    import config as reference_config  # The reference's config.py.

    monkeypatch.setattr(reference_config.cfg.MODEL, "BNFUNC", torch.nn.BatchNorm2d)
    import network.Resnet as reference_resnet
    from network import deepv2
    from utils import init_func

    def fresh_resnet101(url, *args, **kwargs):
        return reference_resnet.ResNet(reference_resnet.Bottleneck, [3, 4, 23, 3]).state_dict()

    monkeypatch.setattr(reference_resnet.model_zoo, "load_url", fresh_resnet101)
    yield types.SimpleNamespace(deepv2=deepv2, init_func=init_func)
    monkeypatch.undo()


def _images(batch: int, seed: int) -> np.ndarray:
    """float32 [B, H, W, 3], roughly ImageNet-normalised."""
    return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: "torch.Tensor") -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _randomise(net, seed: int) -> None:
    """Random biases, BN affine parameters and running statistics, distinct per channel.

    The running statistics are those of a batch of random images (so that activations
    stay O(1) through 101 layers, as in a trained net), then perturbed per channel.
    """
    torch.manual_seed(seed)
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for module in batch_norms:
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.1)
            module.momentum = 1.0  # Running stats := the calibration batch's stats.
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
        # Classifier weights N(0, 0.01) (DeepLab-v2's init), as a trained model's scale.
        for branch in net.aspp.features:
            branch.weight.normal_(0.0, 0.01)
        net.train()
        net({"images": _nchw(_images(4, seed + 100)), "gts": None, "coarse": None})
        for module in batch_norms:
            module.momentum = 0.1
            channels = module.num_features
            std = module.running_var.sqrt()
            module.running_mean.add_(0.05 * std * torch.randn(channels))
            module.running_var.mul_(torch.empty(channels).uniform_(0.9, 1.1))
    net.eval()


def _config():
    config = gta2cs_coarse.get_config()
    config.compute_dtype = "float32"
    config.optim.warmup_steps = 0  # lr(step 0) = config.optim.lr, as torch's first step.
    return config


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """(reference net in eval mode, our model, our student variables, teacher variables,
    the raw EMA state dict), through a checkpoint file laid out as the reference's."""
    torch.manual_seed(0)  # The reference's own initialisation, reproducibly.
    net = reference.deepv2.DeepV2R101(NUM_CLASSES, True, lambda *args: torch.zeros(()))
    _randomise(net, seed=0)
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = str(tmp_path_factory.mktemp("reference") / "wdass.pth")
    torch.save(
        {
            "iter": 7,
            "arch": "deepv2.DeepV2R101",
            "num_classes": NUM_CLASSES,
            # DistributedDataParallel's names, as the reference's saves have them.
            "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
            "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},
            "optimizer": {},
            "mean_iu": np.float64(0.5),
            "prototype": torch.zeros(NUM_CLASSES, 256),
            "command": "--weak_label coarse",
        },
        path,
    )
    config = _config()
    state = convert.converted_state(config, path)
    model = deeplab.build_model(config)
    return net, model, state.student_variables(), state.teacher_variables(), ema


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def _capture(net, names):
    """Forward hooks storing the outputs of the named submodules."""
    outputs, handles = {}, []
    modules = dict(net.named_modules())
    for name in names:
        hook = lambda module, args, output, name=name: outputs.__setitem__(name, output)
        handles.append(modules[name].register_forward_hook(hook))
    return outputs, handles


BRANCHES = [f"aspp.features.{i}" for i in range(4)]


def _as(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _reference_eval(net, images: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's eval-mode outputs (NHWC NumPy) for images in the net's dtype."""
    outputs, handles = _capture(net, BRANCHES + ["aspp", "representation"])
    dtype = next(net.parameters()).dtype
    with torch.no_grad():
        logits = net({"images": _nchw(images).to(dtype)})["pred"]
    for handle in handles:
        handle.remove()
    found = {name: _nhwc(outputs[name]) for name in BRANCHES}
    found["logits"] = _nhwc(logits)
    found["lowres_logits"] = _nhwc(outputs["aspp"])
    # The same call as the reference's forward makes on `representation`'s output.
    found["features"] = _nhwc(torch.nn.functional.normalize(outputs["representation"], dim=1))
    return found


def _our_eval(model, variables, images: np.ndarray) -> dict[str, np.ndarray]:
    def is_branch(module, method):
        return module.name is not None and module.name.startswith("classifier_")

    out, captured = model.apply(
        variables, jnp.asarray(images, model.dtype), train=False, capture_intermediates=is_branch
    )
    head = captured["intermediates"]["head"]
    found = {name: head[f"classifier_{i}"]["__call__"][0] for i, name in enumerate(BRANCHES)}
    found.update(logits=out.logits, lowres_logits=out.lowres_logits, features=out.features)
    return {name: np.asarray(value) for name, value in found.items()}


def test_eval_mode_outputs_match(converted):
    """Final logits, low-resolution logits, the four classifier branches and the
    projection features: float64 within TOLERANCE; float32 no worse than the
    reference's own float32 error."""
    net, model, variables, _, _ = converted
    images = _images(1, seed=1)
    reference64 = _reference_eval(copy.deepcopy(net).double(), images)
    with jax.enable_x64(True):
        ours64 = _our_eval(model.clone(dtype=jnp.float64), _as(variables, jnp.float64), images)
    diffs = {name: _max_diff(ours64[name], reference64[name]) for name in reference64}
    print("float64 eval-mode max abs diffs:", diffs)
    print("max |logit|:", float(np.abs(reference64["logits"]).max()))
    assert float(np.abs(reference64["logits"]).max()) > 1.0  # Not a comparison of zeros.
    assert all(d <= TOLERANCE for d in diffs.values()), diffs

    reference32 = _reference_eval(net, images)
    ours32 = _our_eval(model, variables, images)
    for name in ("logits", "features"):
        ours_error = _max_diff(ours32[name], reference64[name])
        reference_error = _max_diff(reference32[name], reference64[name])
        print(
            f"float32 {name}: ours vs reference {_max_diff(ours32[name], reference32[name]):.2e}"
            f"; vs exact (float64): ours {ours_error:.2e}, reference {reference_error:.2e}"
        )
        assert ours_error <= 2 * reference_error + 1e-6, (name, ours_error, reference_error)


def test_teacher_is_the_ema_state_dict(converted):
    _, _, _, teacher, ema = converted
    kernel = teacher["params"]["head"]["classifier_2"]["kernel"]
    expected = ema["aspp.features.2.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(kernel, expected)
    var = teacher["batch_stats"]["backbone"]["layer3_5"]["bn2"]["var"]
    np.testing.assert_array_equal(var, ema["backbone.layer3.5.bn2.running_var"].numpy())


def _bn_inputs(net) -> tuple[dict[str, int], list]:
    """Per BatchNorm module: the number of values per channel of its last input."""
    counts, handles = {}, []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):

            def hook(module, args, name=name):
                n, _, h, w = args[0].shape
                counts[name] = n * h * w

            handles.append(module.register_forward_pre_hook(hook))
    return counts, handles


def _ours_to_reference(tree, collection):
    """{reference key: our leaf} of a params or batch_stats tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        convert.reference_key(collection, tuple(p.key for p in path)): np.asarray(leaf)
        for path, leaf in flat
    }


def _reference_loss(out, aspp, features, weights):
    return (out * weights[0]).mean() + (aspp * weights[1]).mean() + (features * weights[2]).mean()


def _loss_weights(seed):
    rng = np.random.default_rng(seed)
    shapes = [(2, SIZE, SIZE, NUM_CLASSES), (2, 9, 9, NUM_CLASSES), (2, 9, 9, 256)]
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def test_train_mode_and_one_sgd_step_match(reference, converted):
    """float64: batch statistics on 2 images, the running statistics they leave, and one
    step of the reference's SGD (group_weight_2 groups: 10x head lr, no weight decay on
    biases and BN parameters)."""
    net, model, variables, _, _ = converted
    net = copy.deepcopy(net).double().train()
    config = _config()
    images = _images(2, seed=2)
    weights = _loss_weights(seed=3)
    old_var = {k: v.clone() for k, v in net.state_dict().items() if k.endswith("running_var")}
    groups = reference.init_func.group_weight_2([], net, config.optim.lr)
    sgd = torch.optim.SGD(
        groups,
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        momentum=config.optim.momentum,
        nesterov=False,
    )
    counts, handles = _bn_inputs(net)
    inputs = {"images": _nchw(images).double(), "gts": None, "coarse": None}
    features, out, aspp, _ = net(inputs)
    for handle in handles:
        handle.remove()
    sgd.zero_grad()
    _reference_loss(out, aspp, features, [_nchw(w).double() for w in weights]).backward()
    sgd.step()

    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64)
        params, batch_stats = (
            _as(variables["params"], jnp.float64),
            _as(variables["batch_stats"], jnp.float64),
        )

        def loss_fn(params):
            result, new_stats = deeplab.train_forward(
                model64, params, batch_stats, jnp.asarray(images, jnp.float64)
            )
            loss = (
                jnp.mean(result.logits * weights[0])
                + jnp.mean(result.lowres_logits * weights[1])
                + jnp.mean(result.features * weights[2])
            )
            return loss, (result, new_stats)

        grads, (result, new_stats) = jax.grad(loss_fn, has_aux=True)(params)
        optimizer = optim.make_optimizer(config)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        updates, new_stats = jax.device_get((updates, new_stats))
        result = jax.device_get(result)
    diffs = {
        "logits": _max_diff(result.logits, _nhwc(out.detach())),
        "lowres_logits": _max_diff(result.lowres_logits, _nhwc(aspp.detach())),
        "features": _max_diff(result.features, _nhwc(features.detach())),
    }
    # Running statistics: torch updates the variance with the unbiased batch variance,
    # Flax with the biased one; compare means directly and variances through n/(n-1).
    theirs = net.state_dict()
    ours = _ours_to_reference(new_stats, "batch_stats")
    mean_keys = [k for k in ours if k.endswith("running_mean")]
    diffs["running_mean"] = max(_max_diff(ours[k], theirs[k]) for k in mean_keys)
    var_diffs, uncorrected = [], []
    for key, value in ours.items():
        if key.endswith("running_var"):
            n = counts[key[: -len(".running_var")]]
            unbiased = (theirs[key] - 0.9 * old_var[key]) / 0.1
            expected = 0.9 * old_var[key] + 0.1 * unbiased * (n - 1) / n
            var_diffs.append(_max_diff(value, expected))
            uncorrected.append(_max_diff(value, theirs[key]))
    diffs["running_var (Bessel-corrected)"] = max(var_diffs)
    print("float64 train-mode max abs diffs:", diffs)
    print(f"running_var without the n/(n-1) correction: max abs diff {max(uncorrected):.2e}")
    assert all(d <= TOLERANCE for d in diffs.values()), diffs

    our_updates = _ours_to_reference(updates, "params")
    before = _ours_to_reference(params, "params")
    after = {k: v.detach().numpy() for k, v in net.named_parameters()}
    assert set(our_updates) == set(after)
    worst, worst_key = 0.0, None
    for key, update in our_updates.items():
        reference_update = after[key] - torch_layout(before[key])
        relative = _max_diff(torch_layout(update), reference_update) / max(
            float(np.abs(reference_update).max()), 1e-30
        )
        if relative > worst:
            worst, worst_key = relative, key
    print(f"one SGD step: worst relative update diff {worst:.2e} at {worst_key}")
    assert worst <= UPDATE_TOLERANCE, (worst, worst_key)


def test_reference_optimizer_settings_are_ours(reference):
    """The reference's defaults (command_line/arguments.py: lr 0.0025, momentum 0.9,
    weight_decay 1e-4) and group_weight_2's 10x head lr are our config's."""
    from command_line import arguments  # The reference's argparse parser.

    defaults = arguments.parser.parse_args([])
    config = gta2cs_coarse.get_config()
    assert config.optim.lr == defaults.lr
    assert config.optim.momentum == defaults.momentum
    assert config.optim.weight_decay == defaults.weight_decay
    net = reference.deepv2.DeepV2R101(NUM_CLASSES, True, None)
    groups = reference.init_func.group_weight_2([], net, 1.0)
    mult = config.optim.head_lr_mult
    assert [g["lr"] for g in groups] == [1.0, 1.0, mult, mult]
    # Biases and BN parameters (groups 1 and 3) have no weight decay, as our _decay_mask.
    assert [g.get("weight_decay") for g in groups] == [None, 0.0, None, 0.0]
