import pytest
import torch

from kernels.dispatch import select_kernels
from kernels.sparse_inference import compress, sparse_linear
from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import project_, sparse_tensors


@pytest.mark.parametrize("bias", [True, False])
def test_csr_forward_and_input_gradient_match_dense(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 64, requires_grad=True)
    w, mask = torch.randn(48, 64), torch.rand(48, 64) < 1 / 16
    b = torch.randn(48) if bias else None
    y = sparse_linear(x, compress(w, mask), b)
    ref = torch.nn.functional.linear(x, w * mask, b)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)


def test_compressed_model_gives_the_same_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=64, num_layers=2, context_length=16), 80)
    project_(sparse_tensors(model, SparsityConfig()), 1 / 16, 1 / 16, floor=4)
    x = torch.randint(0, 80, (2, 12))
    dense = model(x)
    model.compress_()
    torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=1e-5)
    model.decompress_()
    torch.testing.assert_close(model(x), dense)


def test_dispatch_choices():
    assert select_kernels("cpu").name == "cpu"
    assert select_kernels("cpu", "reference").name == "reference"
    with pytest.raises(ValueError, match="CUDA"):
        select_kernels("cpu", "triton")
