import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import tieta
from tieta import TietaError


def _source(name="test_vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _same_backbone(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head"))


def test_random_backbone_has_task_head():
    model = tieta.load_backbone("test_vit", weights="random", num_classes=7)
    assert model.head.out_features == 7


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_file_loads_everything_but_the_head(tmp_path, suffix):
    source = _source()  # 1000-class head
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model = tieta.load_backbone("test_vit", weights=path, num_classes=7)
    assert model.head.out_features == 7
    assert _same_backbone(model, source)


def test_position_embedding_is_resampled_to_img_size(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_source().state_dict(), str(path))
    model = tieta.load_backbone("test_vit", weights=path, num_classes=3, img_size=96)
    assert model.patch_embed.grid_size == (6, 6)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(_source("test_vit2").state_dict(), str(path))
    with pytest.raises(TietaError, match="does not fit"):
        tieta.load_backbone("test_vit", weights=path, num_classes=3)
    partial = tmp_path / "partial.safetensors"
    state = _source().state_dict()
    del state["blocks.0.attn.qkv.weight"]
    save_file(state, str(partial))
    with pytest.raises(TietaError, match="missing blocks.0.attn.qkv.weight"):
        tieta.load_backbone("test_vit", weights=partial, num_classes=3)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _source().state_dict(), "payload": _Payload()}, path)
    with pytest.raises(TietaError, match="could not read"):
        tieta.load_backbone("test_vit", weights=path, num_classes=3)
    assert "code ran" not in capsys.readouterr().out


def test_missing_file_bad_suffix_unknown_name(tmp_path):
    with pytest.raises(TietaError, match="does not exist"):
        tieta.load_backbone("test_vit", weights=tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(TietaError, match="should end in"):
        tieta.load_backbone("test_vit", weights=tmp_path / "w.txt")
    with pytest.raises(TietaError, match="did you mean"):
        tieta.load_backbone("vit_base_patch16_22", weights="random")


def _to_google_npz(model, path):
    """Write a timm ViT in the layout of Google's original .npz ViT checkpoints."""
    w, heads, hd = {}, model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    t = lambda x: x.detach().numpy()
    w["embedding/kernel"] = t(model.patch_embed.proj.weight.permute(2, 3, 1, 0))
    w["embedding/bias"] = t(model.patch_embed.proj.bias)
    w["cls"] = t(model.cls_token)
    w["Transformer/posembed_input/pos_embedding"] = t(model.pos_embed)
    w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"] = t(model.norm.weight), t(model.norm.bias)
    w["head/kernel"], w["head/bias"] = t(model.head.weight.T), t(model.head.bias)
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(block.norm1.weight), t(block.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(block.norm2.weight), t(block.norm2.bias)
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * heads * hd, (j + 1) * heads * hd)
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = t(block.attn.qkv.weight[rows].T.reshape(-1, heads, hd))
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = t(block.attn.qkv.bias[rows].reshape(heads, hd))
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = t(block.attn.proj.weight.T.reshape(heads, hd, -1))
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = t(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(path, **w)


def test_google_npz_checkpoint(tmp_path):
    source = _source("vit_tiny_patch16_224", depth=2, img_size=64)
    path = tmp_path / "vit.npz"
    _to_google_npz(source, path)
    model = tieta.load_backbone("vit_tiny_patch16_224", weights=path, num_classes=4, depth=2, img_size=64)
    assert model.head.out_features == 4
    assert _same_backbone(model, source)
