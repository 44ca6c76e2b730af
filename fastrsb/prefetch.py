"""The input pipeline that overlaps the step: batch k+1 is loaded and augmented while step k runs.

    batches = AugmentedBatches(iter(loader), augment, generator, device, count=steps * accum_steps)
    for x, target in batches: ...                 # x and target ready on `device`

On CUDA the augmentation of batch k+1 is issued on a side stream as soon as batch k is handed out, so
its kernels run beside step k's (timm's prefetcher idea, applied to the whole GPU augmentation). The
hand-off is by event: the compute stream waits for exactly the batch it takes, and `record_stream`
keeps the side stream's memory alive until the compute stream is done with it. The side stream first
waits for the compute stream, so a batch's inputs (written by the loader on the compute stream) are
complete before it is augmented. On the CPU batches are prepared when asked (nothing to overlap with).

`count` bounds what is drawn: the pipeline never loads or augments past the batches the caller will
take. One AugmentedBatches can span several epochs (the trainer's does: `batches` chains the epochs'
loaders), so the first batch of epoch e + 1 is augmented beside epoch e's last step, as any other.
A checkpoint between two steps (at an epoch's end, or mid-epoch on a signal) must not hold the
generator's state after the prefetched draw, so the state before the draw in flight is kept:
`generator_state_at(n)` is the generator's state before draw n, whether or not draw n was already
prefetched (resume stays exact). `start`: the number of the first draw (a run resumed mid-epoch
counts its draws as the uninterrupted run did).
"""
from __future__ import annotations

import torch


class AugmentedBatches:
    def __init__(self, batches, augment, generator: torch.Generator | None, device, count: int, start: int = 0):
        self.batches = batches
        self.augment = augment
        self.generator = generator
        self.device = torch.device(device)
        self.remaining = int(count)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending = None
        self.drawn = int(start)  # the number of the next draw from `batches`
        self._in_flight_state = None  # (draw index, generator state before it) of the latest draw
        if self.cuda:
            self.pending = self._prepare()

    def generator_state_at(self, n: int) -> torch.Tensor:
        """The augmentation generator's state before draw n: now, if n is the next draw, or as kept
        before the latest draw (the one a prefetch may have taken ahead of the caller)."""
        if n == self.drawn:
            return self.generator.get_state()
        if self._in_flight_state is not None and self._in_flight_state[0] == n:
            return self._in_flight_state[1]
        raise ValueError(f"the generator's state before draw {n} was not kept (the next draw is {self.drawn})")

    def _prepare(self):
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        if self.generator is not None and self.cuda:  # the CPU path draws when asked: nothing is ahead
            self._in_flight_state = (self.drawn, self.generator.get_state())
        self.drawn += 1
        images, labels = next(self.batches)
        if not self.cuda:
            return self.augment(images, labels, generator=self.generator)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.side):
            self.side.wait_stream(main)  # the loader's copies into images/labels were issued on `main`
            x, target = self.augment(images, labels, generator=self.generator)
            done = self.side.record_event()
        images.record_stream(self.side)
        labels.record_stream(self.side)
        return x, target, done

    def __iter__(self):
        return self

    def __next__(self):
        if not self.cuda:
            out = self._prepare()
            if out is None:
                raise StopIteration
            return out
        if self.pending is None:
            raise StopIteration
        x, target, done = self.pending
        main = torch.cuda.current_stream(self.device)
        main.wait_event(done)
        x.record_stream(main)
        target.record_stream(main)
        self.pending = self._prepare()  # batch k+1 now, on the side stream, beside the caller's step k
        return x, target
