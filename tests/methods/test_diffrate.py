"""DiffRate as a tieta method, on the small conftest ViTs (16 patches, depth 3) and a ViT-B-shaped one."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tieta
from tieta.errors import TietaError
from tieta.methods.blocks import TokenState, keep_output
from tieta.methods.diffrate import (METHOD, PUBLISHED_RATES, SIZE_EPS, DiffRateConfig, DiffRateReduce, add_diffrate,
                                    diffrate_steps, kept_numbers, masked_class_attention, mlp_token_counts,
                                    published_counts, search_gmacs, search_rates)
from tieta.methods.schedules import ViTShape
from tieta.ops.attention import softmax_with_policy
from tests.conftest import make_vit

PATCHES = 16


def criterion_for(variant: str) -> str:
    return "received" if variant == "avg_pool" else "class"


def schedule_for(model: nn.Module) -> tuple[list[int], list[int]]:
    """A fixed schedule that prunes and merges in blocks 1 and 2, whatever the prefix."""
    p = model.num_prefix_tokens
    return [PATCHES + p, p + 12, p + 5], [PATCHES + p, p + 9, p + 7]


def mlp_inputs(model: nn.Module, images: torch.Tensor) -> list[int]:
    """Tokens entering each block's MLP in one forward pass."""
    counts = []
    hooks = [block.mlp.register_forward_hook(lambda m, args, out: counts.append(args[0].shape[1]))
             for block in model.blocks]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def peak(rate, kept: int) -> None:
    """Point a RateLogits at the candidate that keeps ``kept`` tokens (softmax ~ one-hot)."""
    index = int((rate.candidates == kept - rate.num_prefix).nonzero())
    with torch.no_grad():
        rate.logits.zero_()
        rate.logits[index] = 60.0


# --- fixed rates ----------------------------------------------------------------------------------


def test_keeping_every_token_equals_unpatched_timm(vit_variant):
    model = make_vit(vit_variant)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    tokens = PATCHES + model.num_prefix_tokens
    add_diffrate(model, [tokens] * 3, [tokens] * 3, criterion=criterion_for(vit_variant))
    # sorting only permutes the tokens, and sizes stay 1 (log 1 = 0)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_mlp_token_counts_follow_the_fixed_schedule(vit_variant):
    model = make_vit(vit_variant)
    add_diffrate(model, *schedule_for(model), criterion=criterion_for(vit_variant))
    p = model.num_prefix_tokens
    expected = [PATCHES + p, p + 9, p + 5]  # min(N, k_p, k_m), block by block
    x = torch.randn(2, 3, 32, 32)
    assert mlp_inputs(model, x) == expected
    assert mlp_token_counts(model) == expected
    assert model.forward_features(x).shape[1] == p + 5
    assert model.token_state.size.shape == (2, p + 5, 1)


def slow_block(block: nn.Module, x: torch.Tensor, size: torch.Tensor, kept_prune: int, kept_merge: int,
               num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiffRate block written out: unfused attention with log-size bias, class-attention sort,
    prune, then each source merged into its most similar kept token, image by image.

    Args: x (B, N, D), size (B, N, 1). Returns (x', size') after the block's MLP.
    """
    batch, tokens, width = x.shape
    attn = block.attn
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log().reshape(batch, 1, 1, tokens)
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.ls1(attn.proj(out))
    importance = probs[:, :, 0, num_prefix:].mean(dim=1)
    merged_x, merged_size = [], []
    for b in range(batch):
        ranked = sorted(range(tokens - num_prefix), key=lambda i: -float(importance[b, i]))
        order = list(range(num_prefix)) + [num_prefix + i for i in ranked]
        xs, sizes = x[b, order][:kept_prune], size[b, order, 0][:kept_prune]
        metric = xs / xs.norm(dim=-1, keepdim=True)
        members = {j: [xs[j]] for j in range(kept_merge)}
        totals = {j: sizes[j] for j in range(kept_merge)}
        for i in range(kept_merge, xs.shape[0]):
            similarity, j = max((float(metric[i] @ metric[j]), j) for j in range(num_prefix, kept_merge))
            members[j].append(xs[i])
            totals[j] = totals[j] + similarity * sizes[i]
        merged_x.append(torch.stack([torch.stack(members[j]).mean(dim=0) for j in range(kept_merge)]))
        merged_size.append(torch.stack([totals[j] for j in range(kept_merge)]).clamp(min=SIZE_EPS))
    x, size = torch.stack(merged_x), torch.stack(merged_size)[..., None]
    return x + block.ls2(block.mlp(block.norm2(x))), size


@pytest.mark.parametrize("variant", ["plain", "layerscale", "qk_norm", "registers", "distilled"])
def test_block_matches_a_slow_transcription(variant):
    model = make_vit(variant)
    p = model.num_prefix_tokens
    kept_prune, kept_merge = [PATCHES + p, p + 12, p + 8], [PATCHES + p, p + 9, p + 5]
    add_diffrate(model, kept_prune, kept_merge)
    # block 1 merged, so block 2 runs with sizes and the log-size bias, and prunes and merges itself
    block = model.blocks[2]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], size=model.token_state.size.clone()))
    block.register_forward_hook(lambda m, args, out: seen.update(out=out, out_size=model.token_state.size))
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
        expected, expected_size = slow_block(block, seen["x"], seen["size"], kept_prune[2], kept_merge[2],
                                             model.num_prefix_tokens)
    assert not torch.all(seen["size"] == 1)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["out_size"], expected_size, rtol=1e-5, atol=1e-5)


def test_evaluation_sizes_are_clamped_before_the_log():
    # one prefix token, two kept tokens, and a source pointing away from both with size 3:
    # its similarity-scaled size drives its destination's size below 0
    step = DiffRateReduce(kept_prune=4, kept_merge=3).eval()
    attn = SimpleNamespace(q_norm=nn.Identity(), k_norm=nn.Identity(), scale=1.0)
    keep_output(attn.q_norm)
    keep_output(attn.k_norm)
    attn.q_norm.__dict__["tieta_output"] = torch.ones(1, 1, 4, 1)
    attn.k_norm.__dict__["tieta_output"] = torch.tensor([0.0, 3.0, 2.0, 1.0]).reshape(1, 1, 4, 1)  # keeps the order
    state = TokenState(size=torch.tensor([1.0, 1.0, 1.0, 3.0]).reshape(1, 4, 1))
    block = SimpleNamespace(attn=attn, token_state=state, num_prefix_tokens=1, training=False)
    x = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    out = step(x, block)
    assert out.shape == (1, 3, 2)
    assert float(state.size.min()) == pytest.approx(SIZE_EPS)
    assert torch.isfinite(state.attn_bias).all()


def test_flops_drop_with_the_kept_numbers():
    x = torch.randn(1, 3, 32, 32)
    schedules = [([17, 17, 17], [17, 17, 17]), ([17, 13, 9], [17, 11, 7]), ([17, 9, 5], [17, 7, 3])]
    costs = []
    for kept_prune, kept_merge in schedules:
        model = add_diffrate(make_vit("plain"), kept_prune, kept_merge)
        costs.append(tieta.count_flops(model, x)["gmacs"])
    assert costs[0] > costs[1] > costs[2]


def test_published_vit_b_schedule_gives_its_mlp_token_counts():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=48, depth=12, num_heads=3).eval()
    add_diffrate(model, "vit_b_deit_11.5")
    expected = [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3]
    assert mlp_inputs(model, torch.randn(1, 3, 224, 224)) == expected
    assert mlp_token_counts(model) == expected
    assert kept_numbers(model) == tuple(list(counts) for counts in PUBLISHED_RATES["vit_b_deit_11.5"])


def test_published_schedule_keeps_the_same_patches_beside_more_prefix_tokens():
    shape = ViTShape(depth=12, width=48, hidden=192, heads=3, patches=196, prefix=2, patch_macs=0, head_macs=0)
    prune, merge = published_counts(shape, "vit_b_deit_8.7")
    assert prune == [k + 1 for k in PUBLISHED_RATES["vit_b_deit_8.7"][0]]
    assert merge == [k + 1 for k in PUBLISHED_RATES["vit_b_deit_8.7"][1]]


@pytest.mark.parametrize("kwargs", [
    dict(kept_prune="vit_b_deit_8.7"),  # 12 blocks, 196 patches
    dict(kept_prune="no_such_schedule"),
    dict(kept_prune=[17, 12]),  # one number short
    dict(kept_prune=[16, 12, 8]),  # block 0 would compress
    dict(kept_merge=[17, 12, 1]),  # nothing but the class token
    dict(kept_prune=[17, 12, 8], target_gmacs=1e-3),
    dict(criterion="keys"),
])
def test_bad_settings_are_refused_before_anything_changes(kwargs):
    model = make_vit("plain")
    with pytest.raises(TietaError):
        add_diffrate(model, **kwargs)
    assert getattr(model, "tieta_reduction", None) is None
    assert type(model.blocks[0]).__name__ == "Block"


def test_a_model_ready_for_search_gathers_tokens_in_evaluation_mode(vit_variant):
    model = add_diffrate(make_vit(vit_variant), criterion=criterion_for(vit_variant))  # attached to an eval model
    counts = mlp_token_counts(model)
    assert counts[1] < counts[0]  # the uniform logits' numbers
    assert mlp_inputs(model, torch.randn(2, 3, 32, 32)) == counts
    assert model.token_state.policy is None


def test_a_model_without_class_token_needs_the_labelled_criterion():
    model = make_vit("avg_pool")
    with pytest.raises(TietaError, match="received"):
        add_diffrate(model)
    add_diffrate(model, criterion="received")
    # the head pools every token, so the last block does not compress in a search (the MAE rule)
    assert [len(step.prune_rate.candidates) for step in diffrate_steps(model)] == [1, 4, 1]


def test_a_second_token_reduction_method_is_refused():
    model = tieta.add_tome(make_vit("plain"), r=2)
    with pytest.raises(TietaError):
        add_diffrate(model)


# --- search ---------------------------------------------------------------------------------------


def batches(count: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 5, (size,), generator=generator))
            for _ in range(count)]


def is_rate(name: str) -> bool:
    return ".prune_rate." in name or ".merge_rate." in name


def test_a_search_step_changes_only_the_rate_logits(vit_variant):
    model = tieta.add_lora(make_vit(vit_variant))
    add_diffrate(model, criterion=criterion_for(vit_variant))
    last_fixed = vit_variant == "avg_pool"  # a pooled head: the last block keeps its tokens
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained LoRA, so that a change to lora_A would show
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    search_rates(model, batches(1), target_gmacs=1e-4, epochs=1)
    after = model.state_dict()
    for name, tensor in before.items():
        fixed = name.startswith("blocks.0.") or (last_fixed and name.startswith("blocks.2."))
        if is_rate(name) and name.endswith("logits") and not fixed:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert all(param.grad is None for param in model.parameters())
    assert not model.training  # left in the mode it had


def test_flops_term_reaches_the_compressible_blocks_only():
    model = add_diffrate(make_vit("plain"))
    loss = 5.0 * (search_gmacs(model) - 1e-4) ** 2
    loss.backward()
    for index, step in enumerate(diffrate_steps(model)):
        for rate in (step.prune_rate, step.merge_rate):
            grad = float(rate.logits.grad.abs().sum())
            assert (grad == 0.0) if index == 0 else (grad > 0.0)


def test_cross_entropy_reaches_the_rate_logits_through_the_masks():
    # no FLOPs term: the gradient comes through the straight-through masks in block 2's masked attention
    model = add_diffrate(make_vit("plain")).train()
    images, labels = batches(1)[0]
    F.cross_entropy(model(images), labels).backward()
    assert float(diffrate_steps(model)[1].prune_rate.logits.grad.abs().sum()) > 0


def test_search_towards_a_low_target_lowers_the_kept_numbers():
    model = add_diffrate(make_vit("plain"))
    start_prune, start_merge = kept_numbers(model)
    start_gmacs = float(search_gmacs(model).detach())
    kept_prune, kept_merge = search_rates(model, batches(4), target_gmacs=1e-4, epochs=3, lr=0.2, min_lr=0.02,
                                          flops_weight=1e8)
    assert float(search_gmacs(model)) < start_gmacs
    assert kept_prune[0] == kept_merge[0] == 17  # block 0 never compresses
    assert all(k < 17 for k in kept_prune[1:] + kept_merge[1:])
    assert all(a <= b for a, b in zip(kept_prune + kept_merge, start_prune + start_merge))
    assert kept_prune + kept_merge != start_prune + start_merge
    # the numbers are fixed: training now gathers tokens, evaluation follows them
    assert not any(step.searching for step in diffrate_steps(model))
    assert mlp_inputs(model, torch.randn(1, 3, 32, 32)) == mlp_token_counts(model)


def test_masked_class_row_equals_row_0_of_the_masked_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    bias = torch.rand(2, 1, 1, 9).log()
    policy = torch.tensor([[1, 1, 0, 1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 1, 1, 0, 1, 0]], dtype=torch.float32)
    full = softmax_with_policy((q * 0.5) @ k.transpose(-2, -1) + bias, policy)
    expected = full[:, :, 0, 2:].mean(dim=1)
    torch.testing.assert_close(masked_class_attention(q, k, 0.5, 2, policy, bias), expected)


def test_search_forward_matches_the_gathered_forward_at_the_same_numbers():
    # with proportional attention off, masking in training and gathering at evaluation compute the
    # same up to the masked softmax's eps: a check of the whole masked path
    model = add_diffrate(make_vit("plain"), prop_attn=False)
    steps = diffrate_steps(model)
    for step, (kept_prune, kept_merge) in zip(steps[1:], [(13, 9), (9, 5)]):
        peak(step.prune_rate, kept_prune)
        peak(step.merge_rate, kept_merge)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    searched = model(x)
    assert mlp_inputs(model, x) == [17, 17, 17]  # tokens stay in the tensor, the policy masks them
    assert model.token_state.policy.sum(dim=1).tolist() == [5.0] * 3
    model.eval()
    assert mlp_inputs(model, x) == [17, 9, 5]
    torch.testing.assert_close(searched, model(x), rtol=1e-4, atol=1e-4)


# --- composition and training ---------------------------------------------------------------------


@pytest.mark.parametrize("lora_first", [True, False])
def test_composes_with_lora_and_trains_with_fixed_rates(lora_first):
    model = make_vit("plain")
    if lora_first:
        tieta.add_lora(model)
    add_diffrate(model, [17, 12, 8], [17, 10, 6])
    if not lora_first:
        tieta.add_lora(model)
    model.train()
    x, y = batches(1)[0]
    assert mlp_inputs(model, x) == [17, 10, 6]
    F.cross_entropy(model(x), y).backward()
    grads = [param.grad for name, param in model.named_parameters() if "lora_B" in name]
    assert grads and all(grad is not None and float(grad.abs().sum()) > 0 for grad in grads)


def config(methods=("diffrate", "lora"), epochs=5, **settings):
    """The parts of a RunConfig that DiffRate reads."""
    return SimpleNamespace(diffrate=DiffRateConfig(**settings), methods=list(methods),
                           optim=SimpleNamespace(epochs=epochs))


@pytest.mark.parametrize("settings", [
    dict(),  # neither kept numbers nor a target
    dict(rates="vit_b_deit_9.9"),
    dict(rates="vit_b_deit_8.7", kept_prune=[197] * 12),
    dict(kept_prune=[17, 12, 8], target_gmacs=1.0),
    dict(kept_merge=[17, 12.5, 8]),
    dict(target_gmacs=1.0, search_epochs=5),  # no epoch left to fine-tune
    dict(target_gmacs=1.0, search_min_lr=0.1),
])
def test_validate_refuses_settings_that_cannot_work(settings):
    with pytest.raises(TietaError):
        METHOD.validate(config(**settings))


def test_validate_accepts_defaults_when_diffrate_is_not_used_and_working_settings():
    METHOD.validate(config(methods=("lora",)))
    METHOD.validate(config(rates="vit_b_deit_8.7"))
    fixed, search = config(kept_prune=[17, 12, 8]), config(target_gmacs=8.77, search_epochs=3)
    for settings in (fixed, search):
        METHOD.validate(settings)
    # what was accepted attaches as it says: the numbers given (merging keeps every token), or logits to search
    assert kept_numbers(METHOD.attach(make_vit("plain"), fixed)) == ([17, 12, 8], [17, 17, 17])
    searchable = METHOD.attach(make_vit("plain"), search)
    assert all(step.prune_rate is not None and step.kept_prune is None for step in diffrate_steps(searchable))


def test_attach_and_describe_from_a_config():
    model = METHOD.attach(make_vit("plain"), config(kept_prune=[17, 12, 8], kept_merge=[17, 10, 6]))
    facts = METHOD.describe(model)
    assert facts == {"diffrate_kept_prune": [17, 12, 8], "diffrate_kept_merge": [17, 10, 6],
                     "mlp_token_counts": [17, 10, 6]}
    assert METHOD.modules == ("prune_rate", "merge_rate")
    names = [name for name, _ in METHOD.attach(make_vit("plain"), config(target_gmacs=1e-4)).named_parameters()]
    assert "blocks.1.reduce.prune_rate.logits" in names and "blocks.1.reduce.merge_rate.logits" in names


def test_training_run_searches_first_then_fine_tunes_with_fixed_numbers():
    settings = config(target_gmacs=1e-4, search_epochs=2, search_lr=0.2, search_min_lr=0.02, flops_weight=1e8)
    model = METHOD.attach(tieta.add_lora(make_vit("plain")), settings)
    objective = METHOD.objective(settings)
    model.train()
    data = batches(3)

    # search epochs: the objective steps the rate logits itself; the loop's backward changes nothing
    for epoch in range(2):
        assert METHOD.epoch_update(model, settings, epoch, 5)["diffrate_phase"] == "search"
        for images, labels in data:
            lora = {n: p.clone() for n, p in model.named_parameters() if "lora" in n or n.startswith("head")}
            loss = objective(model, images, labels)
            loss.backward()
            assert loss.grad_fn is None
            assert all(torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)
            assert all(p.grad is None for n, p in model.named_parameters() if not is_rate(n))

    update = METHOD.epoch_update(model, settings, 2, 5)
    assert update["diffrate_phase"] == "fixed"
    assert (update["diffrate_kept_prune"], update["diffrate_kept_merge"]) == kept_numbers(model)
    assert any(k < 11 for k in update["diffrate_kept_prune"] + update["diffrate_kept_merge"])  # moved off 11
    assert METHOD.epoch_update(model, settings, 3, 5) == {}

    # fine-tuning epochs: plain cross-entropy on the gathered tokens, gradients reach LoRA
    images, labels = data[0]
    objective(model, images, labels).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)

    # a model rebuilt from the config and the saved rate logits gathers the same tokens
    rebuilt = METHOD.attach(tieta.add_lora(make_vit("plain")), settings).eval()
    rates = {n: p for n, p in model.named_parameters() if is_rate(n)}
    with torch.no_grad():
        for name, param in rebuilt.named_parameters():
            if name in rates:
                param.copy_(rates[name])
    assert kept_numbers(rebuilt) == kept_numbers(model)
    model.eval()
    assert mlp_inputs(rebuilt, images) == mlp_inputs(model, images) == mlp_token_counts(model)
