"""CudaGraphed: the replay bookkeeping on CPU (a stand-in graph that re-runs the captured
call on its static inputs, as a replay does), the real capture on a GPU."""

from types import SimpleNamespace

import pytest
import torch

from otq_kernels import graphs
from otq_kernels.graphs import CudaGraphed


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """capture_cuda_graph replaced by one that records its warm-ups and captures, and whose
    replay writes call() into the captured output in place (as a CUDA graph replay writes
    the same memory)."""
    log = {"calls": 0, "captures": 0}

    def capture(call, device, warmup):
        for _ in range(warmup):
            call()
        log["captures"] += 1
        output = call()
        return output, SimpleNamespace(replay=lambda: output.copy_(call()))

    def counted(fn):
        def wrapper(*args, **kwargs):
            log["calls"] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
    monkeypatch.setattr(graphs, "_cuda_device", lambda values: torch.device("cpu"))
    return log, counted


def _velocity(x, t, scale=1.0):
    return scale * torch.sin(x) * t


def test_replays_read_each_calls_inputs_and_return_their_own_output(stand_in_graphs):
    log, counted = stand_in_graphs
    graphed = CudaGraphed(counted(_velocity), warmup=2)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    y1 = graphed(x1, t=torch.tensor(0.25))
    y2 = graphed(x2, t=torch.tensor(0.75))
    torch.testing.assert_close(y1, _velocity(x1, 0.25))  # a clone: not overwritten by y2
    torch.testing.assert_close(y2, _velocity(x2, 0.75))
    assert graphed.graphs == 1 and log["captures"] == 1
    assert log["calls"] == 2 + 1 + 2  # 2 warm-ups, the capture, a (stand-in) replay per call


def test_a_new_signature_is_captured_anew(stand_in_graphs):
    """Shapes, dtypes and scalar arguments key the graphs: each gets its own capture."""
    log, _ = stand_in_graphs
    graphed = CudaGraphed(_velocity, warmup=1)
    t = torch.tensor(0.5)
    graphed(torch.randn(2, 3), t)
    graphed(torch.randn(2, 3), t)
    graphed(torch.randn(4, 3), t)
    graphed(torch.randn(4, 3, dtype=torch.float64), t)
    y = graphed(torch.ones(4, 3), t, scale=3.0)
    torch.testing.assert_close(y, _velocity(torch.ones(4, 3), 0.5, 3.0))
    assert graphed.graphs == log["captures"] == 4


def test_keyword_order_does_not_matter(stand_in_graphs):
    graphed = CudaGraphed(_velocity, warmup=1)
    x = torch.randn(3)
    graphed(x=x, t=torch.tensor(1.0))
    y = graphed(t=torch.tensor(2.0), x=x)
    torch.testing.assert_close(y, _velocity(x, 2.0))
    assert graphed.graphs == 1


def test_refuses_what_it_cannot_replay(stand_in_graphs):
    graphed = CudaGraphed(_velocity)
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="for inference"):
        graphed(x, torch.tensor(0.5))
    weight = torch.ones(3, requires_grad=True)  # a parameter that wants gradients
    with pytest.raises(RuntimeError, match="for inference"):
        CudaGraphed(lambda x: x * weight)(x.detach())
    with torch.no_grad():
        CudaGraphed(lambda x: x * weight)(x.detach())
    with pytest.raises(TypeError, match="tensors and Python scalars"):
        graphed(x.detach(), [0.5])
    with pytest.raises(TypeError, match="one tensor"):
        CudaGraphed(lambda x: (x, x))(x.detach())
    for warmup in (0, 1.5, True):
        with pytest.raises(ValueError, match="warmup must be an integer >= 1"):
            CudaGraphed(_velocity, warmup=warmup)


def test_cpu_tensors_are_refused_before_any_capture():
    with pytest.raises(ValueError, match="one CUDA device"):
        CudaGraphed(_velocity)(torch.randn(3), torch.tensor(0.5))


def test_capture_warms_up_on_a_side_stream_then_captures(monkeypatch):
    """The real capture_cuda_graph against a stand-in torch.cuda that logs the order of
    events: all of it with the tensors' device current, warm-ups on the side stream (which
    first waits for the current one), the current stream waiting for them, then one call
    inside the graph's capture."""
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    side, current = Stream("side"), Stream("current")

    class Capture:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    graph = object()
    fake = SimpleNamespace(Stream=lambda device: side, current_stream=lambda device: current,
                           stream=lambda s: Capture(f"stream {s.name}"), CUDAGraph=lambda: graph,
                           graph=lambda g: Capture("capture"),
                           device=lambda d: Capture(f"device {d}"))
    monkeypatch.setattr(graphs.torch, "cuda", fake)

    def call():
        events.append("call")
        return len(events)

    output, captured = graphs.capture_cuda_graph(call, "cuda:1", warmup=2)
    assert captured is graph and output == 9  # the captured call: the 9th event
    assert events == ["enter device cuda:1", "side waits for current", "enter stream side",
                      "call", "call", "exit stream side", "current waits for side",
                      "enter capture", "call", "exit capture", "exit device cuda:1"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_unet_replays_match_eager_calls():
    """The digits UNet, 4-bit per channel in fp16 on auto dispatch: replays over changing x
    and t (and a second batch size, a second graph) give the eager outputs."""
    import otq_kernels as otq
    from otq_kernels.models import build_model

    torch.manual_seed(0)
    model = build_model("digits")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    otq.quantize_model(model, bits=4, progress=False)
    model = model.cuda().half().eval()
    graphed = CudaGraphed(model)
    with torch.inference_mode():
        for batch, t in ((1, 0.1), (1, 0.6), (3, 0.3), (1, 0.9)):
            x = torch.randn(batch, 1, 16, 16, device="cuda", dtype=torch.float16)
            tt = torch.full((batch,), t, device="cuda")
            torch.testing.assert_close(graphed(x, tt), model(x, tt), rtol=1e-3, atol=1e-3)
    assert graphed.graphs == 2
