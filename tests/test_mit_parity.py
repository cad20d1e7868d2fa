"""Our MiT encoder against the MiT code of the reference (anurag-198/WDASS
`network/encoders/segformer.py`) and of DAFormer (lhoyer/DAFormer
`mmseg/models/backbones/mix_transformer.py`), on the same random weights.

Each file is imported from the checkout named by $WDASS_SOURCE / $DAFORMER_SOURCE (either
or both; the test of an unset one is skipped). Stubbed, as the minimum for the import
without mmcv/mmseg installed (timm is real; `daformer_torch.stub_modules`):
`mmseg.utils.get_root_logger` (logger), `mmseg.models.builder.BACKBONES` (registry, its
decorator returns the class), and mmcv's checkpoint loaders (never called). DAFormer's
file also subclasses mmcv's `BaseModule`; its stand-in is `torch.nn.Module` taking
`init_cfg`, the only part of BaseModule that the encoder's forward depends on.

The networks are the files' own `mit_b0` classes (their widths, depths, LayerNorm eps and
qkv bias), given a random state dict with non-trivial LayerNorm parameters, saved with
`torch.save`, read back with `imagenet_init.load_state_dict` (weights_only) and converted
with `mix_transformer.variables_from_state_dict`. Every stage output is compared on a
non-square, odd-sized batch: float64 on both sides to 1e-10, and our float32 error
(against the reference's float64) within twice the reference's own float32 error.

Run: WDASS_SOURCE=/work/src/WDASS DAFORMER_SOURCE=/work/src/DAFormer \\
         /work/venv-torch/bin/python -m pytest -n 0 -s tests/test_mit_parity.py -q
"""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mit_weights import random_state_dict

torch = pytest.importorskip("torch", reason="torch is not installed (the parity test needs it)")
pytest.importorskip("timm", reason="timm is not installed (the MiT files import it)")

from wsda_jax.models import imagenet_init  # noqa: E402
from wsda_jax.models import mix_transformer as mt  # noqa: E402
from wsda_jax.tools.benchmarks import daformer_torch  # noqa: E402

SOURCES = {
    "wdass": ("WDASS_SOURCE", "network/encoders/segformer.py"),
    "daformer": ("DAFORMER_SOURCE", "mmseg/models/backbones/mix_transformer.py"),
}
HEIGHT, WIDTH = 97, 130
FLOAT64_TOLERANCE = 1e-10


@pytest.fixture(scope="module", params=sorted(SOURCES))
def reference(request):
    """The reference MiT module (its file, imported from the named checkout)."""
    variable, relative = SOURCES[request.param]
    source = os.environ.get(variable, "")
    if not source:
        pytest.skip(f"{variable} (a {request.param} checkout) is not set")
    monkeypatch = pytest.MonkeyPatch()
    for name, module in daformer_torch.stub_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(
        f"reference_mit_{request.param}", os.path.join(source, relative)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    monkeypatch.undo()


def test_stage_outputs_match_reference(reference, tmp_path):
    dims, depths = mt.VARIANTS["b0"]
    net = reference.mit_b0().eval()
    state_dict = random_state_dict(dims, depths, seed=5, classifier=True)
    weights = {k: torch.from_numpy(v) for k, v in state_dict.items() if not k.startswith("head")}
    net.load_state_dict(weights, strict=True)
    # As NVlabs' ImageNet checkpoints: the module's own keys plus the classifier.
    path = str(tmp_path / "mit_b0.pth")
    torch.save({**net.state_dict(), "head.weight": torch.zeros(1000, dims[-1]),
                "head.bias": torch.zeros(1000)}, path)  # fmt: skip
    variables = mt.variables_from_state_dict(imagenet_init.load_state_dict(path), "b0")

    images = np.random.default_rng(7).normal(size=(2, HEIGHT, WIDTH, 3)).astype(np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        theirs32 = [o.numpy().transpose(0, 2, 3, 1) for o in net(nchw)]
        theirs64 = [o.numpy().transpose(0, 2, 3, 1) for o in net.double()(nchw.double())]
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        ours64 = mt.MixTransformer("b0", dtype=jnp.float64).apply(
            params64, jnp.asarray(images, jnp.float64), train=False
        )
        ours64 = [np.asarray(o) for o in ours64]
    ours32 = [np.asarray(o) for o in mt.MixTransformer("b0").apply(variables, images, False)]

    for stage in range(4):
        assert ours64[stage].shape == theirs64[stage].shape
        diff64 = np.abs(ours64[stage] - theirs64[stage]).max()
        ours_error = np.abs(ours32[stage] - theirs64[stage]).max()
        their_error = np.abs(theirs32[stage] - theirs64[stage]).max()
        print(
            f"{reference.__name__} stage {stage + 1} {ours64[stage].shape}: float64 max diff "
            f"{diff64:.2e}; float32 vs reference float64: ours {ours_error:.2e}, "
            f"reference {their_error:.2e}"
        )
        assert diff64 < FLOAT64_TOLERANCE, f"stage {stage + 1}"
        assert ours_error <= 2 * their_error, f"stage {stage + 1}"
