"""Model registry: paper parameter/MAC counts, registration with timm, the ablation builder, name checks."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

import metaformer_platform.models as M

# Parameter counts of the official PoolFormer checkpoints (and timm's poolformer_*).
POOLFORMER_PARAMS = {
    "poolformer_s12": 11_915_176,
    "poolformer_s24": 21_388_968,
    "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520,
    "poolformer_m48": 73_473_448,
}
POOLFORMER_PAPER_MACS_G = {
    "poolformer_s12": 1.8,
    "poolformer_s24": 3.4,
    "poolformer_s36": 5.0,
    "poolformer_m36": 8.8,
    "poolformer_m48": 11.6,
}
# sail-sg/metaformer README: trainable params (M) and RandFormer's frozen random matrices (M).
BASELINE_PARAMS_M = {"s12": 11.9, "s24": 21.3, "s36": 30.8, "m36": 56.1, "m48": 73.3}
RANDFORMER_FROZEN_M = {"s12": 0.2, "s24": 0.5, "s36": 0.7, "m36": 0.7, "m48": 0.9}

DEBUG = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "img_size": 32, "num_classes": 10}
# Widths divisible by the attention head width (32), so every mixer fits every stage.
DEBUG_ATTN = {**DEBUG, "dims": (32, 64, 96, 128)}


@functools.cache
def complexity(name: str, img_size: int = 224) -> dict[str, int]:
    return M.model_complexity(name, img_size=img_size)


def rel(value: float, reference: float) -> float:
    return abs(value / reference - 1.0)


# --- paper numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POOLFORMER_PARAMS))
def test_poolformer_params_exact(name: str) -> None:
    assert complexity(name)["params"] == POOLFORMER_PARAMS[name]


@pytest.mark.parametrize("name", list(POOLFORMER_PAPER_MACS_G))
def test_poolformer_macs_within_3_percent_of_paper(name: str) -> None:
    macs_g = complexity(name)["macs"] / 1e9
    assert rel(macs_g, POOLFORMER_PAPER_MACS_G[name]) < 0.03, macs_g


@pytest.mark.parametrize("size", list(BASELINE_PARAMS_M))
@pytest.mark.parametrize("family", ["identityformer", "randformer"])
def test_metaformer_baselines_params_match_sail_table(family: str, size: str) -> None:
    c = complexity(f"{family}_{size}")
    assert rel(c["params"] / 1e6, BASELINE_PARAMS_M[size]) < 0.01, c
    if family == "randformer":
        # The frozen random matrices are kept out of the parameter count and listed apart, as in the table.
        assert abs(c["frozen_params"] / 1e6 - RANDFORMER_FROZEN_M[size]) < 0.05, c
    else:
        assert c["frozen_params"] == 0


@pytest.mark.parametrize("name", list(M.ABLATIONS))
def test_ablation_presets_reproduce_table5(name: str) -> None:
    row = M.ABLATIONS[name]
    c = complexity(name)
    assert rel(c["params"] / 1e6, row["paper_params_m"]) < 0.01, c
    assert rel(c["macs"] / 1e9, row["paper_macs_g"]) < 0.03, c
    assert M.PAPER_TOP1[name] == row["paper_top1"]
    # The preset's kwargs alone rebuild the registered model.
    with torch.device("meta"):
        rebuilt = M.build_metaformer(**row["kwargs"])
    assert sum(p.numel() for p in rebuilt.parameters()) == c["params"]


def test_random_matrix_ablation_has_the_papers_21m_frozen_values() -> None:
    frozen_m = complexity("poolformer_s12_ablation_random")["frozen_params"] / 1e6
    assert 20.5 < frozen_m < 21.5


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_macs_are_counted(device: str) -> None:
    # CPU's fused attention kernel is invisible to FlopCounterMode; model_complexity must still count it.
    # Attention in stage 3 (2x2 tokens, width 32) and 4 (1 token, width 64) adds 4*N*C^2 (qkv, proj) + 2*N^2*C.
    expected = (4 * 4 * 32**2 + 2 * 4**2 * 32) + (4 * 1 * 64**2 + 2 * 1**2 * 64)
    with torch.device(device):
        pool = M.build_metaformer(**DEBUG)
        hybrid = M.build_metaformer(**DEBUG, token_mixers=("pooling", "pooling", "attention", "attention"))
    extra = M.model_complexity(hybrid, img_size=32)["macs"] - M.model_complexity(pool, img_size=32)["macs"]
    assert extra == expected


def test_identityformer_is_poolformerv2_without_pooling() -> None:
    with torch.device("meta"):
        ours = timm.create_model("identityformer_s12").state_dict()
        timms = timm.create_model("poolformerv2_s12").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in timms.items()}


def test_ablation_baseline_is_timm_poolformer_s12() -> None:
    torch.manual_seed(0)
    ours = timm.create_model("poolformer_s12_ablation_baseline", num_classes=10).eval()
    torch.manual_seed(0)
    reference = timm.create_model("poolformer_s12", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


# --- registration ----------------------------------------------------------------------------------------

SMALLEST_TIMM_MEMBERS = ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"]


@pytest.mark.parametrize("name", list(M.REGISTERED_MODELS) + SMALLEST_TIMM_MEMBERS)
def test_every_model_builds_and_runs_at_32px(name: str) -> None:
    model = M.create_model(name, num_classes=10, img_size=32).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 1000 and len(cfg["input_size"]) == 3
    assert {"crop_pct", "mean", "std"} <= set(cfg)
    if name in M.REGISTERED_MODELS:
        assert cfg["architecture"] == name and not cfg["url"]
        assert cfg["crop_pct"] == M.paper_recipe(name)["crop_pct"]


def test_families_are_registered_and_have_paper_numbers() -> None:
    for family, names in M.FAMILIES.items():
        assert names, family
        for name in names:
            assert timm.is_model(name), name
            if family != "debug":
                assert name in M.PAPER_TOP1 and name in M.PAPER_PARAMS_M and name in M.PAPER_MACS_G, name
    assert [M.PAPER_TOP1[n] for n in M.FAMILIES["poolformer"]] == [77.2, 80.3, 81.4, 82.1, 82.5]
    assert set(M.FAMILIES["poolformer_s12_ablations"]) == set(M.ABLATIONS)


def test_paper_recipe() -> None:
    drop = [M.paper_recipe(n)["drop_path_rate"] for n in M.FAMILIES["poolformer"]]
    crop = [M.paper_recipe(n)["crop_pct"] for n in M.FAMILIES["poolformer"]]
    assert drop == [0.1, 0.1, 0.2, 0.3, 0.4]
    assert crop == [0.9, 0.9, 0.9, 0.95, 0.95]
    assert M.paper_recipe("poolformer_m48.sail_in1k") == {"drop_path_rate": 0.4, "crop_pct": 0.95}
    with pytest.raises(ValueError, match="no paper recipe"):
        M.paper_recipe("resnet50")


# --- debug model -----------------------------------------------------------------------------------------


def test_debug_model_shapes_and_learns() -> None:
    torch.manual_seed(0)
    model = timm.create_model("poolformer_debug", num_classes=10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert model.forward_features(x).shape == (8, 64, 1, 1)
    assert model(x).shape == (8, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- builder ---------------------------------------------------------------------------------------------


def _mixer(model: nn.Module, stage: int) -> nn.Module:
    return model.stages[stage].blocks[0].token_mixer


@pytest.mark.parametrize("mixer", list(M.TOKEN_MIXERS))
def test_builder_token_mixers(mixer: str) -> None:
    model = M.build_metaformer(**DEBUG_ATTN, token_mixers=mixer)
    assert all(type(_mixer(model, i)) is M.TOKEN_MIXERS[mixer] for i in range(4))
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    y.sum().backward()
    mixer_params = [p for p in _mixer(model, 0).parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer_params)


def test_builder_mixes_per_stage() -> None:
    names = ("identity", "dwconv", "random", "spatial_mlp")
    model = M.build_metaformer(**DEBUG, token_mixers=names)
    assert [type(_mixer(model, i)) for i in range(4)] == [M.TOKEN_MIXERS[n] for n in names]
    # Each stage's matrix is sized by that stage's tokens: 2x2 in stage 3, 1x1 in stage 4.
    assert _mixer(model, 2).random_matrix.shape == (4, 4)
    assert _mixer(model, 3).fc.weight.shape == (1, 1)
    assert model.pretrained_cfg["fixed_input_size"] is True


@pytest.mark.parametrize("norm", list(M.NORMS))
def test_builder_norms(norm: str) -> None:
    model = M.build_metaformer(**DEBUG, norm=norm)
    assert type(model.stages[1].blocks[0].norm1) is M.NORMS[norm]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("act", list(M.ACTIVATIONS))
def test_builder_activations(act: str) -> None:
    model = M.build_metaformer(**DEBUG, act=act)
    assert type(model.stages[0].blocks[0].mlp.act) is M.ACTIVATIONS[act]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("pool_size", [3, 5, 7, 9])
def test_builder_pool_size(pool_size: int) -> None:
    model = M.build_metaformer(**DEBUG, pool_size=pool_size)
    assert _mixer(model, 0).pool.kernel_size == pool_size
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_builder_v2_style_matches_timm_poolformerv2() -> None:
    with torch.device("meta"):
        ours = M.build_metaformer(*M.SIZES["s12"], **M.POOLFORMER_V2_STYLE)
        timms = timm.create_model("poolformerv2_s12")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in timms.state_dict().items()
    }
    assert type(ours.stages[2].blocks[0].mlp.act) is type(timms.stages[2].blocks[0].mlp.act)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_mixers": "pool"}, "unknown token mixer 'pool'; choose one of: pooling"),
        ({"token_mixers": ("pooling", "identity")}, "one name per stage"),
        ({"norm": "layernorm"}, "unknown norm"),
        ({"act": "tanh"}, "unknown activation"),
        ({"pool_size": 4}, "odd"),
        ({"token_mixers": "attention"}, "not divisible by head_dim"),
        ({"img_size": 2}, "too small"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
    ],
)
def test_builder_rejects_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        M.build_metaformer(**{**DEBUG, **kwargs})


# --- token mixers ----------------------------------------------------------------------------------------


def test_random_mixing_is_a_frozen_row_stochastic_token_mix() -> None:
    mixer = M.RandomMixing(dim=8, token_counts={8: 16})
    assert list(mixer.parameters()) == [] and "random_matrix" in mixer.state_dict()
    w = mixer.random_matrix
    torch.testing.assert_close(w.sum(-1), torch.ones(16))
    x = torch.randn(2, 8, 4, 4)
    # Reference: sail-sg's channels-last formulation einsum('mn, bnc -> bmc').
    ref = torch.einsum("mn,bnc->bmc", w, x.permute(0, 2, 3, 1).reshape(2, 16, 8))
    torch.testing.assert_close(mixer(x), ref.reshape(2, 4, 4, 8).permute(0, 3, 1, 2))


def test_spatial_mlp_mixes_tokens_with_one_shared_fc() -> None:
    mixer = M.SpatialMlp(dim=8, token_counts={8: 16})
    assert sum(p.numel() for p in mixer.parameters()) == 16 * 16 + 16
    x = torch.randn(2, 8, 4, 4)
    ref = torch.einsum("mn,bcn->bcm", mixer.fc.weight, x.flatten(2)) + mixer.fc.bias
    torch.testing.assert_close(mixer(x), ref.reshape(2, 8, 4, 4))


def test_fixed_resolution_models() -> None:
    model = M.create_model("randformer_s12", num_classes=10, img_size=64)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and model.pretrained_cfg["fixed_input_size"]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 32, 32))
    # Models that adapt to any size are built without img_size (timm's MetaFormer would reject it).
    assert M.create_model("poolformer_s12", num_classes=10, img_size=64)(torch.randn(1, 3, 32, 32)).shape == (
        1,
        10,
    )


def test_random_matrix_round_trips_through_state_dict() -> None:
    a = M.create_model("randformer_s12", num_classes=10, img_size=32).eval()
    b = M.create_model("randformer_s12", num_classes=10, img_size=32).eval()
    key = "stages.2.blocks.0.token_mixer.random_matrix"
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --- names and complexity --------------------------------------------------------------------------------


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ValueError) as err:
        M.check_model_name("poolformer_s13")
    message = str(err.value)
    assert "'poolformer_s13'" in message and "poolformer_s12" in message and "list_models" in message
    with pytest.raises(ValueError, match="identityformer_m36"):
        M.create_model("identityfomer_m36")
    with pytest.raises(TypeError):
        M.check_model_name(None)  # type: ignore[arg-type]
    M.check_model_name("poolformer_s12.sail_in1k")
    M.check_model_name("randformer_m48")


def test_model_complexity_of_a_module_keeps_its_mode() -> None:
    model = timm.create_model("poolformer_debug").train()
    c = M.model_complexity(model, img_size=32)
    assert model.training
    assert c == complexity("poolformer_debug", 32)
    assert c["params"] == sum(p.numel() for p in model.parameters())
