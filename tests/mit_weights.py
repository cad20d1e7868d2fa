"""Random NVlabs MiT state dicts (exact key names and shapes) and an independent NumPy
forward of the MiT encoder written from the SegFormer definition (NCHW, torch's
token layout, float64), for the MiT tests."""

import numpy as np
import scipy.special

HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)


def random_state_dict(embed_dims, depths, seed=0, classifier=False):
    """Random float32 weights under NVlabs' key names; LayerNorm scales in [0.5, 1.5] and
    biases N(0, 0.1), so a transposed or misplaced parameter changes the output."""
    rng = np.random.default_rng(seed)
    sd = {}

    def put(key, shape, scale):
        sd[key] = (scale * rng.standard_normal(shape)).astype(np.float32)

    def linear(prefix, out, inp):
        put(prefix + ".weight", (out, inp), inp**-0.5)
        put(prefix + ".bias", (out,), 0.1)

    def conv(prefix, out, inp, k):
        put(prefix + ".weight", (out, inp, k, k), (inp * k * k) ** -0.5)
        put(prefix + ".bias", (out,), 0.1)

    def norm(prefix, c):
        sd[prefix + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        put(prefix + ".bias", (c,), 0.1)

    inp = 3
    for s, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
        conv(f"patch_embed{s + 1}.proj", dim, inp, 7 if s == 0 else 3)
        norm(f"patch_embed{s + 1}.norm", dim)
        for i in range(depth):
            p = f"block{s + 1}.{i}"
            norm(p + ".norm1", dim)
            linear(p + ".attn.q", dim, dim)
            linear(p + ".attn.kv", 2 * dim, dim)
            if SR_RATIOS[s] > 1:
                conv(p + ".attn.sr", dim, dim, SR_RATIOS[s])
                norm(p + ".attn.norm", dim)
            linear(p + ".attn.proj", dim, dim)
            norm(p + ".norm2", dim)
            linear(p + ".mlp.fc1", 4 * dim, dim)
            put(p + ".mlp.dwconv.dwconv.weight", (4 * dim, 1, 3, 3), 1 / 3)
            put(p + ".mlp.dwconv.dwconv.bias", (4 * dim,), 0.1)
            linear(p + ".mlp.fc2", dim, 4 * dim)
        norm(f"norm{s + 1}", dim)
        inp = dim
    if classifier:
        linear("head", 1000, embed_dims[-1])
    return sd


# ----- the NumPy encoder: torch semantics, tokens [B, N, C], images NCHW -----


def conv2d(x, w, b, stride, pad, groups=1):
    """torch.nn.functional.conv2d: x (B, C, H, W), w (O, C/groups, k, k); groups 1 or C."""
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = (x.shape[2] - k) // stride + 1
    out_w = (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i::stride, j::stride][:, :, :out_h, :out_w]
            if groups == 1:
                out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
            else:
                out += patch * w[:, 0, i, j][None, :, None, None]
    return out + b[None, :, None, None]


def layer_norm(x, sd, prefix, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def to_image(t, height, width):
    batch, _, channels = t.shape
    return t.transpose(0, 2, 1).reshape(batch, channels, height, width)


def to_tokens(x):
    batch, channels = x.shape[:2]
    return x.reshape(batch, channels, -1).transpose(0, 2, 1)


def attention(t, sd, p, heads, sr, height, width):
    batch, n, c = t.shape
    d = c // heads
    q = linear(t, sd, p + ".q").reshape(batch, n, heads, d).transpose(0, 2, 1, 3)
    if sr > 1:
        x = to_image(t, height, width)
        x = conv2d(x, sd[p + ".sr.weight"], sd[p + ".sr.bias"], sr, 0)
        t = layer_norm(to_tokens(x), sd, p + ".norm", 1e-5)
    kv = linear(t, sd, p + ".kv").reshape(batch, -1, 2, heads, d).transpose(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    logits = q @ k.transpose(0, 1, 3, 2) * d**-0.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, n, c)
    return linear(out, sd, p + ".proj")


def mix_ffn(t, sd, p, height, width):
    t = linear(t, sd, p + ".fc1")
    w, b = sd[p + ".dwconv.dwconv.weight"], sd[p + ".dwconv.dwconv.bias"]
    t = to_tokens(conv2d(to_image(t, height, width), w, b, 1, 1, groups=t.shape[-1]))
    t = 0.5 * t * (1.0 + scipy.special.erf(t / np.sqrt(2.0)))  # exact GELU
    return linear(t, sd, p + ".fc2")


def numpy_mit(sd, images_nhwc, depths):
    """The four stage outputs, NHWC float64, of the eval-mode encoder with weights `sd`."""
    sd = {key: np.asarray(value, np.float64) for key, value in sd.items()}
    x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
    outputs = []
    for s in range(4):
        stride, pad = (4, 3) if s == 0 else (2, 1)
        x = conv2d(x, sd[f"patch_embed{s + 1}.proj.weight"], sd[f"patch_embed{s + 1}.proj.bias"],
                   stride, pad)  # fmt: skip
        height, width = x.shape[2:]
        t = layer_norm(to_tokens(x), sd, f"patch_embed{s + 1}.norm", 1e-5)
        for i in range(depths[s]):
            p = f"block{s + 1}.{i}"
            y = layer_norm(t, sd, p + ".norm1", 1e-6)
            t = t + attention(y, sd, p + ".attn", HEADS[s], SR_RATIOS[s], height, width)
            y = layer_norm(t, sd, p + ".norm2", 1e-6)
            t = t + mix_ffn(y, sd, p + ".mlp", height, width)
        t = layer_norm(t, sd, f"norm{s + 1}", 1e-6)
        x = to_image(t, height, width)
        outputs.append(x.transpose(0, 2, 3, 1))
    return outputs
