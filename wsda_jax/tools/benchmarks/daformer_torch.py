"""DAFormer's own torch MiT encoder, imported from a checkout, to time beside ours.

DAFormer pins mmcv-full 1.3.7, which does not install here; its
`mmseg/models/backbones/mix_transformer.py` imports only a few names from mmcv/mmseg,
so these get stand-ins (`stub_modules`): the logger, the BACKBONES registry (its
decorator returns the class), mmcv's checkpoint loaders (never called) and mmcv's
`BaseModule` (a `torch.nn.Module` keeping `init_cfg`). timm is the real one.
tests/test_mit_parity.py imports the same file with the same stand-ins.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
import types
from typing import Any

ENCODER_FILE = "mmseg/models/backbones/mix_transformer.py"


def stub_modules() -> dict[str, types.ModuleType]:
    """The mmcv / mmseg modules that DAFormer's (and WDASS's) MiT file imports from."""
    import torch

    class BaseModule(torch.nn.Module):
        def __init__(self, init_cfg=None):
            super().__init__()
            self.init_cfg = init_cfg

    def never(*args, **kwargs):
        raise AssertionError("weights are loaded by the caller")

    names = ("mmcv", "mmcv.runner", "mmseg", "mmseg.utils", "mmseg.models")
    modules = {name: types.ModuleType(name) for name in names + ("mmseg.models.builder",)}
    modules["mmcv.runner"].BaseModule = BaseModule
    modules["mmcv.runner"].load_checkpoint = never
    modules["mmcv.runner"]._load_checkpoint = never
    modules["mmseg.utils"].get_root_logger = lambda *args, **kwargs: None
    registry = types.SimpleNamespace(register_module=lambda *a, **k: lambda cls: cls)
    modules["mmseg.models.builder"].BACKBONES = registry
    return modules


def import_file(path: str, name: str) -> types.ModuleType:
    """Imports a MiT file (DAFormer's or WDASS's) with `stub_modules` in sys.modules."""
    if not os.path.isfile(path):
        raise ValueError(f"{path!r}: no such file")
    for module_name, module in stub_modules().items():
        sys.modules.setdefault(module_name, module)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_encoder(source: str, variant: str, batch: int, size: int, runs: int) -> dict[str, Any]:
    """DAFormer's `mit_{variant}` (eval mode, its own random init) on `[batch, 3, size,
    size]`: seconds of `runs` forward calls (no_grad) and forward+backward calls of
    sum_stages mean(out^2), after one warm-up call each. Keys: fwd, fwd_bwd (lists),
    threads."""
    import numpy as np
    import torch

    module = import_file(os.path.join(source, ENCODER_FILE), "daformer_mix_transformer")
    net = getattr(module, f"mit_{variant}")().eval()
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))

    def forward():
        with torch.no_grad():
            net(images)

    def forward_backward():
        net.zero_grad()
        sum((out * out).mean() for out in net(images)).backward()

    result = {"threads": torch.get_num_threads()}
    for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[key] = times
    result["median"] = {key: statistics.median(result[key]) for key in ("fwd", "fwd_bwd")}
    return result
