import pytest
import torch
from torch import nn

from tieta.errors import TietaError

from tieta.measure.peak_memory import tensor_bytes, training_step_peak_bytes

WIDTH, DEPTH, FLOAT = 128, 4, 4  # a chain of Linear(128, 128), float32
# batches whose activations outweigh the weights (at a batch of 16 the AdamW step's temporaries make the peak)


def _chain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def _squared_output(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(inputs).pow(2).mean()


def _peak(model: nn.Module, batch: int) -> int:
    inputs = torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(1))
    return training_step_peak_bytes(model, inputs, torch.zeros(batch, dtype=torch.long), _squared_output)


def _kept_for_backward(batch: int) -> int:
    """Each Linear keeps its input, the square its own: DEPTH new (batch, WIDTH) activations."""
    return DEPTH * batch * WIDTH * FLOAT


def test_the_peak_holds_the_weights_their_gradients_adamw_moments_and_the_activations_kept_for_backward():
    model = _chain()
    weights = sum(p.numel() for p in model.parameters()) * FLOAT
    batch = 256
    peak = _peak(model, batch)
    assert peak >= 4 * weights + batch * WIDTH * FLOAT + _kept_for_backward(batch)  # + the inputs
    # tensor bytes, not the process's memory: the rest is the backward pass's few temporaries
    assert peak <= 4 * weights + 4 * (DEPTH + 2) * batch * WIDTH * FLOAT


def test_the_peak_grows_with_the_batch_by_at_least_the_activations_it_adds():
    model = _chain()
    small, large = _peak(model, 256), _peak(model, 1024)
    assert large - small >= _kept_for_backward(1024 - 256)


def test_frozen_parameters_have_no_gradients_or_moments():
    model = _chain()
    trained = _peak(model, 32)
    model[0].requires_grad_(False)
    first_layer = sum(p.numel() for p in model[0].parameters()) * FLOAT
    assert trained - _peak(model, 32) >= 3 * first_layer  # its gradient and two AdamW moments


def test_the_model_is_left_unchanged():
    model = _chain().eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    _peak(model, 16)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_the_same_step_measures_the_same_peak():
    model = _chain()
    assert _peak(model, 32) == _peak(model, 32)


def test_tensor_bytes_counts_a_shared_storage_once():
    weight = torch.zeros(10, 10)
    assert tensor_bytes([weight, weight[:5], weight.t(), None]) == 10 * 10 * FLOAT
    assert tensor_bytes([weight, torch.zeros(3, dtype=torch.float64)]) == 10 * 10 * FLOAT + 3 * 8


def test_lora_on_a_frozen_vit_peaks_below_full_fine_tuning():  # no backbone gradients or moments
    import tieta
    from tests.conftest import make_vit

    images, labels = torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    lora = tieta.freeze_backbone(tieta.add_lora(make_vit("plain"), rank=2))
    assert training_step_peak_bytes(lora, images, labels) < training_step_peak_bytes(make_vit("plain"), images, labels)


def test_a_device_other_than_the_cpu_or_cuda_is_refused_in_one_sentence():
    with pytest.raises(TietaError, match="measured on the CPU or CUDA, not on meta"):
        training_step_peak_bytes(_chain(), torch.zeros(2, WIDTH, device="meta"), torch.zeros(2, dtype=torch.long))
