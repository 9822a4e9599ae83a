"""SyncBatchNorm: two gloo processes holding parts of a batch equal one torch.nn.BatchNorm1d on the whole batch;
Chan's combination against one pass over the whole batch; the closed-form backward through gradcheck;
convert_sync_batchnorm against torch's. (Without a process group it is BatchNorm: the case table in cases.py and
the hypothesis test in test_norm.py.)

The two-process runs happen once per module (`ranks` fixture: one spawn, every scenario, a few seconds); each
test then checks one thing of one scenario.
"""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import nn as nnl
from normlab.nn.sync import SyncBatchNormFunction, combine_statistics, gather_batch_statistics

from .cases import assert_twin_close
from .sync_worker import (
    DDP_LR,
    DDP_STEPS,
    DTYPE,
    SCENARIOS,
    WORLD_SIZE,
    Scenario,
    ddp_batch,
    ddp_model,
    run_rank,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _spawn(backend: str, tmp_path) -> list[dict]:
    """Run `run_rank` on two processes joined over `backend`; each rank's results."""
    mp.spawn(run_rank, args=(backend, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both gloo ranks' results, from one spawn."""
    return _spawn("gloo", tmp_path_factory.mktemp("gloo"))


def _reference_run(scenario: Scenario) -> dict:
    """One torch.nn.BatchNorm1d trained on the whole batches: what the two ranks must add up to."""
    reference = torch.nn.BatchNorm1d(scenario.channels, dtype=DTYPE, **scenario.options)
    reference.load_state_dict(scenario.initial_state())
    steps = []
    for step in range(scenario.steps):
        x, grad_output = scenario.batch(step)
        leaf = x.clone().requires_grad_()
        output = reference(leaf)
        output.backward(grad_output)
        steps.append({"output": output.detach(), "input_grad": leaf.grad,
                      "param_grads": {name: p.grad for name, p in reference.named_parameters()}})
        reference.zero_grad(set_to_none=True)
    state = reference.state_dict()
    reference.eval()
    x_eval = scenario.batch(-1)[0]
    with torch.no_grad():  # per rank: without running statistics, eval normalises each rank's own batch
        eval_output = torch.cat([reference(x_eval[scenario.rank_slice(r)]) for r in range(WORLD_SIZE)])
    return {"steps": steps, "state": state, "eval_output": eval_output}


scenarios = pytest.mark.parametrize("scenario", SCENARIOS, ids=str)


@scenarios
def test_outputs_and_input_gradients_equal_batch_norm_on_the_whole_batch(ranks, scenario):
    expected = _reference_run(scenario)["steps"]
    for step, want in enumerate(expected):
        got = [rank["scenarios"][scenario.name]["steps"][step] for rank in ranks]
        assert_twin_close(torch.cat([g["output"] for g in got]), want["output"], DTYPE, f"output, step {step}")
        assert_twin_close(torch.cat([g["input_grad"] for g in got]), want["input_grad"], DTYPE,
                          f"input gradient, step {step}")


@scenarios
def test_parameter_gradients_summed_over_ranks_equal_the_whole_batch(ranks, scenario):
    expected = _reference_run(scenario)["steps"]
    for step, want in enumerate(expected):
        got = [rank["scenarios"][scenario.name]["steps"][step]["param_grads"] for rank in ranks]
        assert all(g.keys() == want["param_grads"].keys() for g in got)
        for name, grad in want["param_grads"].items():
            assert_twin_close(sum(g[name] for g in got), grad, DTYPE, f"gradient of {name}, step {step}")


@scenarios
def test_running_statistics_and_count_equal_the_whole_batch_on_every_rank(ranks, scenario):
    expected = _reference_run(scenario)["state"]
    for rank, result in enumerate(ranks):
        state = result["scenarios"][scenario.name]["state"]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if value.is_floating_point():
                assert_twin_close(state[key], value, DTYPE, f"{key} on rank {rank}")
            else:
                assert torch.equal(state[key], value), f"{key} on rank {rank}"


@scenarios
def test_eval_output_equals_batch_norm(ranks, scenario):
    expected = _reference_run(scenario)["eval_output"]
    actual = torch.cat([rank["scenarios"][scenario.name]["eval_output"] for rank in ranks])
    assert_twin_close(actual, expected, DTYPE, "eval output")


def test_one_all_gather_forward_and_one_all_reduce_backward(ranks):
    for result in ranks:
        assert result["collectives"] == {"all_gather": 1, "all_reduce": 1}


def test_converted_model_under_ddp_trains_like_the_whole_batch(ranks):
    reference = ddp_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=DDP_LR)
    for step in range(DDP_STEPS):
        x, grad_output = ddp_batch(step)
        output = reference(x)
        (output * grad_output).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        actual = torch.cat([rank["ddp"]["outputs"][step] for rank in ranks])
        assert_twin_close(actual, output.detach(), DTYPE, f"output, step {step}")
    for rank, result in enumerate(ranks):
        for key, value in reference.state_dict().items():
            assert torch.allclose(result["ddp"]["state"][key].to(value.dtype), value, atol=1e-10, rtol=1e-10), (
                f"{key} on rank {rank}")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < WORLD_SIZE
                    or not dist.is_nccl_available(), reason="needs NCCL and two CUDA devices")
def test_nccl_on_two_gpus_equals_batch_norm_on_the_whole_batch(tmp_path):
    results = _spawn("nccl", tmp_path)
    for scenario in SCENARIOS:
        expected = _reference_run(scenario)
        for step, want in enumerate(expected["steps"]):
            got = torch.cat([rank["scenarios"][scenario.name]["steps"][step]["output"] for rank in results])
            assert_twin_close(got, want["output"], DTYPE, f"{scenario}: output, step {step}")
        for key, value in expected["state"].items():
            if value.is_floating_point():
                assert_twin_close(results[0]["scenarios"][scenario.name]["state"][key], value, DTYPE, key)


# Chan's combination and the backward, in this process


@settings(max_examples=40, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda sizes: sum(sizes) > 0),
       channels=st.integers(1, 4), offset=st.sampled_from([0.0, 1e6]), seed=st.integers(0, 2**16))
def test_combined_statistics_equal_one_pass_over_the_whole_batch(sizes, channels, offset, seed):
    x = torch.randn(sum(sizes), channels, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x + offset
    parts = x.split(sizes)
    counts = torch.tensor([[float(len(part))] for part in parts], dtype=torch.float64)
    means = torch.stack([part.mean(0) if len(part) else x.new_zeros(channels) for part in parts])
    m2s = torch.stack([(part - part.mean(0)).square().sum(0) if len(part) else x.new_zeros(channels)
                       for part in parts])
    mean, var, total = combine_statistics(counts, means, m2s)
    assert total == len(x)
    torch.testing.assert_close(mean, x.mean(0), atol=1e-12 * (1 + offset), rtol=1e-12)
    torch.testing.assert_close(var, x.var(0, correction=0), atol=1e-12, rtol=1e-9)


def test_combined_variance_is_accurate_where_sums_of_squares_cancel():
    x = 1e4 + torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))  # float32: σ² = 1, μ² = 1e8
    parts = x.split([600, 400])
    counts = torch.tensor([[600.0], [400.0]])
    means = torch.stack([part.mean(0) for part in parts])
    m2s = torch.stack([(part - part.mean(0)).square().sum(0) for part in parts])
    truth = x.double().var(0, correction=0).float()
    _, var, _ = combine_statistics(counts, means, m2s)
    naive = (x.square().sum(0) / 1000 - x.mean(0).square())  # E[x²] − E[x]²: the cancellation Chan avoids
    torch.testing.assert_close(var, truth, atol=1e-4, rtol=1e-4)
    assert (naive - truth).abs().max() > 1e-2  # the check can tell the stable formula from the naive one


def test_combined_statistics_of_an_empty_batch_are_zero():
    mean, var, total = combine_statistics(torch.zeros(2, 1), torch.zeros(2, 3), torch.zeros(2, 3))
    assert total == 0 and torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))


@pytest.fixture
def single_rank_group(tmp_path):
    """A gloo process group of this process alone, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2), (2, 2, 2, 3)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_sync_function_passes_gradcheck_and_gathers_the_batch_statistics(single_rank_group, shape, affine):
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, dtype=torch.float64, generator=generator) * 2 + 0.5).requires_grad_()
    weight = torch.rand(shape[1], dtype=torch.float64, generator=generator).add(0.5).requires_grad_()
    bias = torch.randn(shape[1], dtype=torch.float64, generator=generator).requires_grad_()
    dims = (0, *range(2, len(shape)))
    n = math.prod(shape[d] for d in dims)

    def sync_batch_norm(x, *params):
        with torch.no_grad():
            mean, var, count = gather_batch_statistics(x, single_rank_group)
        assert count == n
        torch.testing.assert_close(mean, x.mean(dims), atol=1e-12, rtol=0)
        torch.testing.assert_close(var, x.var(dims, correction=0), atol=1e-12, rtol=0)
        weight, bias = params if params else (None, None)
        return SyncBatchNormFunction.apply(x, weight, bias, mean, torch.rsqrt(var + 1e-5), count,
                                           single_rank_group)

    inputs = (x, weight, bias) if affine else (x,)
    assert torch.autograd.gradcheck(sync_batch_norm, inputs, eps=1e-6, atol=1e-8)


def test_world_of_one_rank_normalises_like_batch_norm(single_rank_group):
    reference = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    layer = nnl.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(x), reference(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.state_dict(), reference.state_dict())


def test_fold_copies_a_model_whose_sync_batch_norms_hold_a_process_group(single_rank_group):
    group = dist.new_group([0])
    model = nnl.SyncBatchNorm.convert_sync_batchnorm(
        nnl.Sequential(nnl.Linear(3, 4), torch.nn.BatchNorm1d(4), nnl.Tanh(), nnl.BatchNorm1d(4)), group).eval()
    folded = nnl.fold_batchnorm(model)  # a ProcessGroup cannot be deep-copied: the copy shares it
    assert isinstance(folded[1], torch.nn.Identity) and folded[3].process_group is group
    x = torch.randn(5, 3)
    torch.testing.assert_close(folded(x), model(x))


# convert_sync_batchnorm


def _lesson(namespace, rank: int = 1) -> torch.nn.Module:
    norm = {1: namespace.BatchNorm1d(5), 2: namespace.BatchNorm2d(5)}[rank]
    inner = namespace.Sequential(norm, namespace.Tanh())
    return namespace.Sequential(namespace.Linear(4, 5, bias=False), inner, namespace.BatchNorm1d(5, affine=False),
                                namespace.Linear(5, 2))


@pytest.mark.parametrize("namespace", [torch.nn, nnl], ids=["torch", "normlab"])
def test_convert_replaces_every_batch_norm_keeping_its_parameters_buffers_and_mode(namespace):
    model = _lesson(namespace)
    randomize = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for buffer in (model[1][0].running_mean, model[2].running_var):
            buffer.uniform_(0.5, 2.0, generator=randomize)
    model[1][0].num_batches_tracked.fill_(7)
    model[1][0].weight.requires_grad_(False)
    model[2].eval()
    before = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}

    converted = nnl.SyncBatchNorm.convert_sync_batchnorm(model)

    assert converted is model  # containers are changed in place, as torch's converter does
    assert [type(m).__name__ for m in converted.modules()] == [
        type(m).__name__ for m in torch.nn.SyncBatchNorm.convert_sync_batchnorm(_lesson(torch.nn)).modules()]
    assert isinstance(converted[1][0], nnl.SyncBatchNorm) and isinstance(converted[2], nnl.SyncBatchNorm)
    after = converted.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[name] is tensor for name, tensor in before.items())  # the same tensors, not copies
    assert converted[1][0].weight.requires_grad is False
    assert (converted[1][0].training, converted[2].training) == (True, False)
    assert (converted[2].affine, converted[2].weight, converted[2].bias) == (False, None, None)


def test_convert_keeps_options_and_outputs_of_a_torch_batch_norm_2d():
    original = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=None, bias=False, dtype=torch.float64)
    expected_repr = repr(torch.nn.SyncBatchNorm.convert_sync_batchnorm(original))
    reference = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=None, bias=False, dtype=torch.float64)
    converted = nnl.SyncBatchNorm.convert_sync_batchnorm(original)
    assert converted is not original and repr(converted) == expected_repr
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for _ in range(2):  # no process group: BatchNorm2d's statistics and updates
        assert_twin_close(converted(x), reference(x), DTYPE, "output")
    assert_twin_close(converted.running_var, reference.running_var, DTYPE, "running_var")
    assert original.running_var is converted.running_var


def test_convert_leaves_ghost_and_renorm_layers_alone():
    ghost, renorm = nnl.GhostBatchNorm1d(3, 4), nnl.BatchRenorm1d(3)
    model = nnl.Sequential(ghost, renorm, nnl.BatchNorm3d(3))
    nnl.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert model[0] is ghost and model[1] is renorm and isinstance(model[2], nnl.SyncBatchNorm)
