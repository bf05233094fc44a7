"""Backend selection (per thread, both call forms), the serialized interpreter launches, torch.compile
with the triton backend on CPU, and the triton-imported-first trap."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastdl
from fastdl import backends, testing
from fastdl.backends import resolve, selected_backend, use_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available() or "triton" not in fastdl.available_backends(),
                                       reason="runs the triton backend on CPU tensors through Triton's interpreter")


@pytest.fixture(autouse=True)
def no_selection():
    use_backend(None)
    yield
    use_backend(None)


def run_threads(*targets):
    """Run each target in its own thread; re-raise the first failure in the calling thread."""
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


# --- one thread ------------------------------------------------------------------------------------

def test_plain_call_sets_until_changed_and_none_restores_the_device_default():
    use_backend("reference")
    assert selected_backend() == "reference" and resolve(CUDA) == "reference"
    use_backend(None)
    assert selected_backend() is None
    assert resolve(CUDA) == "triton" and resolve(CPU) == "reference"
    with use_backend("reference"):
        with use_backend(None):
            assert resolve(CUDA) == "triton"
        assert resolve(CUDA) == "reference"


def test_nested_blocks_restore_in_order():
    with use_backend("reference"):
        with use_backend("triton"):
            with use_backend("cupy"):
                assert selected_backend() == "cupy"
            assert selected_backend() == "triton"
        assert selected_backend() == "reference"
    assert selected_backend() is None


def test_same_object_entered_twice_in_sequence_and_nested():
    use_backend("reference")
    cm = use_backend("triton")  # selects; the first `with` below undoes that
    assert selected_backend() == "triton"
    with cm:
        assert selected_backend() == "triton"
    assert selected_backend() == "reference"
    with cm:
        assert selected_backend() == "triton"
    assert selected_backend() == "reference"
    with cm:
        with cm:
            assert selected_backend() == "triton"
        assert selected_backend() == "triton"
    assert selected_backend() == "reference"
    with use_backend("cupy"):
        with cm:
            with cm:
                assert selected_backend() == "triton"
            assert selected_backend() == "triton"
        assert selected_backend() == "cupy"
    assert selected_backend() == "reference"


def test_object_created_and_entered_later_restores_what_was_before_its_creation():
    cm = use_backend("triton")
    with use_backend("reference"):  # another block in between leaves cm's selection in place
        assert selected_backend() == "reference"
    assert selected_backend() == "triton"
    with cm:
        assert selected_backend() == "triton"
    assert selected_backend() is None
    # A plain call after the creation is the user's own choice: entering cm no longer undoes it.
    cm = use_backend("triton")
    use_backend("reference")
    with cm:
        assert selected_backend() == "triton"
    assert selected_backend() == "reference"


def test_exception_inside_block_restores():
    with pytest.raises(KeyError):
        with use_backend("triton"):
            raise KeyError("x")
    assert selected_backend() is None


# --- threads -----------------------------------------------------------------------------------------

def test_new_thread_starts_without_selection_and_its_choice_stays_in_it():
    use_backend("reference")
    seen = {}

    def worker():
        seen["start"] = selected_backend()
        use_backend("cupy")  # plain call: this thread only
        seen["after"] = selected_backend()

    run_threads(worker)
    assert seen == {"start": None, "after": "cupy"}
    assert selected_backend() == "reference"


def test_interleaved_blocks_in_two_threads():
    # Old global setting: A enters, B enters (remembering A's), A exits, B exits -> A's choice left
    # behind for everyone. Per thread, each sees only its own, and nothing leaks to this thread.
    b1, b2, b3 = (threading.Barrier(2, timeout=30) for _ in range(3))
    seen = {}

    def a():
        with use_backend("triton"):
            b1.wait()  # both inside
            b2.wait()  # B has entered after A
            seen["a_inside"] = selected_backend()
        b3.wait()
        seen["a_after"] = selected_backend()

    def b():
        b1.wait()
        with use_backend("reference"):
            b2.wait()
            b3.wait()  # A has exited while B is inside
            seen["b_inside"] = selected_backend()
        seen["b_after"] = selected_backend()

    run_threads(a, b)
    assert seen == {"a_inside": "triton", "a_after": None, "b_inside": "reference", "b_after": None}
    assert selected_backend() is None


def test_a_thread_inside_a_block_does_not_change_what_another_runs():
    x, w = testing.make_tensor((5, 7), seed=1), testing.make_tensor((3, 7), seed=2)
    with use_backend("reference"):
        expected = fastdl.functional.linear(x, w)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def selector():
        with use_backend("cupy"):  # cannot run CPU tensors: would raise if it leaked
            inside.set()
            assert done.wait(timeout=60)

    def runner():
        assert inside.wait(timeout=60)
        try:
            seen["selected"], seen["resolved"] = selected_backend(), resolve(CPU)
            seen["out"] = fastdl.functional.linear(x, w)
        finally:
            done.set()

    run_threads(selector, runner)
    assert seen["selected"] is None and seen["resolved"] == "reference"
    testing.assert_close(seen["out"], expected.double(), torch.float64, name="out")


def test_one_object_entered_in_two_threads():
    cm = use_backend("triton")
    use_backend(None)
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def worker(key, before):
        def run():
            use_backend(before)
            with cm:
                barrier.wait()
                seen[key + "_inside"] = selected_backend()
                barrier.wait()
            seen[key + "_after"] = selected_backend()
        return run

    run_threads(worker("a", "reference"), worker("b", "cupy"))
    assert seen == {"a_inside": "triton", "b_inside": "triton", "a_after": "reference", "b_after": "cupy"}


# --- Triton's interpreter, shared by threads --------------------------------------------------------

def _linear_and_cross_entropy(x, w, b, target):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    out = fastdl.functional.linear(x, w, b, activation="gelu")
    loss = fastdl.functional.cross_entropy(out, target, label_smoothing=0.1)
    loss.backward()
    return [loss.detach(), out.detach(), x.grad, w.grad, b.grad]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "reference"])
def test_two_threads_on_one_backend_at_once(backend):
    # triton: the interpreter is not thread-safe, so its launches are serialized (without the lock
    # this crashed with "Did you forget to add @triton.jit"); reference: NumPy under two threads.
    # The cupy backend runs on a GPU only (its CPU emulation is single-threaded by design).
    x, w, b = (testing.make_tensor(s, seed=i) for i, s in enumerate([(6, 5), (9, 5), (9,)]))
    target = torch.arange(6) % 9
    with use_backend(backend):
        expected = _linear_and_cross_entropy(x, w, b, target)
    start = threading.Barrier(2, timeout=30)

    def worker():
        use_backend(backend)
        start.wait()
        for _ in range(6):
            for got, want in zip(_linear_and_cross_entropy(x, w, b, target), expected):
                assert torch.equal(got, want)

    run_threads(worker, worker)


# --- torch.compile with the triton backend on CPU ---------------------------------------------------

def _dense_loss(x, w, target):
    return fastdl.functional.cross_entropy(fastdl.functional.linear(x, w, activation="relu"), target)


@needs_interpreter
def test_compile_fullgraph_on_cpu_says_triton_needs_cuda():
    torch._dynamo.reset()
    x, w = testing.make_tensor((4, 6), seed=1), testing.make_tensor((5, 6), seed=2)
    with use_backend("triton"), pytest.raises(RuntimeError, match="compiled Triton kernels need CUDA tensors") as info:
        torch.compile(_dense_loss, fullgraph=True)(x, w, torch.arange(4))
    assert "use_backend('reference')" in str(info.value)
    torch._dynamo.reset()


@needs_interpreter
def test_compile_default_on_cpu_falls_back_to_eager_with_torchs_numbers():
    # Without fullgraph, dynamo hands the frame whose tracing raised back to eager Python, where the
    # triton backend runs CPU tensors through the interpreter: right numbers, no crash.
    torch._dynamo.reset()
    x, w = testing.make_tensor((4, 6), seed=1, requires_grad=True), testing.make_tensor((5, 6), seed=2)
    target = torch.arange(4)
    with use_backend("triton"):
        loss = torch.compile(_dense_loss)(x, w, target)
        loss.backward()
    expected = torch.nn.functional.cross_entropy(torch.relu(x.double() @ w.double().T), target)
    testing.assert_close(loss, expected, torch.float32, name="loss")
    x64 = x.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(torch.relu(x64 @ w.double().T), target).backward()
    testing.assert_close(x.grad, x64.grad, torch.float32, name="grad_input")
    torch._dynamo.reset()


# --- triton imported before fastdl -------------------------------------------------------------------

TRITON_FIRST = """
import os
import triton
import torch, fastdl

def attempt():
    print("available", fastdl.available_backends())
    try:
        with fastdl.use_backend("triton"):
            fastdl.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        print("ran")
    except RuntimeError as exc:
        print("error", exc)

attempt()
os.environ["TRITON_INTERPRET"] = "1"  # too late: triton decided at its import
attempt()
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trap is CPU-only")
def test_triton_imported_first_says_why_and_how_to_fix():
    # The working case is this test process: conftest sets TRITON_INTERPRET before triton's import.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", TRITON_FIRST], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout
    for available, error in (lines[:2], lines[2:]):
        assert available == "available ['reference']"
        assert error.startswith("error fastdl: triton was imported before fastdl without TRITON_INTERPRET=1")
        assert "set the environment variable TRITON_INTERPRET=1 before anything imports triton" in error
        assert "fastdl.use_backend('reference')" in error


def test_triton_interpreting_asks_triton_once_imported():
    from triton.language import standard  # conftest set TRITON_INTERPRET before any import of triton
    from triton.runtime.interpreter import InterpretedFunction

    assert backends.triton_interpreting() == isinstance(standard.cdiv, InterpretedFunction)
