"""One round of DP-SGD at a site: Opacus' PrivacyEngine on the site's trainable parameters,
Poisson sampling, physical batches, the ledger's history carried through the accountant."""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from .accounting import PrivacyLedger
from .bookkeeping import BookKeepingLoss


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; Opacus' Poisson loader keeps this length with sample rate 1/length."""
    return max(1, math.ceil(num_examples / batch_size))


def refuse_embeddings_dp_sgd_cannot_bound(model: torch.nn.Module) -> None:
    """Two options of PyTorch's embeddings escape DP-SGD. ``scale_grad_by_freq`` divides each row's
    gradient by its id's count over the whole batch, so an example's part depends on the others
    and its clipped norm bounds nothing (Opacus' samplers ignore the scaling: ghost clipping's
    second pass would apply it, the hooks would not). ``max_norm`` renormalises, in place during
    the forward, the rows of the ids the batch holds: a change to the weights that depends on the
    private data and gets no noise (the server would see which rows were read)."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            if module.scale_grad_by_freq:
                raise ValueError(f"DP-SGD: embedding {name} has scale_grad_by_freq=True: its gradient depends on the "
                                 "whole batch, so no per-example clipping bounds it; build it with scale_grad_by_freq=False")
            if module.max_norm is not None:
                raise ValueError(f"DP-SGD: embedding {name} has max_norm={module.max_norm}: its forward renormalises the "
                                 "rows of the batch's ids in place, a change to the weights that depends on the private "
                                 "data and gets no noise; build it with max_norm=None")


def secret_seed(generator: torch.Generator) -> int:
    """62 random bits from the site's secret ``generator``: the seed of a generator on an accelerator
    that draws the DP noise there. No seed the server could enumerate or derive from the config,
    the seed or the round."""
    return int(torch.randint(2**62, (1,), generator=generator))


def add_noise_in_one_draw(optimizer) -> None:
    """Opacus' ``DPOptimizer.add_noise`` with one draw for all trainable tensors: p.grad =
    p.summed_grad + z_p, z ~ N(0, (sigma C)^2 I) over their concatenation, drawn by Opacus' secure
    mode (a sum of four Gaussians, against floating-point attacks on one) from the optimizer's
    generator: the distribution of Opacus' draw per tensor. One draw launches a dozen kernels a
    step instead of a dozen per tensor, which on a GPU were most of DP-SGD's extra time."""
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    summed = [p.summed_grad for p in optimizer.params]
    if not summed:
        return
    _check_processed_flag(summed)  # a sum noised twice would be a gradient used twice
    sizes = [s.numel() for s in summed]
    noise = _generate_noise(optimizer.noise_multiplier * optimizer.max_grad_norm, summed[0].new_empty(sum(sizes)),
                            generator=optimizer.generator, secure_mode=True)
    noisy = torch._foreach_add(summed, [z.view_as(s) for z, s in zip(noise.split(sizes), summed, strict=True)])
    for p, grad in zip(optimizer.params, noisy, strict=True):
        p.grad = grad.view_as(p)
    _mark_as_processed(summed)


def scale_grads_together(optimizer) -> None:
    """Opacus' ``DPOptimizer.scale_grad`` (the mean over the expected batch) as one multi-tensor
    division."""
    if optimizer.loss_reduction == "mean":
        torch._foreach_div_([p.grad for p in optimizer.params], optimizer.expected_batch_size * optimizer.accumulated_iterations)


def train_private(
    model: torch.nn.Module, dataset: TensorDataset, batch_size: int, optimizer: torch.optim.Optimizer,
    epochs: int, ledger: PrivacyLedger, max_grad_norm: float, mode: str, generator: torch.Generator,
    max_physical_batch_size: int = 0,
) -> float:
    """DP-SGD on ``model``'s trainable parameters; the accountant starts from the ledger's history
    and the ledger takes the updated history. Returns the mean loss (which stays at the site).

    Poisson sampling at rate 1 / ceil(len(dataset) / batch_size), as the accountant assumes;
    ``batch_size`` is the expected logical batch, which Opacus' BatchMemoryManager cuts into
    physical batches of at most ``max_physical_batch_size`` examples (0: no limit) whose clipped
    gradients it sums before one noisy step, so memory does not limit the batch size.
    ``generator`` (``dp_generator``) draws both the sampling masks (Opacus' Poisson loader takes
    the generator of the loader it wraps) and the noise, which is drawn as Opacus' secure mode
    draws it (a sum of four Gaussians) to blunt floating-point attacks on Gaussian sampling. For a
    model on an accelerator the noise comes from a generator there, seeded by ``generator``; the
    dataset may stay on the CPU (batches follow the model: training.train_epochs).
    """
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from ..training import MoELoss, TensorRows, as_fetched, train_epochs

    refuse_embeddings_dp_sgd_cannot_bound(model)
    model.train()
    # Opacus' Poisson loader keeps this loader's dataset and collate function: batches are fetched whole
    loader = DataLoader(TensorRows(*dataset.tensors), batch_size=batch_size, generator=generator, collate_fn=as_fetched)
    noise_generator = generator
    device = next(model.parameters()).device
    if device.type != "cpu":
        # Opacus draws the noise on the parameters' device with the generator it is given, and the
        # sampling masks on the CPU: a generator for the device, seeded from the secret one
        noise_generator = torch.Generator(device).manual_seed(secret_seed(generator))
    with warnings.catch_warnings():
        # "Secure RNG turned off" speaks of Opacus' own CSPRNG (torchcsprng); our noise comes from
        # the site's secret generator, drawn in secure mode below, and the README says so
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, criterion=MoELoss(), data_loader=loader,
        noise_multiplier=ledger.noise_multiplier, max_grad_norm=max_grad_norm,
        grad_sample_mode="ghost" if mode == "bookkeeping" else mode, poisson_sampling=True, noise_generator=noise_generator,
    )
    if mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = wrapped
    elif mode == "bookkeeping":
        private_model, private_optimizer, ghost_criterion, private_loader = wrapped
        criterion = BookKeepingLoss(ghost_criterion)
    else:
        (private_model, private_optimizer, private_loader), criterion = wrapped, MoELoss()
    for group in optimizer.param_groups:  # what a noise-aware optimiser (training.NoiseAwareAdam) discounts
        if "noise_variance" in group:
            group["noise_variance"] = (private_optimizer.noise_multiplier * private_optimizer.max_grad_norm
                                       / private_optimizer.expected_batch_size) ** 2
    # Opacus' own steps, drawn and scaled over all tensors at once (PrivacyEngine(secure_mode=True)
    # would also need torchcsprng, not installable here; the draw is in secure mode regardless)
    private_optimizer.add_noise = functools.partial(add_noise_in_one_draw, private_optimizer)
    private_optimizer.scale_grad = functools.partial(scale_grads_together, private_optimizer)
    try:
        with warnings.catch_warnings():
            # torch's note that a full backward hook fires on module outputs when the inputs need
            # no gradient: ghost clipping's second backward pass does exactly that, by design
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            if max_physical_batch_size > 0:
                with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=max_physical_batch_size,
                                        optimizer=private_optimizer) as physical_loader:
                    loss = train_epochs(private_model, physical_loader, private_optimizer, epochs, criterion)
            else:
                loss = train_epochs(private_model, private_loader, private_optimizer, epochs, criterion)
    finally:
        private_model._close()  # detach Opacus' hooks; ``model`` holds the trained weights
        if mode == "bookkeeping":
            criterion.book.close()
    ledger.history = [tuple(h) for h in engine.accountant.history]
    return loss
