"""Tests for the PyTorch reference model (smartiqa_jax.torch_reference).

torch/timm are the [torch] extra, which the test suite requires (a missing one fails).
The expected state_dict is generated here from the rules of SPEC 1.6, independently
of the implementation, and the head's arithmetic is recomputed by hand.
"""

from __future__ import annotations

import pickle

import pytest

import timm  # noqa: F401  (required: a missing extra must fail, not skip)
import torch

import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from smartiqa_jax.torch_reference import (  # noqa: E402
    FUSIONS,
    SmartIQATorch,
    infer_config,
    load_released_state_dict,
)

# SPEC 1.1: embed dim, depths, heads, whole-model params (M, attention variant).
SPEC_VARIANTS = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 29.52),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 50.84),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 89.11),
}


def spec_state_dict_shapes(variant: str, fusion: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes a released SMART-IQA checkpoint has (SPEC 1.6 rules)."""
    c, depths, heads, _ = SPEC_VARIANTS[variant]
    out: dict[str, tuple[int, ...]] = {}

    def linear(name, o, i, bias=True):
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    def norm(name, d):
        out[f"{name}.weight"] = (d,)
        out[f"{name}.bias"] = (d,)

    bb = "swin.backbone."
    # The SPEC listing abbreviates patch_embed; timm's 4x4 conv has a bias, and
    # only with it does the count come to 210.
    out[bb + "patch_embed.proj.weight"] = (c, 3, 4, 4)
    out[bb + "patch_embed.proj.bias"] = (c,)
    norm(bb + "patch_embed.norm", c)
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        d = c * 2**i
        stage = f"{bb}layers_{i}."
        if i > 0:  # patch merging at the start of stages 1..3: LN(4C') + Linear 4C'->2C'
            norm(stage + "downsample.norm", 2 * d)
            linear(stage + "downsample.reduction", d, 2 * d, bias=False)
        for j in range(depth):
            blk = f"{stage}blocks.{j}."
            norm(blk + "norm1", d)
            out[blk + "attn.relative_position_bias_table"] = (169, nh)
            linear(blk + "attn.qkv", 3 * d, d)
            linear(blk + "attn.proj", d, d)
            norm(blk + "norm2", d)
            linear(blk + "mlp.fc1", 4 * d, d)
            linear(blk + "mlp.fc2", d, 4 * d)

    out["swin.lda1_pool.0.weight"] = (16, c, 1, 1)
    linear("swin.lda1_fc", 16, 1024)
    out["swin.lda2_pool.0.weight"] = (32, 2 * c, 1, 1)
    linear("swin.lda2_fc", 16, 512)
    out["swin.lda3_pool.0.weight"] = (64, 4 * c, 1, 1)
    linear("swin.lda3_fc", 16, 256)
    linear("swin.lda4_fc", 176, 8 * c)
    if fusion == "attention":
        linear("multiscale_attention.attention_net.0", 256, 8 * c)
        linear("multiscale_attention.attention_net.3", 4, 256)
    fused = 8 * c if fusion == "backbone" else 15 * c
    for idx, (o, i) in zip((0, 2, 4), ((512, fused), (256, 512), (112, 256))):
        out[f"conv1.{idx}.weight"] = (o, i, 1, 1)
        out[f"conv1.{idx}.bias"] = (o,)
    for k, (wch, fo) in enumerate(((512, 112), (128, 56), (32, 28), (8, 14)), start=1):
        out[f"fc{k}w_conv.weight"] = (wch, 112, 3, 3)
        out[f"fc{k}w_conv.bias"] = (wch,)
        linear(f"fc{k}b_fc", fo, 112)
    linear("fc5w_fc", 14, 112)
    linear("fc5b_fc", 1, 112)
    return out


def shapes_of(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SmartIQATorch("tiny", "attention").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_out(tiny, images):
    with torch.no_grad():
        return tiny(images)


def test_tiny_attention_state_dict_is_spec_listing(tiny):
    sd = tiny.state_dict()
    expected = spec_state_dict_shapes("tiny", "attention")
    assert len(expected) == 210
    assert list(sd) == list(expected)          # same names, same order
    assert shapes_of(sd) == expected
    # Derived buffers exist in the module but are not persisted.
    buffers = {n for n, _ in tiny.named_buffers()}
    assert "swin.backbone.layers_0.blocks.0.attn.relative_position_index" in buffers
    assert "swin.backbone.layers_0.blocks.1.attn_mask" in buffers
    assert not any("relative_position_index" in k or "attn_mask" in k for k in sd)


@pytest.mark.parametrize("variant", list(SPEC_VARIANTS))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_all_configs_shapes_and_infer_config(variant, fusion):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = SmartIQATorch(variant, fusion)
    sd = model.state_dict()
    assert shapes_of(sd) == spec_state_dict_shapes(variant, fusion)
    assert infer_config(sd) == {"variant": variant, "fusion": fusion}
    # infer_config reads keys/shapes only, and tolerates a DataParallel prefix.
    assert infer_config({"module." + k: v for k, v in sd.items()})["variant"] == variant
    if fusion == "attention":
        n_params = sum(p.numel() for p in model.parameters())
        assert round(n_params / 1e6, 2) == SPEC_VARIANTS[variant][3]


def test_infer_config_rejects_foreign_dicts():
    with pytest.raises(ValueError):
        infer_config({"conv1.0.weight": torch.zeros(512, 1440, 1, 1)})
    with torch.device("meta"):
        sd = SmartIQATorch("tiny", "multiscale").state_dict()
    sd["conv1.0.weight"] = torch.empty(512, 1000, 1, 1, device="meta")
    with pytest.raises(ValueError):
        infer_config(sd)


def test_released_defaults():
    with torch.device("meta"):
        for variant, p, dp in (("tiny", 0.3, 0.2), ("small", 0.35, 0.25), ("base", 0.4, 0.3)):
            m = SmartIQATorch(variant)
            assert m.dropout.p == p
            last = m.swin.backbone.layers_3.blocks[-1]
            assert last.drop_path1.drop_prob == pytest.approx(dp)  # linear ramp ends at the rate
            assert m.multiscale_attention.attention_net[2].p == 0.5
        m = SmartIQATorch("tiny", "backbone", dropout=0.1, drop_path_rate=0.0)
        assert m.dropout.p == 0.1 and m.multiscale_attention is None
    with pytest.raises(ValueError):
        SmartIQATorch("large")
    with pytest.raises(ValueError):
        SmartIQATorch("tiny", "sigmoid")


def test_initialisation_follows_spec(tiny):
    # Attention linears: normal(0, 0.01), zero bias.
    att = tiny.multiscale_attention.attention_net
    assert torch.all(att[0].bias == 0) and torch.all(att[3].bias == 0)
    assert att[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    # Kaiming-normal fan-in: std = sqrt(2 / fan_in).
    for w, fan_in in ((tiny.fc1w_conv.weight, 112 * 9), (tiny.swin.lda4_fc.weight, 768),
                      (tiny.swin.lda2_pool[0].weight, 192)):
        assert w.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)


def test_outputs_shapes_and_stage_weights(tiny_out):
    out = tiny_out
    assert out["score"].shape == (2,)
    assert out["target_in"].shape == (2, 224)
    w = out["stage_weights"]
    assert w.shape == (2, 4)
    assert torch.all(w > 0)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    expected = {"fc1w": (2, 112, 224), "fc1b": (2, 112), "fc2w": (2, 56, 112), "fc2b": (2, 56),
                "fc3w": (2, 28, 56), "fc3b": (2, 28), "fc4w": (2, 14, 28), "fc4b": (2, 14),
                "fc5w": (2, 1, 14), "fc5b": (2, 1)}
    assert shapes_of(out["target_params"]) == expected
    assert [tuple(f.shape) for f in out["features"]] == [
        (2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384), (2, 7, 7, 768)]
    assert torch.isfinite(out["score"]).all()


def test_eval_batch_independent_and_train_stochastic(tiny, images, tiny_out):
    # (Eval determinism is checked bit-exactly in test_strict_round_trip.)
    # Batch independence: scoring one image alone gives the same number.
    with torch.no_grad():
        one = tiny(images[1:])
    torch.testing.assert_close(one["score"], tiny_out["score"][1:], rtol=1e-5, atol=1e-5)
    tiny.train()
    try:
        with torch.no_grad():
            a, b = tiny(images[:1])["score"], tiny(images[:1])["score"]
        assert not torch.equal(a, b)   # dropout / drop path are wired in
    finally:
        tiny.eval()


def test_strict_round_trip_and_eval_determinism(tiny, images, tiny_out):
    torch.manual_seed(123)
    other = SmartIQATorch("tiny", "attention").eval()
    assert not torch.equal(other.fc1w_conv.weight, tiny.fc1w_conv.weight)   # a different init
    other.load_state_dict(tiny.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(images)["score"], tiny_out["score"])


def test_head_matches_hand_computation(tiny, tiny_out):
    """Recompute LDA, fusion, hyper and target nets from the NHWC features with
    plain ops (reshape-means for pooling, grouped conv for the target net, as
    HyperIQA does) and compare with the module."""
    sd = tiny.state_dict()
    feats = [f.permute(0, 3, 1, 2) for f in tiny_out["features"]]  # NCHW
    b = feats[0].shape[0]

    def block_mean(x, k):  # (B,C,H,W) -> (B,C,H/k,W/k)
        n, c, h, w = x.shape
        return x.reshape(n, c, h // k, k, w // k, k).mean(dim=(3, 5))

    def lin(name, x):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    with torch.no_grad():
        ldas = []
        for i in range(3):
            y = torch.einsum("bchw,oc->bohw", feats[i], sd[f"swin.lda{i + 1}_pool.0.weight"][:, :, 0, 0])
            ldas.append(lin(f"swin.lda{i + 1}_fc", block_mean(y, 7).reshape(b, -1)))
        ldas.append(lin("swin.lda4_fc", feats[3].mean(dim=(2, 3))))
        target_in = torch.cat(ldas, 1)
        torch.testing.assert_close(tiny_out["target_in"], target_in, rtol=1e-4, atol=1e-4)

        hidden = torch.relu(lin("multiscale_attention.attention_net.0", feats[3].mean(dim=(2, 3))))
        a = torch.softmax(lin("multiscale_attention.attention_net.3", hidden), 1)
        torch.testing.assert_close(tiny_out["stage_weights"], a)
        pooled = [block_mean(f, k) for f, k in zip(feats, (8, 4, 2, 1))]
        fused = torch.cat([p * a[:, i].view(b, 1, 1, 1) for i, p in enumerate(pooled)], 1)
        h = fused
        for idx in (0, 2, 4):
            h = torch.relu(F.conv2d(h, sd[f"conv1.{idx}.weight"], sd[f"conv1.{idx}.bias"]))
        g = h.mean(dim=(2, 3))

        # HyperIQA's TargetFC: the batch folded into channels, one group per image.
        q = target_in.reshape(1, b * 224, 1, 1)
        for k, (fo, fi) in enumerate(((112, 224), (56, 112), (28, 56), (14, 28)), start=1):
            w = F.conv2d(h, sd[f"fc{k}w_conv.weight"], sd[f"fc{k}w_conv.bias"], padding=1)
            w = w.reshape(b, fo, fi)
            torch.testing.assert_close(tiny_out["target_params"][f"fc{k}w"], w, rtol=1e-4, atol=1e-4)
            bias = lin(f"fc{k}b_fc", g)
            q = torch.sigmoid(F.conv2d(q, w.reshape(b * fo, fi, 1, 1), bias.reshape(-1), groups=b))
        w5 = lin("fc5w_fc", g).reshape(b, 14, 1, 1)
        score = F.conv2d(q, w5, lin("fc5b_fc", g).reshape(-1), groups=b).reshape(b)
    torch.testing.assert_close(tiny_out["score"], score, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion", ["backbone", "multiscale"])
def test_other_fusions_forward_shapes(fusion):
    with torch.device("meta"):  # shape propagation only
        model = SmartIQATorch("base", fusion).eval()
        out = model(torch.empty(3, 3, 224, 224))
    assert out["stage_weights"] is None
    assert out["score"].shape == (3,)
    assert out["target_in"].shape == (3, 224)
    assert out["features"][3].shape == (3, 7, 7, 1024)


def test_load_released_state_dict(tiny, tmp_path):
    sd = tiny.state_dict()

    # The released training checkpoint: nested, DataParallel-prefixed, with extras.
    ckpt = {"epoch": 7, "model_state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "released.pth")
    loaded = load_released_state_dict(tmp_path / "released.pth")
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert infer_config(loaded) == {"variant": "tiny", "fusion": "attention"}

    # The other formats on the head tensors only (keeps the test fast).
    head = {k: v for k, v in sd.items() if not k.startswith("swin.backbone.layers_")}
    save_file({k: v.contiguous() for k, v in head.items()}, str(tmp_path / "export.safetensors"))
    loaded = load_released_state_dict(str(tmp_path / "export.safetensors"))
    assert set(loaded) == set(head) and all(torch.equal(loaded[k], head[k]) for k in head)

    # In-memory dict with numpy arrays (what a JAX exporter holds).
    loaded = load_released_state_dict({"state_dict": {k: v.numpy() for k, v in head.items()}})
    assert all(torch.equal(loaded[k], head[k]) for k in head)

    model = SmartIQATorch.from_released(tmp_path / "released.pth")
    assert not model.training
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    with pytest.raises(TypeError):
        load_released_state_dict({"a.weight": [1.0, 2.0]})


class _NotATensor:  # picklable, but not something weights_only will construct
    pass


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"x": _NotATensor()}}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_released_state_dict(path)
