"""The native merge computes what the tensor code computes, and is used exactly where it may be."""

import warnings

import pytest
import torch

import tieta
import tieta.native as native
from tieta.methods import tome
from tieta.native import tensor_code, tome_merge
from tests.conftest import make_vit
from tests.methods.test_tome import SPEC_CASES, reference_merge, spec_case


@pytest.fixture
def native_calls(monkeypatch) -> list:
    """Records every native merge the blocks run."""
    calls = []
    real = tome.native_merge

    def spy(*args, **kwargs):
        calls.append(args[3])  # r
        return real(*args, **kwargs)

    monkeypatch.setattr(tome, "native_merge", spy)
    return calls


def _randomise(pyra_model) -> None:
    """PYRA weights away from their identity initialisation, so that the re-activation acts."""
    torch.manual_seed(1)
    with torch.no_grad():
        for block in pyra_model.blocks:
            if block.pyra is not None:
                block.pyra.token_weight.normal_(std=0.5)
                block.pyra.norm.weight.normal_(1.0, 0.2)
                block.pyra.norm.bias.normal_(0.0, 0.2)


@pytest.mark.parametrize("n,r,num_prefix", SPEC_CASES)
@pytest.mark.parametrize("with_pyra", [False, True])
def test_native_merge_follows_the_spec_token_for_token(n, r, num_prefix, with_pyra):
    x, keys, size, pyra = spec_case(n, r, with_pyra, heads=2)
    (batch, _, channels), r = x.shape, min(r, (n - num_prefix) // 2)
    with torch.no_grad():
        merged, merged_size, log_size = tome_merge.native_merge(keys, x, size, r, num_prefix, pyra)
    assert merged.shape == (batch, n - r, channels) and log_size.shape == (batch, 1, 1, n - r)
    for image in range(batch):
        expected_x, expected_size = reference_merge(x[image], keys[image].sum(0), size[image, :, 0], r, num_prefix, pyra)
        torch.testing.assert_close(merged[image], expected_x)
        torch.testing.assert_close(merged_size[image, :, 0], expected_size)
    torch.testing.assert_close(log_size[:, 0, 0], merged_size[..., 0].log())


@pytest.mark.parametrize("method", ["tome", "pyra"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_native_model_equals_tensor_code(vit_variant, method, prop_attn, native_calls):
    model = getattr(tieta, f"add_{method}")(make_vit(vit_variant), r=[3, 6, 2], prop_attn=prop_attn)
    if method == "pyra":
        _randomise(model)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            native_out, native_size = model(x), model.token_state.size
            with tensor_code():
                tensor_out, tensor_size = model(x), model.token_state.size
        # the same merges (equal sizes); the values may differ in the last bits: scores summed in
        # another order can swap two near-equal ranks, and log and LayerNorm come from other libraries
        torch.testing.assert_close(native_out, tensor_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native_size, tensor_size, rtol=0, atol=0)
    assert native_calls[:3] == [3, 6, 2]


def test_native_pyra_at_initialisation_equals_native_tome(vit_variant):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tome = tieta.add_tome(make_vit(vit_variant), r=[3, 2, 1])(x)
        pyra = tieta.add_pyra(make_vit(vit_variant), r=[3, 2, 1])(x)
    torch.testing.assert_close(pyra, tome, rtol=0, atol=0)


def test_exact_ties_merge_like_the_tensor_code():
    """Duplicate tokens give equal scores; both implementations then prefer the lower index."""
    torch.manual_seed(0)
    x, keys = torch.randn(2, 21, 8), torch.randn(2, 3, 21, 4)
    keys[:, :, 5], keys[:, :, 7] = keys[:, :, 3], keys[:, :, 3]  # equal B tokens: A rows tie between them
    keys[:, :, 4], keys[:, :, 6] = keys[:, :, 2], keys[:, :, 2]  # equal A tokens: equal best scores
    x[:, 4], x[:, 6] = x[:, 2] + 1, x[:, 2] - 1  # but different contents, so the choice shows
    with torch.no_grad():
        merged, size, _ = tome_merge.native_merge(keys, x, None, 6, 1)
        matching = tieta.methods.tome.bipartite_soft_matching(keys.sum(1), 6, 1)
        expected, expected_size = tieta.methods.tome.merge_wavg(matching, x, None)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    torch.testing.assert_close(size, expected_size, rtol=0, atol=0)


def test_training_gradients_and_autocast_take_the_tensor_code(native_calls):
    model = tieta.add_pyra(make_vit("plain"), r=2).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert model.blocks[0].pyra.token_weight.grad is not None
    model.eval()
    model(x)  # gradients still enabled: the tensor code carries them
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert native_calls == []
    with torch.no_grad():
        model(x)
    assert len(native_calls) == 3


def test_switched_off_by_environment(monkeypatch, native_calls):
    monkeypatch.setenv("TIETA_NATIVE", "0")
    with torch.no_grad():
        tieta.add_tome(make_vit("plain"), r=2)(torch.randn(1, 3, 32, 32))
    assert native_calls == []


def test_flop_count_sees_the_merge_arithmetic():
    model = tieta.add_tome(make_vit("plain"), r=4)
    images = torch.randn(2, 3, 32, 32)
    with tensor_code():
        expected = tieta.count_flops(model, images)
    assert tieta.count_flops(model, images) == expected


def test_without_a_compiler_the_tensor_code_runs_with_one_warning(monkeypatch, tmp_path, native_calls):
    monkeypatch.setenv("TIETA_HOME", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(tome_merge, "_kernel", None)
    native.load_library.cache_clear()
    model = tieta.add_tome(make_vit("plain"), r=2)
    x = torch.randn(1, 3, 32, 32)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(x)
            model(x)
        with torch.no_grad(), tensor_code():
            expected = model(x)
    finally:
        native.load_library.cache_clear()
    assert [str(w.message) for w in caught if "kernel" in str(w.message)].__len__() == 1
    assert "tensor implementation" in str(caught[0].message)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not list(tmp_path.glob("native/*.so"))
