r"""Trajectory matching (MTT, Cazenavette et al. 2022) with three ways to differentiate the unrolled student.

A student starts at an expert snapshot :math:`\theta_0 = \theta^*_t` and takes ``steps`` = N plain SGD steps on
minibatches :math:`x_{b_i}` of the synthetic set with the learnable learning rate :math:`\alpha`:

.. math::  \theta_{i+1} = \theta_i - \alpha\, g(\theta_i, x_{b_i}), \qquad g = \nabla_\theta \ell_{CE}

and the loss is :math:`L = \|\theta_N - \theta^*_{t+M}\|^2 / \|\theta^*_t - \theta^*_{t+M}\|^2`.

Gradient modes (``unroll``):

``bptt``
    Autograd through all N steps (MTT's reference implementation). Keeps N activation graphs: memory grows with N.
``first_order``
    TESLA's estimator (Cui et al. 2023): every :math:`\theta_i` is held fixed, i.e. the Hessian terms
    :math:`\alpha H_i` of the adjoint are dropped, so every step sees :math:`\lambda_N`. Constant activation memory,
    but **not** the gradient of :math:`L`. Kept for comparison.
``exact``
    The exact gradient with constant activation memory: a forward pass without a graph that keeps the parameter
    iterates, then a reverse (adjoint) walk

    .. math::  \lambda_N = \partial L / \partial\theta_N, \quad
               \lambda_i = (I - \alpha H_i)\,\lambda_{i+1}, \quad
               \partial L/\partial x_{b_i} \mathrel{+}= -\alpha\,(\partial g_i/\partial x)^\top \lambda_{i+1}, \quad
               \partial L/\partial\alpha \mathrel{+}= -\langle g_i, \lambda_{i+1}\rangle

    where one ``torch.autograd.grad(g_i, (theta_i, x_b), grad_outputs=lambda_{i+1})`` gives both the Hessian-vector
    product and the mixed second derivative. Only one step's graph is alive at a time.

Memory of ``exact``: the activation memory (graphs) is that of one step whatever N. What still grows with N is the
stored parameter iterates, N x |theta| numbers (for the CPU ConvNets here about 0.1-0.5 MB each). With
``checkpoint_every=k`` only every k-th iterate is stored and each segment is recomputed from it during the reverse
walk (N/k + k iterates kept, one extra step-gradient evaluation per step). SGD with a learned step cannot be reversed
exactly in floating point, so recomputation from checkpoints is the only way to drop the iterates.

All three modes share the minibatch schedule: it is drawn from ``generator`` before the unroll, so two modes run on
the same seed see the same batches (and the same augmentation parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastdistill.functional._checks import check_choice

UNROLL_MODES = ("bptt", "first_order", "exact")

# augment(x, seed) -> x': differentiable in x, deterministic given seed (the reverse walk recomputes each step)
Augment = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's parameters laid out in one flat vector (the order of the given mapping)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> ParamLayout:
        return cls(tuple(params), tuple(p.shape for p in params.values()), tuple(p.numel() for p in params.values()))

    def flatten(self, params: Mapping[str, torch.Tensor], what: str = "params") -> torch.Tensor:
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self.names]
        if missing or extra:
            raise ValueError(
                f"{what} has parameters {list(params)}; expected {list(self.names)} "
                f"(missing {missing}, unexpected {extra})"
            )
        for n, s in zip(self.names, self.shapes):
            if params[n].shape != s:
                raise ValueError(f"{what}[{n!r}] has shape {tuple(params[n].shape)}; expected {tuple(s)}")
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        # views of the flat vector: autograd w.r.t. the flat vector gives a flat gradient
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}


def draw_batches(
    num_images: int, steps: int, batch_size: int, generator: torch.Generator | None, augment: bool
) -> tuple[list[torch.Tensor], list[int]]:
    """Minibatch indices for every step (consecutive chunks of fresh permutations), one augmentation seed per step."""
    batches, perm, pos = [], None, num_images
    for _ in range(steps):
        if pos + batch_size > num_images:
            perm, pos = torch.randperm(num_images, generator=generator), 0
        batches.append(perm[pos : pos + batch_size])
        pos += batch_size
    seeds = torch.randint(0, 2**62, (steps,), generator=generator).tolist() if augment else [0] * steps
    return batches, seeds


def student_loss(
    model: torch.nn.Module, layout: ParamLayout, theta: torch.Tensor, x: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the model evaluated at the flat parameters ``theta`` (hard or soft labels)."""
    logits = functional_call(model, layout.unflatten(theta), (x,))
    return F.cross_entropy(logits, labels)


def matching_loss_and_grad(
    theta_n: torch.Tensor, start: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``||theta_n - target||^2 / ||start - target||^2`` and its gradient w.r.t. ``theta_n`` in one pass over the
    flat vectors (the gradient is ``2 (theta_n - target) / denom``; nothing else of size |theta| is kept)."""
    diff = theta_n - target
    denom = torch.dot(start - target, start - target)
    return torch.dot(diff, diff) / denom, diff.mul_(2.0 / denom)


def _check_inputs(model, start_params, target_params, images, labels, lr, steps, batch_size, unroll):
    check_choice("unroll", unroll, UNROLL_MODES)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in (("images", images), ("labels", labels), ("lr", lr)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if images.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"images has dtype {images.dtype}; expected torch.float32 or torch.float64")
    if lr.numel() != 1 or lr.dtype != images.dtype:
        raise ValueError(
            f"lr must be a scalar tensor of the images' dtype {images.dtype}; got shape "
            f"{tuple(lr.shape)} and dtype {lr.dtype}"
        )
    n = images.shape[0]
    if labels.is_floating_point():
        if labels.shape[0] != n or labels.dim() != 2:
            raise ValueError(f"labels (soft) has shape {tuple(labels.shape)}; expected ({n}, num_classes)")
    elif labels.shape != (n,):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({n},) class indices for {n} images")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; expected a positive int")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size!r}; expected an int in [1, {n}] (the number of images)")
    if not isinstance(start_params, Mapping) or not isinstance(target_params, Mapping):
        raise TypeError(
            "start_params and target_params must map parameter names to tensors (as dict(model.named_parameters()))"
        )


def match_trajectory(
    model: torch.nn.Module,
    start_params: Mapping[str, torch.Tensor],
    target_params: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    unroll: str = "exact",
    generator: torch.Generator | None = None,
    augment: Augment | None = None,
    checkpoint_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Trajectory-matching loss of a synthetic set and its gradients w.r.t. the images and the learning rate.

    Runs ``steps`` SGD steps of ``model`` (evaluated functionally at the given parameters) from ``start_params`` on
    minibatches of (``images``, ``labels``) with learning rate ``lr`` and returns
    :math:`L = \|\theta_N - \theta^*_{target}\|^2 / \|\theta^*_{start} - \theta^*_{target}\|^2` together with
    :math:`\partial L/\partial\,images` and :math:`\partial L/\partial\,lr` computed as ``unroll`` says (see the module
    docstring: ``exact`` and ``bptt`` give the same gradient, ``first_order`` is TESLA's approximation).

    Args:
        model: the network; only its structure is used (``torch.func.functional_call``), its parameters are not read.
        start_params: name -> tensor, the expert snapshot the student starts from (as ``model.named_parameters()``).
        target_params: name -> tensor, the expert snapshot M epochs later.
        images: synthetic images, float32 or float64. Not modified; its ``requires_grad`` is ignored.
        labels: class indices ``[n]`` (int) or soft labels ``[n, C]`` (images' dtype).
        lr: scalar tensor, the student learning rate :math:`\alpha`.
        steps: N, the number of student SGD steps.
        batch_size: synthetic images per student step (``<= n``).
        unroll: ``"exact"`` (default), ``"bptt"`` or ``"first_order"``.
        generator: draws the minibatches (and augmentation seeds) before the unroll; the same seed gives the same
            batches in every mode.
        augment: optional differentiable augmentation ``augment(x, seed)``, deterministic given ``seed``.
        checkpoint_every: ``exact`` / ``first_order`` only: keep every k-th parameter iterate and recompute the others
            during the reverse walk (less memory, one more step gradient per step). Default: keep all.

    Returns:
        ``(loss, grad_images, grad_lr)``, all detached: a scalar, a tensor like ``images``, a scalar like ``lr``.

    Shape:
        images ``[n, C, H, W]``, labels ``[n]`` or ``[n, classes]``, lr ``[]`` (or any one-element shape).

    Example:
        >>> model = ConvNet(1, 10, 8, width=8, depth=2)
        >>> start = {k: v.detach() for k, v in model.named_parameters()}
        >>> loss, g_img, g_lr = match_trajectory(model, start, target, images, labels, torch.tensor(0.01),
        ...                                      steps=20, batch_size=50, generator=torch.Generator().manual_seed(0))
    """
    _check_inputs(model, start_params, target_params, images, labels, lr, steps, batch_size, unroll)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every={checkpoint_every!r}; expected None or a positive int")
    layout = ParamLayout.of(start_params)
    dtype, device = images.dtype, images.device
    theta0 = layout.flatten(start_params, "start_params").to(device=device, dtype=dtype)
    target = layout.flatten(target_params, "target_params").to(device=device, dtype=dtype)
    images = images.detach()
    labels = labels.detach()
    lr = lr.detach().reshape(())
    batches, seeds = draw_batches(images.shape[0], steps, batch_size, generator, augment is not None)
    batches = [b.to(device) for b in batches]
    with torch.enable_grad():
        if unroll == "bptt":
            return _bptt(model, layout, theta0, target, images, labels, lr, batches, seeds, augment)
        return _adjoint(
            model,
            layout,
            theta0,
            target,
            images,
            labels,
            lr,
            batches,
            seeds,
            augment,
            exact=unroll == "exact",
            checkpoint_every=checkpoint_every or 1,
        )


def _inputs(images, batch, seed, augment):
    x = images[batch]
    return augment(x, seed) if augment is not None else x


def _bptt(model, layout, theta0, target, images, labels, lr, batches, seeds, augment):
    images = images.clone().requires_grad_(True)
    lr = lr.clone().requires_grad_(True)
    theta = theta0.clone().requires_grad_(True)
    for batch, seed in zip(batches, seeds):
        loss = student_loss(model, layout, theta, _inputs(images, batch, seed, augment), labels[batch])
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * g
    diff = theta - target
    loss = torch.dot(diff, diff) / torch.dot(theta0 - target, theta0 - target)
    grad_images, grad_lr = torch.autograd.grad(loss, (images, lr))
    return loss.detach(), grad_images, grad_lr


def _step_grad(model, layout, theta, x, y):
    theta = theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(student_loss(model, layout, theta, x, y), theta)
    return g


def _adjoint(model, layout, theta0, target, images, labels, lr, batches, seeds, augment, *, exact, checkpoint_every):
    steps, k, alpha = len(batches), checkpoint_every, lr.item()

    def advance(theta, i):  # one SGD step without a graph: the fused flat update theta - alpha * g
        g = _step_grad(model, layout, theta, _inputs(images, batches[i], seeds[i], augment), labels[batches[i]])
        return torch.add(theta, g, alpha=-alpha)

    # forward: keep theta_i for i % k == 0 (k = 1: every iterate)
    saved, theta = {}, theta0
    for i in range(steps):
        if i % k == 0:
            saved[i] = theta
        theta = advance(theta, i)
    loss, lam = matching_loss_and_grad(theta, theta0, target)
    del theta

    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros((), dtype=lr.dtype, device=lr.device)
    segment: dict[int, torch.Tensor] = {}
    for i in reversed(range(steps)):
        if i not in segment:  # recompute the iterates of this segment from its checkpoint
            s = (i // k) * k
            segment = {s: saved.pop(s)}
            for j in range(s, i):
                segment[j + 1] = advance(segment[j], j)
        theta_i = segment.pop(i).requires_grad_(True)
        x_b = images[batches[i]].requires_grad_(True)
        x = augment(x_b, seeds[i]) if augment is not None else x_b
        (g,) = torch.autograd.grad(
            student_loss(model, layout, theta_i, x, labels[batches[i]]), theta_i, create_graph=True
        )
        if exact:  # H_i lambda and (dg/dx)^T lambda from one double-backward
            hvp, gx = torch.autograd.grad(g, (theta_i, x_b), grad_outputs=lam)
        else:  # TESLA: theta_i held fixed, the Hessian term is dropped
            (gx,) = torch.autograd.grad(g, x_b, grad_outputs=lam)
        grad_lr -= torch.dot(g.detach(), lam)
        grad_images.index_add_(0, batches[i], gx, alpha=-alpha)
        if exact:
            lam = torch.add(lam, hvp, alpha=-alpha)
        del g, gx, x, x_b, theta_i
    return loss, grad_images, grad_lr
