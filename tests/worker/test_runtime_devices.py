"""models/runtime.py on any device: host copies bound to their tensor's device (cuda:N), fp32 heads,
sync counting of blocking uploads, TF32 for every backend. The cuda:1 cases run on the CPU with fake
CUDA streams and events (and fake tensors on "cuda:1"); a GPU machine also runs the real ones."""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest
import torch
from torch import nn

from pseudolabel.models import runtime
from pseudolabel.models.runtime import H2D, HostCopy, counting_syncs, device_scope, run_in_fp32

CUDA_1 = torch.device("cuda", 1)


class FakeStream:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def record_event(self, event=None):
        event = event or FakeEvent()
        event.record(self)
        return event


class FakeEvent:
    """``torch.cuda.Event``'s surface: recorded on a stream (by default the current device's)."""

    current_stream = None  # set by the fixture: (device | None) -> FakeStream

    def __init__(self, *args, **kwargs) -> None:
        self.device = None

    def record(self, stream=None):
        self.device = (stream or FakeEvent.current_stream(None)).device

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA's stream, event, device-guard and pinning calls, faked: which device each one used."""
    used = {"current": [torch.device("cuda", 0)], "pinned_on": []}

    def current_stream(device=None):
        return FakeStream(used["current"][-1] if device is None else torch.device(device))

    @contextlib.contextmanager
    def on_device(device):
        used["current"].append(torch.device(device))
        try:
            yield
        finally:
            used["current"].pop()

    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):
        if pin_memory:
            used["pinned_on"].append(used["current"][-1])
        return real_empty(*shape, **kwargs)

    FakeEvent.current_stream = staticmethod(current_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch, "empty", empty)
    return used


def test_a_copy_from_cuda_1_records_its_event_on_cuda_1(fake_cuda):
    """The copy runs on the source tensor's device's current stream: the event the host waits on must be
    recorded there (on device 0's stream it would complete before the copy lands: garbage boxes), and
    the pinned buffer allocated under cuda:1's context (no stray context on GPU 0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = torch.zeros(7, 8, device=CUDA_1)
        ids = torch.zeros(7, dtype=torch.int64, device=CUDA_1)
        copy = HostCopy([scores, ids])
    assert copy._event.device == CUDA_1
    assert fake_cuda["pinned_on"] == [CUDA_1]
    assert fake_cuda["current"] == [torch.device("cuda", 0)]  # the guard is left again


def test_pinning_and_device_scope_are_bound_to_the_device(fake_cuda, monkeypatch):
    pinned_under = []
    monkeypatch.setattr(
        torch.Tensor, "pin_memory", lambda self: pinned_under.append(fake_cuda["current"][-1]) or self
    )
    pixels = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert runtime.pin(pixels, CUDA_1) is pixels and pinned_under == [CUDA_1]
    assert runtime.pin(pixels, torch.device("cpu")) is pixels and pinned_under == [CUDA_1]  # CPU: not pinned
    with device_scope(CUDA_1):
        assert fake_cuda["current"][-1] == CUDA_1
    with device_scope(torch.device("cpu")), device_scope(torch.device("cuda")):  # no index: left alone
        assert fake_cuda["current"] == [torch.device("cuda", 0)]


def test_host_copy_round_trip_on_the_device(device):
    values = torch.linspace(0, 1, 24, device=device).reshape(4, 6)
    flags = torch.tensor([True, False, True], device=device)
    small = torch.arange(5, dtype=torch.int8, device=device)
    halves = torch.tensor([0.5, 1.25], dtype=torch.float16, device=device)
    copy = HostCopy([values, flags, small, halves])
    if device.type == "cuda":
        assert copy._event.device == values.device
    got = copy.wait()
    for array, tensor in zip(got, (values, flags, small, halves), strict=True):
        np.testing.assert_array_equal(array, tensor.cpu().numpy())
    assert copy.wait() is got  # one copy, one sync


def test_host_copy_refuses_bf16_before_copying(device):
    with pytest.raises(TypeError, match=r"torch.bfloat16 .*cast it to float32 on the device"):
        HostCopy([torch.zeros(3, device=device), torch.zeros(2, dtype=torch.bfloat16, device=device)])


def test_run_in_fp32_keeps_a_head_s_precision_under_autocast():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 16).bfloat16()
    with torch.inference_mode():
        exact = head(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert head(x).dtype == torch.bfloat16  # plain: rounded to bf16
            assert run_in_fp32(head) is head and run_in_fp32(head) is head  # idempotent
            out = head(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    assert set(head.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_deep_copied_fp32_head_runs_its_own_weights():
    import copy

    head = run_in_fp32(nn.Linear(4, 2))
    twin = copy.deepcopy(head)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.fill_(1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = twin(torch.randn(3, 4).bfloat16())
    torch.testing.assert_close(out, torch.ones(3, 2))


def test_blocking_uploads_are_counted():
    """torch.tensor / as_tensor of host data onto the device block (PyTorch syncs the stream after a
    pageable copy); a CPU run counts them where they name a device, as a CUDA run would."""
    with counting_syncs(emulate_device=True) as syncs:
        torch.as_tensor([[3, 4], [5, 6]], device=torch.device("cpu"))
        torch.tensor([1.0, 2.0], device="cpu")
        torch.tensor([1.0, 2.0])  # a host tensor: nothing crosses
        runtime.to_device(np.zeros(3, np.float32), torch.device("cpu"))
    assert syncs.by_kind == {H2D: 2}


def test_uploads_on_a_real_device(device):
    """On CUDA: .to(device) / copy_ from pageable memory counted, pinned + non_blocking not; on the CPU
    nothing is an upload."""
    host = torch.zeros(16)
    target = torch.empty(16, device=device)
    with counting_syncs() as syncs:
        host.to(device)
        target.copy_(host)
        runtime.to_device(np.zeros(16, np.float32), device)
    assert syncs.by_kind.get(H2D, 0) == (2 if device.type == "cuda" else 0)


BACKENDS = {  # module: how to build its model object on the CPU (tiny, random)
    "pseudolabel.models.grounding_dino": "detector",
    "pseudolabel.models.owl": "detector",
    "pseudolabel.models.dinov2_saliency": "detector",
    "pseudolabel.models.sam2_segmenter": "segmenter",
    "pseudolabel.models.hf_sam": "segmenter",
    "pseudolabel.models.sam2_video": "tracker",
}


@pytest.mark.model
@pytest.mark.parametrize("module", list(BACKENDS))
def test_every_backend_sets_tf32_when_built(module, monkeypatch, tmp_path):
    """TF32 is process-wide: every backend turns it on for its device (a no-op on the CPU), so a
    segmenter's numerics do not depend on whether a detector was loaded in the same process."""
    from pseudolabel.models.loading import (
        DetectorSpec,
        SegmenterSpec,
        TrackerSpec,
        load_detector,
        load_segmenter,
        load_tracker,
    )

    calls = []
    monkeypatch.setattr(importlib.import_module(module), "enable_tf32", calls.append)
    spec = dict(checkpoint="random", tiny=True, device="cpu", cache_dir=str(tmp_path))
    build = {
        "pseudolabel.models.grounding_dino": lambda: load_detector(
            DetectorSpec(text_encoder="tiny-random", **spec)
        ),
        "pseudolabel.models.owl": lambda: load_detector(DetectorSpec(backend="owlv2", **spec)),
        "pseudolabel.models.dinov2_saliency": lambda: load_detector(
            DetectorSpec(backend="dinov2_saliency", **spec)
        ),
        "pseudolabel.models.sam2_segmenter": lambda: load_segmenter(SegmenterSpec(variant="tiny", **spec)),
        "pseudolabel.models.hf_sam": lambda: load_segmenter(SegmenterSpec(backend="edgetam", **spec)),
        "pseudolabel.models.sam2_video": lambda: load_tracker(TrackerSpec(variant="tiny", **spec)),
    }[module]
    build()
    assert calls == [torch.device("cpu")]


def test_enable_tf32_switches_the_flags_for_cuda_only():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        runtime.enable_tf32(torch.device("cpu"))
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        runtime.enable_tf32(CUDA_1)
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
