"""MedicalNet ResNet-18 3D (shortcut A, ViSD-Boost's strides and dilations) against a PyTorch model of the same
architecture on random weights: stage maps at evaluation (running statistics) and in training (batch
statistics, running statistics updated as torch does), and the detached-shortcut gradient of the original."""
import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medjax.convert.visd import resnet3d_from_torch
from medjax.nn.resnet3d import ResNet3D


class TorchBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride, dilation, detach):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.bn1 = torch.nn.BatchNorm3d(cout)
        self.conv2 = torch.nn.Conv3d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = torch.nn.BatchNorm3d(cout)
        self.cout, self.stride, self.detach = cout, stride, detach

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        residual = x
        if self.stride != 1 or x.shape[1] != self.cout:  # type A: subsample, zero channels (MedicalNet)
            residual = F.avg_pool3d(x, kernel_size=1, stride=self.stride)
            if self.detach:
                residual = residual.detach()
            zeros = residual.new_zeros((residual.shape[0], self.cout - residual.shape[1]) + residual.shape[2:])
            residual = torch.cat([residual, zeros], 1)
        return F.relu(out + residual)


class TorchResNet(torch.nn.Module):
    def __init__(self, width, detach, blocks=2):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(1, width, 7, (1, 2, 2), 3, bias=False)
        self.bn1 = torch.nn.BatchNorm3d(width)
        cin = width
        for i, (stride, dilation) in enumerate(zip((1, 2, 2, 2), (1, 1, 2, 4))):
            cout = width * 2 ** i
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(*[
                TorchBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, dilation, detach) for j in range(blocks)]))
            cin = cout

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out.append(x)
        return out


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    net = TorchResNet(4, detach=True)
    with torch.no_grad():  # non-trivial BN affine and running statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    return net, resnet3d_from_torch(state)


def _ours(variables, x, train, detach=True, depth=18):
    model = ResNet3D(depth=depth, width=4, shortcut_type="A", detach_shortcut=detach)
    if train:
        return model.apply(variables, x, train=True, mutable=["batch_stats"])
    return model.apply(variables, x), None


def test_stage_maps_equal_torch_in_eval_and_train(pair):
    net, variables = pair
    x = np.random.default_rng(0).normal(size=(2, 1, 16, 32, 64)).astype(np.float32)
    net.eval()
    with torch.no_grad():
        want = [t.numpy() for t in net(torch.from_numpy(x))]
    got, _ = jax.jit(lambda v, a: _ours(v, a, train=False))(variables, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    assert [g.shape for g in got] == [(2, 8, 8, 16, 4), (2, 4, 4, 8, 8), (2, 2, 2, 4, 16), (2, 1, 1, 2, 32)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w.transpose(0, 2, 3, 4, 1), rtol=1e-4, atol=1e-4)
    net = copy.deepcopy(net).train()  # the module's running statistics move; keep the fixture's
    with torch.no_grad():
        want = [t.numpy() for t in net(torch.from_numpy(x))]
    got, updated = jax.jit(lambda v, a: _ours(v, a, train=True))(variables, jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w.transpose(0, 2, 3, 4, 1), rtol=1e-3, atol=1e-3)
    stats = nn.unbox(updated["batch_stats"])
    np.testing.assert_allclose(np.asarray(stats["layer3_0"]["bn1"]["var"]), net.layer3[0].bn1.running_var.numpy(),
                               rtol=1e-4)
    np.testing.assert_allclose(np.asarray(stats["bn1"]["mean"]), net.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_input_gradient_with_and_without_the_detached_shortcut(detach):
    """ResNet-10 (one block per layer: the same shortcuts, half the compile time)."""
    torch.manual_seed(1)
    net = TorchResNet(4, detach=detach, blocks=1).eval()
    variables = resnet3d_from_torch({k: v.numpy() for k, v in net.state_dict().items()})
    x = np.random.default_rng(1).normal(size=(1, 1, 16, 32, 32)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    sum(t.square().sum() for t in net(xt)).backward()
    energy = lambda v: sum(jnp.sum(jnp.square(t)) for t in _ours(variables, v, False, detach, depth=10)[0])  # noqa: E731
    grad = jax.jit(jax.grad(energy))(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 4, 1), rtol=1e-3, atol=1e-4)
