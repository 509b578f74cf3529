"""The video model against DyT's video code (``video_models/video_vision_transformer_IN21K.py`` of
NUS-HPC-AI-Lab/Dynamic-Tuning), and what the rest of tieta asks of it: parameter groups, DyT's
objective and pictures, FLOPs, export.

The reference below is a slow, literal transcription of that file's ``CrossAttention``,
``AttentiveBlock`` and ``VisionTransformer.forward`` (frames as ``(b t) c h w``, tokens joined as
``b (t tokens) c``, the query token's output taken at ``[:, 0, :]``), with its ``forward_features``
and DyT ``Block`` written out on the backbone's tensors. The ToMe case has no counterpart in that
code: there the frames' features are the ToMe backbone's own (whose parity is tested in
``tests/methods``), and the transcription covers the rest.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tieta
from tests.conftest import make_vit, randomise_parameters
from tieta import shard
from tieta.errors import TietaError
from tieta.methods.dyt import dyt_forward, dyt_loss, evaluation_masks
from tieta.methods.params import freeze_backbone, parameter_group
from tieta.train.optim import build_optimizer
from tieta.video.model import VideoModel, frame_token_masks

FRAMES, CLIPS = 3, 2
SIDE, PATCHES = 32, 16  # conftest's SMALL ViT: 32 px, patch 8, width 48, 3 heads, 3 blocks, 5 classes


# --- the reference, transcribed ---------------------------------------------------------------

class RefCrossAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 attn_head_dim=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        if attn_head_dim is not None:
            head_dim = attn_head_dim
        all_head_dim = head_dim * self.num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.q = nn.Linear(dim, all_head_dim, bias=False)
        self.k = nn.Linear(dim, all_head_dim, bias=False)
        self.v = nn.Linear(dim, all_head_dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.k_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, k=None, v=None):
        B, N, C = x.shape
        N_k = k.shape[1]
        N_v = v.shape[1]
        q_bias, k_bias, v_bias = None, None, None
        if self.q_bias is not None:
            q_bias = self.q_bias
            k_bias = torch.zeros_like(self.v_bias, requires_grad=False)
            v_bias = self.v_bias
        q = F.linear(input=x, weight=self.q.weight, bias=q_bias)
        q = q.reshape(B, N, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        k = F.linear(input=k, weight=self.k.weight, bias=k_bias)
        k = k.reshape(B, N_k, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        v = F.linear(input=v, weight=self.v.weight, bias=v_bias)
        v = v.reshape(B, N_v, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class RefAttentiveBlock(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, drop=0., attn_drop=0., drop_path=0.,
                 norm_layer=nn.LayerNorm, attn_head_dim=None):
        super().__init__()
        self.norm_q = norm_layer(dim)
        self.norm_k = norm_layer(dim)
        self.norm_v = norm_layer(dim)
        self.cross_attn = RefCrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                            attn_drop=attn_drop, proj_drop=drop, attn_head_dim=attn_head_dim)
        self.drop_path = nn.Identity()

    def forward(self, x_q, x_kv):
        x_q = self.norm_q(x_q)
        x_k = self.norm_k(x_kv)
        x_v = self.norm_v(x_kv)
        x = self.cross_attn(x_q, k=x_k, v=x_v)
        return x


class RefVideoHead(nn.Module):
    """The new parts of the reference VisionTransformer: query_token, attentive_blocks, head."""

    def __init__(self, embed_dim, num_heads, num_classes, qkv_bias=True):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.query_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.attentive_blocks = RefAttentiveBlock(dim=embed_dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                                  qk_scale=None, drop=0., attn_drop=0., drop_path=0,
                                                  norm_layer=norm_layer)


def ref_forward_features(backbone, x):
    """The reference's ``forward_features`` after the rearrange, on the backbone's tensors: its Block
    (``x + attn(norm1(x))``; ``x + select * mlp(norm2(x)) + adaptmlp(x)`` at evaluation, TokenSelect
    on ``x[:, 1:]`` with the class token active) where the backbone has DyT, plain blocks where not."""
    x = backbone.patch_embed(x)
    x = torch.cat((backbone.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + backbone.pos_embed
    for block in backbone.blocks:
        x = x + block.attn(block.norm1(x))
        dispatcher = getattr(block, "dispatcher", None)
        if dispatcher is None:
            x = x + block.mlp(block.norm2(x))
            continue
        logits = F.linear(x[:, 1:, :], dispatcher.weight, dispatcher.bias)
        y_soft = logits.sigmoid()  # _gumbel_sigmoid at evaluation, hard, threshold 0.5
        y_hard = torch.zeros_like(logits).masked_fill(y_soft > 0.5, 1.0)
        token_select = y_hard - y_soft.detach() + y_soft
        token_select = torch.cat([token_select.new_ones(x.shape[0], 1, 1), token_select], dim=1)
        adapter = block.adapter
        adapt_x = adapter.up(F.relu(adapter.down(x))) * adapter.scale
        mlp_x = block.mlp(block.norm2(x))
        x = x + token_select * mlp_x + adapt_x
    return backbone.norm(x)


def ref_video_forward(features, fc_norm, head_drop, ref: RefVideoHead, x):
    """The reference VisionTransformer.forward; x: (b, c, t, h, w) as its data loader gives clips."""
    b, c, t, h, w = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # "b c t h w -> (b t) c h w"
    x = features(x)
    x = fc_norm(x)
    x = head_drop(x)
    tokens = x.shape[1]
    x = x.reshape(b, t * tokens, x.shape[2])  # "(b t) tokens c -> b (t tokens) c"
    query_tokens = ref.query_token.expand(b, -1, -1)
    x = ref.attentive_blocks(query_tokens, x)[:, 0, :]
    x = ref.head(x)
    return x


def copy_reference_head(model: VideoModel, ref: RefVideoHead) -> None:
    """The reference's pooling and head tensors into the video model, by their meaning."""
    pool, block = model.head.pool, ref.attentive_blocks
    pairs = [(pool.query, ref.query_token), (model.head.fc.weight, ref.head.weight),
             (model.head.fc.bias, ref.head.bias)]
    for name in ("norm_q", "norm_k", "norm_v"):
        pairs += [(getattr(pool, name).weight, getattr(block, name).weight),
                  (getattr(pool, name).bias, getattr(block, name).bias)]
    for name in ("q", "k", "v", "proj"):
        pairs.append((getattr(pool, name).weight, getattr(block.cross_attn, name).weight))
    pairs.append((pool.proj.bias, block.cross_attn.proj.bias))
    if block.cross_attn.q_bias is not None:
        pairs += [(pool.q_bias, block.cross_attn.q_bias), (pool.v_bias, block.cross_attn.v_bias)]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.copy_(theirs)


# --- helpers ----------------------------------------------------------------------------------

def backbone_with(method: str) -> VisionTransformer:
    model = make_vit("plain")
    if method == "dyt":
        tieta.add_dyt(model, rho=0.5, adapter_dim=4, adapter_scale=0.1)  # DyT's video recipe: scale 0.1
        randomise_parameters(model, ("dispatcher", "adapter"))
        with torch.no_grad():  # some tokens on each side of the threshold
            for block in model.blocks:
                block.dispatcher.bias.zero_()
    elif method == "tome":
        tieta.add_tome(model, r=2)
    return model.eval()


def random_reference(qkv_bias: bool = True, seed: int = 1) -> RefVideoHead:
    torch.manual_seed(seed)
    ref = RefVideoHead(48, 3, 5, qkv_bias)
    with torch.no_grad():  # trained-looking values: every tensor random, the zero ones too
        for param in ref.parameters():
            param.normal_(0, 0.3)
    return ref.eval()


def clips(batch: int = CLIPS, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


# --- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["plain", "dyt", "tome"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_video_model_computes_the_reference_forward(method, qkv_bias):
    backbone = backbone_with(method)
    model = VideoModel(backbone, FRAMES, pool_qkv_bias=qkv_bias).eval()
    ref = random_reference(qkv_bias)
    copy_reference_head(model, ref)
    features = backbone.forward_features if method == "tome" else partial(ref_forward_features, backbone)
    x = clips()
    with torch.no_grad():
        expected = ref_video_forward(features, backbone.fc_norm, backbone.head_drop, ref, x.transpose(1, 2))
        got = model(x)
    assert got.shape == (CLIPS, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_token_of_every_frame_enters_the_pooling_the_class_tokens_included():
    seen = {}
    for method, tokens in (("plain", PATCHES + 1), ("dyt", PATCHES + 1), ("tome", PATCHES + 1 - 3 * 2)):
        model = VideoModel(backbone_with(method), FRAMES)
        model.head.pool.register_forward_hook(lambda module, args, out: seen.update(shape=tuple(args[0].shape)))
        with torch.no_grad():
            model.eval()(clips())
        assert seen["shape"] == (CLIPS, FRAMES * tokens, 48), method


def test_frames_are_independent_images_of_the_backbone():
    model = VideoModel(backbone_with("dyt"), FRAMES).eval()
    x = clips()
    with torch.no_grad():
        tokens = model.frame_tokens(x)  # (B, T, N, C)
        alone = model.backbone.forward_features(x[1, 2][None])
    torch.testing.assert_close(tokens[1, 2], alone[0])


def test_the_pooling_starts_as_dyt_s_code_builds_it():
    model = VideoModel(backbone_with("plain"), FRAMES)
    pool = model.head.pool
    assert pool.num_heads == 3 and torch.equal(pool.query, torch.zeros(1, 1, 48))
    assert torch.equal(pool.q_bias, torch.zeros(48)) and torch.equal(pool.v_bias, torch.zeros(48))
    assert pool.k.bias is None and not hasattr(pool, "k_bias")  # the key bias is zero, not a parameter
    assert pool.norm_q.eps == pool.norm_k.eps == pool.norm_v.eps == 1e-6
    assert isinstance(model.backbone.head, nn.Identity) and model.num_classes == 5


def test_bad_input_is_one_sentence():
    model = VideoModel(backbone_with("plain"), FRAMES)
    with pytest.raises(TietaError, match=r"clips shaped \(batch, frames, 3, height, width\)"):
        model(torch.zeros(2, 3, SIDE, SIDE))
    with pytest.raises(TietaError, match="heads must divide"):
        VideoModel(backbone_with("plain"), FRAMES, pool_heads=5)
    with pytest.raises(TietaError, match="one classifier"):
        VideoModel(make_vit("distilled"), FRAMES)
    with pytest.raises(TietaError, match="one clip"):
        frame_token_masks(VideoModel(backbone_with("dyt"), FRAMES), clips())
    with pytest.raises(TietaError, match="no token decisions to show"):
        frame_token_masks(VideoModel(backbone_with("tome"), FRAMES), clips()[0])


# --- training ---------------------------------------------------------------------------------

def test_the_pooling_trains_with_the_head_at_the_base_lr_and_the_backbone_keeps_its_methods_split():
    model = freeze_backbone(VideoModel(freeze_backbone(backbone_with("dyt")), FRAMES))
    groups = {name: parameter_group(name) for name, param in model.named_parameters() if param.requires_grad}
    assert all(groups[name] == "head" for name in groups if name.startswith("head."))
    assert {"head.pool.query", "head.pool.q.weight", "head.pool.norm_k.weight", "head.pool.v_bias",
            "head.fc.weight"} <= set(groups)
    assert {group for name, group in groups.items() if name.startswith("backbone.")} == {"dyt", "adapter"}
    assert not model.backbone.patch_embed.proj.weight.requires_grad
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, lr_groups={"adapter": 5e-4})
    query = model.head.pool.query
    group = next(group for group in optimizer.param_groups if any(p is query for p in group["params"]))
    assert group["method"] == "head" and group["base_lr"] == 1e-3


def test_dyt_objective_and_activation_rates_on_clips():
    model = VideoModel(backbone_with("dyt"), FRAMES).train()
    freeze_backbone(model)
    x, labels = clips(), torch.tensor([1, 3])
    outputs = dyt_forward(model, x)
    assert outputs.logits.shape == outputs.full_logits.shape == (CLIPS, 5) and outputs.rho == 0.5
    assert len(outputs.masks) == 3 and outputs.masks[0].shape == (CLIPS * FRAMES, PATCHES)
    dyt_loss(outputs, labels).backward()
    assert model.head.pool.query.grad.abs().sum() > 0
    assert model.backbone.blocks[1].dispatcher.weight.grad.abs().sum() > 0
    rates = tieta.activation_rates(model, x)
    assert len(rates) == 3 and all(0 <= rate <= 1 for rate in rates) and 0 < sum(rates) < 3
    assert model.training  # left as it was


def test_data_parallel_shards_draw_dyt_s_noise_as_one_process_with_every_clip():
    model = VideoModel(backbone_with("dyt"), FRAMES).train()
    for block in model.backbone.blocks:  # the adapters' dropout draws per row too, but from torch's own stream
        block.adapter.dropout = nn.Identity()
    x = clips(batch=4)
    torch.manual_seed(5)
    whole = dyt_forward(model, x).masks
    torch.manual_seed(5)
    with shard.sharded(shard.Shard(global_count=4, start=2, count=2, reduce=lambda tensor: None)):
        second = dyt_forward(model, x[2:]).masks  # this process holds clips 2 and 3
    assert all(torch.equal(part, full[2 * FRAMES:]) for part, full in zip(second, whole))


def test_frame_token_masks_are_each_frame_s_own_decisions():
    model = tieta.VideoModel(backbone_with("dyt"), frames=FRAMES)  # the public names
    clip = clips()[0]
    masks = tieta.frame_token_masks(model, clip)
    alone = evaluation_masks(model.backbone, clip)  # the frames as a batch of images
    assert len(masks) == 3 and all(mask.shape == (FRAMES, PATCHES) and mask.dtype == torch.bool for mask in masks)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(masks, alone))
    assert any(mask.any() and not mask.all() for mask in masks)  # the picture has something to show
    assert [float(m.float().mean()) for m in masks] == pytest.approx(tieta.activation_rates(model, clip[None]))


# --- cost -------------------------------------------------------------------------------------

class FrameFeatures(nn.Module):
    """The backbone's per-frame work alone: images to final tokens."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return self.backbone.forward_features(images)


def pooling_macs(tokens: int, width: int = 48, classes: int = 5) -> int:
    """Per clip: q and output projections (one query), k and v over every token, the query's
    attention (logits and weighted sum), the classifier."""
    return 2 * width * width + 2 * tokens * width * width + 2 * tokens * width + width * classes


@pytest.mark.parametrize("method, tokens", [("plain", PATCHES + 1), ("tome", PATCHES + 1 - 3 * 2)])
def test_flops_are_every_frame_s_backbone_plus_the_pooling_head(method, tokens):
    model = VideoModel(backbone_with(method), FRAMES)
    frame = tieta.count_flops(FrameFeatures(model.backbone), clips()[0, :1])["gmacs"] * 1e9
    video = tieta.count_flops(model, clips())["gmacs"] * 1e9
    assert video == pytest.approx(FRAMES * frame + pooling_macs(FRAMES * tokens), rel=1e-9)


def test_tome_makes_a_clip_cheaper_and_dyt_costs_what_its_frames_execute():
    plain = tieta.count_flops(VideoModel(backbone_with("plain"), FRAMES), clips())["gmacs"]
    merged = tieta.count_flops(VideoModel(backbone_with("tome"), FRAMES), clips())["gmacs"]
    assert merged < plain
    model = VideoModel(backbone_with("dyt"), FRAMES)
    x = clips(batch=1)
    frames = sum(tieta.count_flops(FrameFeatures(model.backbone), x[0, t:t + 1])["gmacs"] for t in range(FRAMES))
    got = tieta.count_flops(model, x)["gmacs"]
    assert got == pytest.approx(frames + pooling_macs(FRAMES * (PATCHES + 1)) / 1e9, rel=1e-9)
