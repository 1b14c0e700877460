"""The LM head and its cross-entropy as one op, a chunk of rows at a time: never all [tokens, vocab] logits.

    linear_cross_entropy(hidden, weight, targets, weights) = sum_i weights_i * CE(hidden_i @ weight.T, targets_i)

The logits are made, used and dropped a chunk of rows at a time. In training the gradients are computed
in the same pass, so no logits are kept for backward: with a 128K vocabulary that saves gigabytes, and
even at 8K it is faster on a CPU because each chunk stays in cache.

It is a `torch.library` custom op with its own autograd formula and a fake (shapes-only) version, so
torch.compile puts one call to it in the graph, without a graph break, and never traces the loop inside.
An autograd.Function that computed the same gradients was traced by torch 2.11 into zeros
(docs/benchmarks.md); an op whose inside is opaque to the compiler cannot be.

Under autocast the op is told the dtype to multiply in, as autocast would cast a matmul, and runs with
autocast off; the logits and the loss are float32, the weight's gradient is summed over the chunks in
float32, and the gradients come back in the inputs' own dtypes.

On a GPU the arithmetic between the two matmuls of a chunk (float32 logits, logsumexp, softmax minus
the one-hot target, the weights, the cast back) would be about ten passes over [rows, vocab] tensors
run one by one, several milliseconds a step at a 32K vocabulary: there it runs as one torch.compile'd
function, which fuses them into a reduction and a pointwise kernel. On a CPU, where compiling costs
more than it saves, the same arithmetic runs eagerly, in place.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """sum_i weights_i * CE(hidden_i @ weight.T, targets_i); hidden [N, H], weight [V, H], targets and
    weights [N] (every target a valid row of weight: the caller masks the uncounted ones to 0)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _loss_and_gradients(hidden, weight, targets, weights, dtype)[0]
    return _loss(hidden, weight, targets, weights, dtype)


@torch.library.custom_op("llama::linear_cross_entropy", mutates_args=())
def _loss(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    return _chunked(hidden, weight, targets, weights, dtype, with_gradients=False)[0]


@torch.library.custom_op("llama::linear_cross_entropy_with_gradients", mutates_args=())
def _loss_and_gradients(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The loss, and its gradients with respect to hidden and weight, which backward scales."""
    return _chunked(hidden, weight, targets, weights, dtype, with_gradients=True)


@_loss.register_fake
def _(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    return hidden.new_empty((), dtype=torch.float32)


@_loss_and_gradients.register_fake
def _(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor,
      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight)


def _save_gradients(ctx, inputs, output) -> None:
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)


def _backward(ctx, grad_loss: Tensor, _unused_hidden: Tensor, _unused_weight: Tensor):
    grad_hidden, grad_weight = ctx.saved_tensors
    return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
            None, None, None)


_loss_and_gradients.register_autograd(_backward, setup_context=_save_gradients)


def _chunked(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, dtype: torch.dtype,
             with_gradients: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # about 16 MB of float32 logits per chunk on a CPU, where each chunk should stay in cache; 256 MB on a
    # GPU, where small chunks would leave it waiting on kernel launches
    chunk = max(128, (2**26 if hidden.is_cuda else 2**22) // weight.shape[0])
    head = weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_gradients else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_gradients else None
    gradient_of_logits = _fused_logit_gradient() if _fuses(hidden) else _logit_gradient
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            t, w = targets[start:start + chunk], weights[start:start + chunk]
            logits = h @ head.T
            if not with_gradients:
                loss += _logit_loss(logits.float(), t, w)[0]
                continue
            chunk_loss, grad_logits = gradient_of_logits(logits, t, w)
            loss += chunk_loss
            grad_hidden[start:start + chunk] = grad_logits @ head
            grad_weight += grad_logits.T @ h
    if with_gradients:
        return loss, grad_hidden, grad_weight.to(weight.dtype)
    return loss, None, None


def _logit_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """sum_i weights_i * CE(logits_i, targets_i) of float32 logits, and each row's logsumexp."""
    logsumexp = logits.logsumexp(dim=-1)
    return ((logsumexp - logits.gather(1, targets[:, None]).squeeze(1)) * weights).sum(), logsumexp


def _logit_gradient(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The chunk's loss and d loss / d logits = weights * (softmax - onehot(target)), in the logits' dtype;
    in place, for eager execution."""
    full = logits.float()
    loss, logsumexp = _logit_loss(full, targets, weights)
    grad = full.sub_(logsumexp[:, None]).exp_()
    grad[torch.arange(len(targets), device=targets.device), targets] -= 1
    return loss, (grad * weights[:, None]).to(logits.dtype)


def _logit_gradient_to_fuse(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """_logit_gradient without in-place writes, as torch.compile fuses it best: the one-hot is a comparison."""
    full = logits.float()
    loss, logsumexp = _logit_loss(full, targets, weights)
    target = torch.arange(full.shape[1], device=full.device) == targets[:, None]
    grad = ((full - logsumexp[:, None]).exp() - target.float()) * weights[:, None]
    return loss, grad.to(logits.dtype)


def _fuses(hidden: Tensor) -> bool:
    """Whether the chunk arithmetic runs compiled: on a GPU (see the module docstring)."""
    return hidden.is_cuda


@functools.cache
def _fused_logit_gradient():
    return torch.compile(_logit_gradient_to_fuse, dynamic=True)
