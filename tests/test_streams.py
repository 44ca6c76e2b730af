"""The CUDA stream hand-offs, checked on the CPU with recorder fakes of torch.cuda's streams and events.

`AugmentedBatches` (fastrsb/prefetch.py) augments batch k+1 on a side stream while the caller's step k
runs; DALI's CUDA branch (`DALILoader.iter_epoch`) binds its outputs to torch's current stream. Neither
runs here without a GPU, so the fakes record every stream call in order and the tests check it: who
waits for whom, which stream each tensor is recorded on, the stream current at each call, and that
nothing synchronises the host.
"""
from __future__ import annotations

import contextlib

import pytest
import torch


class Log(list):
    def add(self, *entry):
        self.append(entry)


class FakeEvent:
    def __init__(self, log, name):
        self.name = name
        log.add("record_event", name)


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name, self.events = log, name, 0

    def wait_stream(self, other):
        self.log.add("wait_stream", self.name, other.name)

    def record_event(self):
        self.events += 1
        return FakeEvent(self.log, f"{self.name}#{self.events}")

    def wait_event(self, event):
        self.log.add("wait_event", self.name, event.name)

    def synchronize(self):
        self.log.add("synchronize", self.name)

    def __repr__(self):
        return self.name


class FakeBatch:
    """Stands for a CUDA tensor: records which streams it is recorded on."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def record_stream(self, stream):
        self.log.add("record_stream", self.name, stream.name)


class FakeCuda:
    """torch.cuda's stream API, recording: `current` is the current stream, changed by `stream(s)`."""

    def __init__(self, monkeypatch, log):
        self.log = log
        self.current = FakeStream(log, "main")
        self.made = 0
        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.add("synchronize", "device"))

    def Stream(self, device=None):
        self.made += 1
        return FakeStream(self.log, f"side{self.made}")

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        self.log.add("enter", s.name)
        try:
            yield
        finally:
            self.current = before
            self.log.add("exit", s.name)


def test_augmented_batches_hand_off_order(monkeypatch):
    from fastrsb.prefetch import AugmentedBatches

    log = Log()
    cuda = FakeCuda(monkeypatch, log)
    n = 3

    def batches():
        for k in range(n + 5):  # more than `count`: the pipeline must not draw past it
            log.add("load", k)
            yield FakeBatch(log, f"images{k}"), FakeBatch(log, f"labels{k}")

    def augment(images, labels, generator=None):
        k = images.name[len("images"):]
        log.add("augment", k, cuda.current.name)
        return FakeBatch(log, f"x{k}"), FakeBatch(log, f"target{k}")

    taken = []
    for x, target in AugmentedBatches(batches(), augment, None, "cuda", count=n):
        log.add("step", x.name)
        taken.append((x.name, target.name))
    assert taken == [(f"x{k}", f"target{k}") for k in range(n)]
    assert [e for e in log if e[0] == "load"] == [("load", k) for k in range(n)]  # never past count
    assert not [e for e in log if e[0] == "synchronize"]  # no host synchronisation anywhere

    for k in range(n):
        i = log.index(("augment", str(k), "side1"))  # augmented on the side stream, inside its context
        enter = max(j for j in range(i) if log[j] == ("enter", "side1"))
        # the side stream waits for the loader's work on main before it touches the batch
        assert ("wait_stream", "side1", "main") in log[enter:i]
        # its event is recorded after the augmentation, and its inputs are kept alive for the side stream
        assert log[i + 1] == ("record_event", f"side1#{k + 1}")
        assert log.index(("record_stream", f"images{k}", "side1")) > i
        assert log.index(("record_stream", f"labels{k}", "side1")) > i
        # the compute stream waits for exactly that event before the step takes the batch, and the
        # outputs are recorded on it (their memory belongs to the side stream's pool)
        step = log.index(("step", f"x{k}"))
        wait = log.index(("wait_event", "main", f"side1#{k + 1}"))
        assert wait < log.index(("record_stream", f"x{k}", "main")) < step
        assert log.index(("record_stream", f"target{k}", "main")) < step
        # batch k+1 is issued after batch k is handed over and before step k runs (the overlap)
        if k + 1 < n:
            assert wait < log.index(("augment", str(k + 1), "side1")) < step
    assert cuda.made == 1  # one side stream for the whole pass


class FakeTensorList:
    def __init__(self, log, name, shape):
        self.log, self.name, self._shape = log, name, shape

    def as_tensor(self):
        return self

    def shape(self):
        return list(self._shape)


class FakePipe:
    def __init__(self, log, batches, cuda):
        self.log, self.left, self.cuda, self.k = log, batches, cuda, 0

    def schedule_run(self):
        self.log.add("schedule_run")

    def outputs(self, cuda_stream=None):
        self.log.add("outputs", cuda_stream.name if cuda_stream is not None else None)
        if self.k == self.left:
            raise StopIteration
        self.k += 1
        # the caller's step changes torch's current stream between batches: each call must see its own
        self.cuda.current = FakeStream(self.log, f"torch{self.k}")
        return FakeTensorList(self.log, f"images{self.k}", (2, 8, 8, 3)), FakeTensorList(self.log, f"labels{self.k}", (2, 1))

    def reset(self):
        self.log.add("reset")


def test_dali_cuda_branch_binds_outputs_to_the_current_stream(monkeypatch):
    """DALILoader.iter_epoch on a GPU, with DALI's pipeline and feed_ndarray faked: each batch's outputs are
    bound to torch's current stream at the time of the call and copied on that same stream; the next batch
    is scheduled before the batch is handed out; nothing synchronises the host."""
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.plugin.pytorch as dali_torch

    from fastrsb.loaders.dali_loader import DALILoader

    log = Log()
    cuda = FakeCuda(monkeypatch, log)
    cuda.current = FakeStream(log, "torch0")
    copies = []
    monkeypatch.setattr(dali_torch, "feed_ndarray",
                        lambda tl, arr, cuda_stream=None: copies.append((tl.name, cuda_stream.name)) or arr)
    real_empty = torch.empty

    def empty(*shape, dtype=None, device=None, **kw):  # a "cuda" tensor, held on the CPU
        return real_empty(*shape, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "empty", empty)

    class Source:
        ended, upcoming = False, None

        def start(self, batches, res):
            log.add("start", res)

    class Plan:
        batches_per_epoch = 3

        def batches(self, epoch):
            return [[0, 1]] * 3

    loader = object.__new__(DALILoader)
    loader._gpu, loader._state, loader.source, loader.plan = torch.device("cuda", 0), "new", Source(), Plan()
    loader.pipe = FakePipe(log, 3, cuda)
    got = []
    for x, y in loader.iter_epoch(0, 8):
        log.add("yield")
        got.append((tuple(x.shape), tuple(y.shape)))
    # the planned count of batches; the next epoch's plan is fed on (no drain at the boundary)
    assert got == [((2, 3, 8, 8), (2,))] * 3 and loader._state == "ahead" and loader._ahead == (1, 8)
    assert loader.source.upcoming == ([[0, 1]] * 3, 8)
    # bound to the stream current at each call, and copied on it, images then labels
    outputs = [e[1] for e in log if e[0] == "outputs"]
    assert outputs == ["torch0", "torch1", "torch2"]
    assert copies == [(f"{kind}{k}", f"torch{k - 1}") for k in (1, 2, 3) for kind in ("images", "labels")]
    # one schedule_run before the first outputs, then one after each batch's copies and before it is handed out
    calls = [e[0] for e in log if e[0] in ("schedule_run", "outputs", "yield")]
    assert calls == ["schedule_run"] + ["outputs", "schedule_run", "yield"] * 3
    assert not [e for e in log if e[0] == "synchronize"]


def test_prefetch_keeps_the_generator_state_of_every_step_boundary(monkeypatch):
    """The next batch is augmented (its random draws taken) before the caller's step on this one runs,
    across epoch boundaries too; the state a checkpoint between two steps stores (at an epoch's end, or
    mid-epoch on a signal) is the one before that draw, so a run resumed from it, counting its draws
    from there (`start`), draws exactly what the uninterrupted run drew."""
    import torch

    from fastrsb.prefetch import AugmentedBatches

    log = Log()
    FakeCuda(monkeypatch, log)
    total = 6

    def batches(first=0):
        for k in range(first, total):
            yield FakeBatch(log, f"images{k}"), FakeBatch(log, f"labels{k}")

    def augment(images, labels, generator=None):
        draw = torch.rand(1, generator=generator).item()
        return FakeBatch(log, f"x{draw}"), FakeBatch(log, "target")

    reference = torch.Generator().manual_seed(3)
    full = [f"x{torch.rand(1, generator=reference).item()}" for _ in range(total)]
    gen = torch.Generator().manual_seed(3)
    stream = AugmentedBatches(batches(), augment, gen, "cuda", count=total)
    names = []
    for taken in range(1, total + 1):
        names.append(next(stream)[0].name)
        if taken < total:
            assert stream.drawn == taken + 1  # the next batch is already augmented
            assert not torch.equal(stream.generator_state_at(taken), gen.get_state())
            with pytest.raises(ValueError, match="was not kept"):
                stream.generator_state_at(taken - 1)  # only the draw in flight is kept
        # resumed from this boundary's state: the rest of the draws are the uninterrupted run's
        resumed = torch.Generator()
        resumed.set_state(stream.generator_state_at(taken))
        rest = AugmentedBatches(batches(taken), augment, resumed, "cuda", count=total - taken, start=taken)
        assert [x.name for x, _ in rest] == full[taken:]
        assert rest.drawn == total
    assert names == full
