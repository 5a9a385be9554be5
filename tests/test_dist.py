"""``looper.dist``: device choice, the collectives (identities on one process, real sums and
gathers on two gloo ranks), global-norm clipping over FSDP2 shards, and full state dicts
gathered on rank 0 -- checked against naive computations on an unsharded copy.

The two-rank checks share one torchrun launch (process start-up dominates on 2 cores).
"""

from __future__ import annotations

import math

import pytest
import torch

from looper import dist
from looper.config import ConfigError


# --------------------------------------------------------------------------- one process


def test_pick_device():
    assert dist.pick_device("cpu") == torch.device("cpu")
    assert dist.pick_device("cpu", local_rank=3) == torch.device("cpu")
    auto = dist.pick_device("auto", local_rank=0)
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "CPU", "", "mps"):
        with pytest.raises(ConfigError, match="run.device"):
            dist.pick_device(bad)
    if torch.cuda.is_available():
        assert dist.pick_device("cuda", local_rank=0) == torch.device("cuda", 0)
    else:
        with pytest.raises(ConfigError, match="run.device: cuda"):
            dist.pick_device("cuda")


def test_init_distributed_rejects_a_bad_device():
    with pytest.raises(ConfigError, match="run.device"):
        dist.init_distributed("tpu")


_FAULTS = """
import json, resource, torch
from looper import dist
dist.init_distributed("cpu")
for _ in range(10):  # 64 MiB, allocated, touched and freed: glibc's heap settles first
    torch.empty(64 << 18).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(64 << 18).fill_(1.0)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "retained": dist.retain_freed_memory()}))
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallopt"), reason="glibc only")
def test_a_cpu_process_reuses_freed_memory_without_page_faults(run_python):
    """After init_distributed on CPU, a freed 64 MiB block is reused: once the heap has
    settled, allocating it five more times costs almost no page faults. With
    LOOPER_MALLOC=system glibc unmaps it on every free and each allocation faults its
    16,384 pages in again."""
    import json

    kept = json.loads(run_python(_FAULTS).stdout.strip().splitlines()[-1])
    system = json.loads(run_python(_FAULTS, env={"LOOPER_MALLOC": "system"}).stdout.strip().splitlines()[-1])
    assert kept["retained"] and not system["retained"]
    assert system["faults"] > 5 * 16_000
    assert kept["faults"] < 2_000


_EXIT_IN_GROUP = """
import atexit, os, torch, torch.distributed as tdist
from looper import dist
# registered first, so it runs last: after looper's own exit handler
atexit.register(lambda: print("in group at exit:", tdist.is_initialized(), flush=True))
dist.init_distributed("cpu")
dist.init_distributed("cpu")  # a second call registers nothing more
tdist.all_reduce(torch.ones(3), async_op=True).wait()  # finished work, held by the group
if os.environ.get("FAIL"):
    raise RuntimeError("the run failed")
"""


def test_a_process_that_exits_in_its_group_leaves_it_at_exit(run_python):
    """A script that never calls ``dist.destroy`` still leaves its process group, in
    atexit while the interpreter is whole (a gloo rank torn down later can abort). After an
    uncaught exception it stays in: leaving could wait on a peer that is not coming."""
    out = run_python(_EXIT_IN_GROUP).stdout
    assert out.strip().splitlines()[-1] == "in group at exit: False"
    with pytest.raises(AssertionError) as failed:
        run_python(_EXIT_IN_GROUP, env={"FAIL": "1"})
    assert "RuntimeError: the run failed" in str(failed.value)
    assert "in group at exit: True" in str(failed.value)


_GATHER_AND_EXIT = """
import torch, torch.distributed as tdist
from looper import dist
dist.init_distributed("cpu")
out = [torch.empty(1) for _ in range(tdist.get_world_size())]
tdist.all_gather(out, torch.tensor([float(tdist.get_rank())]))
"""


@pytest.mark.slow
def test_ranks_that_exit_without_destroy_exit_cleanly(run_torchrun):
    """Five gloo ranks gather once and exit without ``dist.destroy``. Torn down after the
    interpreter, most such runs had a rank abort (``terminate called without an active
    exception``): 4 of 6 runs of five ranks here, before looper left the group at exit.
    Three runs in a row must all exit 0."""
    for _ in range(3):
        run_torchrun(_GATHER_AND_EXIT, nproc=5, timeout=120)


def test_collectives_are_identities_on_one_process():
    env = dist.init_distributed("cpu")
    env_again = dist.init_distributed("cpu")  # safe to call twice
    assert (env.rank, env.world_size, env.local_rank, env.device) == (0, 1, 0, torch.device("cpu"))
    assert env_again == env and env.is_main and dist.is_main()
    assert dist.get_rank() == 0 and dist.get_world_size() == 1

    x = torch.tensor([1.5, -2.0, 3.0], requires_grad=True)
    y = dist.all_reduce_sum(x)
    assert torch.equal(y, x.detach()) and y is not x and not y.requires_grad
    y += 1  # a new tensor: the input is untouched
    assert torch.equal(x.detach(), torch.tensor([1.5, -2.0, 3.0]))
    assert torch.equal(dist.all_reduce_mean(torch.tensor([4.0, 6.0])), torch.tensor([4.0, 6.0]))

    obj = {"a": [1, 2], "b": None}
    assert dist.broadcast_object(obj) is obj
    assert dist.all_gather_object(obj) == [obj] and dist.all_gather_object(obj)[0] is obj
    dist.barrier()  # no-op, must not hang
    with dist.main_first():
        pass


def test_clip_grad_norm_one_process_matches_the_naive_norm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    naive = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    # max_norm <= 0 means no clipping: the norm is reported and the gradients kept
    norm = dist.clip_grad_norm(params, 0.0)
    assert norm.item() == pytest.approx(naive, rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    norm = dist.clip_grad_norm(params, naive / 4)
    assert norm.item() == pytest.approx(naive, rel=1e-6)  # the pre-clip norm
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (naive / 4) / (naive + 1e-6))


# --------------------------------------------------------------------------- two gloo ranks

TWO_RANKS = r"""
import copy, os, sys
import torch
from looper import dist

out = os.path.join(OUT_DIR, "rank")
env = dist.init_distributed("cpu")
rank = env.rank
res = {"rank": rank, "world": env.world_size, "is_main": env.is_main}

x = torch.tensor([float(rank), 1.0, 10.0 * rank])
s = dist.all_reduce_sum(x)
res["sum"], res["x_after"] = s.tolist(), x.tolist()
res["mean"] = dist.all_reduce_mean(torch.tensor([float(rank) * 4.0])).tolist()
res["bcast"] = dist.broadcast_object({"from": rank, "payload": list(range(rank + 2))})
res["bcast1"] = dist.broadcast_object(f"rank{rank}", src=1)
res["gather"] = dist.all_gather_object(("r", rank, [rank] * (rank + 1)))

flag = os.path.join(OUT_DIR, "main_first.flag")
with dist.main_first():
    if rank == 0:
        open(flag, "w").close()
    else:
        res["saw_flag"] = os.path.exists(flag)

# a small model: two "layers" sharded on their own, then the root; uneven row counts
# (5 and 7 rows over 2 ranks) and one frozen parameter
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
)
model[2].bias.requires_grad_(False)
ref = copy.deepcopy(model)
dist.shard_model(model, [model[0], model[2]], env.device)
res["local_rows"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}

def batch(r):
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(4 + r, 6, generator=g), torch.randn(4 + r, 3, generator=g)

xb, yb = batch(rank)
((model(xb) - yb) ** 2).mean().backward()  # FSDP averages the ranks' gradients
# naive reference: the mean of both ranks' losses, on the unsharded copy
((sum(((ref(bx) - by) ** 2).mean() for bx, by in map(batch, range(2)))) / 2).backward()
trainable = [p for p in model.parameters() if p.requires_grad]
res["ref_grads"] = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
res["max_norm"] = 0.1
res["norm"] = dist.clip_grad_norm(trainable, res["max_norm"]).item()
res["clipped"] = {n: dist.full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}

# perturb the sharded weights the same way on both ranks, then gather
with torch.no_grad():
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        q.add_(0.5 * torch.arange(q.numel(), dtype=q.dtype).reshape(q.shape) / q.numel())
        p.copy_(torch.distributed.tensor.distribute_tensor(q.detach(), p.device_mesh, p.placements))
res["full"] = dist.gather_full_state_dict(model, trainable_only=False)
res["full_trainable"] = dist.gather_full_state_dict(model, trainable_only=True)
res["ref_state"] = {k: v.clone() for k, v in ref.state_dict().items()}
res["ref_trainable"] = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
torch.save(res, out + str(rank) + ".pt")
dist.destroy()
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from conftest import run_torchrun  # the fixture's helper (fixtures are per test)

    work = tmp_path_factory.mktemp("dist2")
    run_torchrun(f"OUT_DIR = {str(work)!r}\n" + TWO_RANKS, nproc=2, timeout=240, workdir=work)
    return [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_two_rank_reductions_and_objects(two_ranks):
    for r, res in enumerate(two_ranks):
        assert (res["rank"], res["world"], res["is_main"]) == (r, 2, r == 0)
        assert res["sum"] == [0.0 + 1.0, 2.0, 10.0]  # ranks 0 and 1: [0,1,0] + [1,1,10]
        assert res["x_after"] == [float(r), 1.0, 10.0 * r]  # the input is untouched
        assert res["mean"] == [2.0]  # (0 + 4) / 2
        assert res["bcast"] == {"from": 0, "payload": [0, 1]}
        assert res["bcast1"] == "rank1"
        assert res["gather"] == [("r", 0, [0]), ("r", 1, [1, 1])]  # in rank order
    assert two_ranks[1]["saw_flag"] is True  # rank 0 ran the main_first body first


@pytest.mark.slow
def test_two_rank_clip_grad_norm_equals_the_unsharded_norm(two_ranks):
    # the parameters really are split: 5 rows -> 3 + 2, 7 rows -> 4 + 3
    assert two_ranks[0]["local_rows"]["0.weight"] == (3, 6) and two_ranks[1]["local_rows"]["0.weight"] == (2, 6)
    assert two_ranks[0]["local_rows"]["2.weight"] == (4, 5) and two_ranks[1]["local_rows"]["2.weight"] == (3, 5)
    ref = two_ranks[0]["ref_grads"]
    assert "2.bias" not in ref  # frozen
    naive = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ref.values()))
    assert naive > 2 * two_ranks[0]["max_norm"], "the test must actually clip"
    coef = two_ranks[0]["max_norm"] / (naive + 1e-6)
    for res in two_ranks:
        assert res["norm"] == pytest.approx(naive, rel=1e-5)  # the same global norm on each rank
        assert sorted(res["clipped"]) == sorted(ref)
        for name, g in ref.items():
            torch.testing.assert_close(res["clipped"][name], g * coef, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_two_rank_full_state_dict_on_rank_zero(two_ranks):
    main, other = two_ranks
    ref = main["ref_state"]
    assert sorted(main["full"]) == sorted(ref)
    for k, v in ref.items():
        t = main["full"][k]
        assert type(t) is torch.Tensor and t.device.type == "cpu" and t.shape == v.shape, k
        assert torch.equal(t, v), k
    assert sorted(main["full_trainable"]) == sorted(main["ref_trainable"])
    assert "2.bias" not in main["full_trainable"]
    for k, v in main["ref_trainable"].items():
        assert type(main["full_trainable"][k]) is torch.Tensor and torch.equal(main["full_trainable"][k], v), k
    # rank 1 gets nothing from either gather
    assert other["full"] == {} and other["full_trainable"] == {}
