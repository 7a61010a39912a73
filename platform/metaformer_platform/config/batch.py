"""The global batch of an elastic job at each world size (see ``training.elastic``): pure arithmetic, used when a
config is loaded (a range some size cannot split is refused) and when a worker group of a new size starts."""

from __future__ import annotations


def split_global_batch(global_batch: int, world_size: int, max_micro_batch: int, *, even: bool = False) -> tuple[int, int]:
    """``(micro_batch, grad_accum_steps)`` per worker so that ``micro_batch x grad_accum_steps x world_size ==
    global_batch``, with the largest micro-batch no larger than ``max_micro_batch`` (an even one when
    ``even``: mixup flips the batch). ValueError when no such split exists."""
    if global_batch % world_size:
        raise ValueError(
            f"the global batch of {global_batch} images cannot be split evenly over {world_size} workers"
        )
    per_worker = global_batch // world_size
    for micro in range(min(max_micro_batch, per_worker), 0, -1):
        if per_worker % micro == 0 and not (even and micro % 2):
            return micro, per_worker // micro
    raise ValueError(
        f"the {per_worker} images per worker at {world_size} workers have no even micro-batch (mixup needs one)"
    )


def check_range(num_workers: tuple[int, int], batch_size: int, grad_accum_steps: int, *, even: bool) -> None:
    """Every world size of ``num_workers`` splits the global batch; ValueError naming the first that does not."""
    low, high = num_workers
    global_batch = batch_size * grad_accum_steps * high
    for size in range(low, high + 1):
        try:
            split_global_batch(global_batch, size, batch_size, even=even)
        except ValueError as err:
            divisible = [n for n in range(1, high + 1) if global_batch % n == 0]
            raise ValueError(
                f"scaling.num_workers=[{low}, {high}] keeps the global batch trainer.batch_size={batch_size} x "
                f"grad_accum_steps={grad_accum_steps} x {high} = {global_batch} at every size, but {err}; "
                f"choose a range within the sizes that divide it ({divisible}) or another batch size"
            ) from None
