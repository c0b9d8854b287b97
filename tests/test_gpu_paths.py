"""CUDA paths proven on the CPU (issue 32): each test fakes the torch.cuda functions a GPU run
would call (monkeypatched at the torch.cuda boundary) or reproduces the failure with torch's own
CPU objects, and each fails on the code before its fix."""
import argparse
import contextlib
import types
import weakref

import pytest
import torch

import common
import memory_plan

CPU = torch.device("cpu")


def fake_gpu(monkeypatch, *, capability=(8, 0), total_gb=16.0, name="Fake GPU", bf16=True, arch=("sm_75", "sm_80")):
    """torch.cuda as a one-GPU machine would answer it; returns the calls it records."""
    calls = {"fraction": [], "rng": []}
    props = types.SimpleNamespace(name=name, total_memory=int(total_gb * 2**30), major=capability[0],
                                  minor=capability[1])
    for fn, value in {"is_available": lambda: True, "current_device": lambda: 0, "device_count": lambda: 1,
                      "get_device_capability": lambda d=None: capability, "get_device_properties": lambda d=None: props,
                      "get_device_name": lambda d=None: name, "get_arch_list": lambda: list(arch),
                      "is_bf16_supported": lambda: bf16,  # torch < 2.5: no including_emulation argument
                      "set_per_process_memory_fraction": lambda f, d=None: calls["fraction"].append((f, d))}.items():
        monkeypatch.setattr(torch.cuda, fn, value)
    return calls


def device_args(**kw):
    base = dict(device="auto", precision="auto", gpu_memory=None)
    base.update(kw)
    return argparse.Namespace(**base)


# --- item 1: --gpu-memory needs a device with an index -------------------------------------------

def test_gpu_memory_cap_gets_a_device_with_its_index(monkeypatch):
    calls = fake_gpu(monkeypatch)
    dev, _, _, why = common.setup_device(device_args(gpu_memory=4), {})
    # torch.cuda.set_per_process_memory_fraction raises "Expected a torch.device with a specified
    # index" for torch.device("cuda")
    (fraction, d), = calls["fraction"]
    assert d.type == "cuda" and d.index == 0 and fraction == pytest.approx(4 / 16)
    assert dev == d and "capped at 4 of 16 GB" in why


# --- item 5 and 12: bf16 only where native; a GPU older than the build says so ------------------

def test_bf16_is_not_chosen_on_a_t4_with_an_old_torch(monkeypatch):
    fake_gpu(monkeypatch, capability=(7, 5), bf16=True)  # old is_bf16_supported() says yes (emulated)
    _, amp_dtype, scaler, why = common.setup_device(device_args(), {})
    assert amp_dtype == torch.float16 and scaler.is_enabled() and "fp16" in why
    with pytest.raises(common.UserError, match="does not support bf16"):
        common.setup_device(device_args(precision="bf16"), {})


def test_a_gpu_older_than_the_wheel_is_one_line(monkeypatch):
    fake_gpu(monkeypatch, capability=(6, 0), name="Tesla P100", arch=("sm_75", "sm_80", "sm_90", "compute_90"))
    with pytest.raises(common.UserError, match=r"Tesla P100, sm_60\) is older .* \(sm_75 and up\)"):
        common.setup_device(device_args(), {})
    fake_gpu(monkeypatch, capability=(8, 6), arch=("sm_80", "sm_90"))  # sm_86 runs sm_80 kernels
    assert common.setup_device(device_args(), {})[1] == torch.bfloat16


def test_cublas_and_cudnn_allocation_failures_count_as_out_of_memory():
    assert common.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert common.is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not common.is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))


# --- item 2: a resume with another precision loads ----------------------------------------------

def test_resume_from_a_disabled_scaler_into_fp16_loads():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    saved = common.training_state(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), step=3)
    assert saved["scaler"] == {}  # bf16/fp32 runs save an empty scaler state
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)  # e.g. a T4 resuming an A100's run
    common.restore_training_state(saved, model, opt, sched, fp16)  # raised "The source state dict is empty"
    assert fp16.get_scale() == 1024.0
    back = common.training_state(model, opt, sched, fp16)
    common.restore_training_state(back, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False))


# --- item 3: an OOM in backward does not keep the failed try's graph through the retry -----------

class BoomInBackward(torch.autograd.Function):
    """Identity forward; its backward raises CUDA's out-of-memory error for micro-batches over 2."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = len(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return g


def test_oom_in_backward_frees_the_failed_graph_before_the_retry():
    model = torch.nn.Linear(8, 8)
    saved, alive_at_retry = [], []

    def loss_fn(m, mb):
        if saved and not alive_at_retry:
            alive_at_retry.append(saved[0]() is not None)
        z = m(mb["x"])
        saved.append(weakref.ref(z))  # MulBackward saves z: it lives as long as the graph
        return BoomInBackward.apply(z * z).sum(), len(mb["x"])
    batch = {"x": torch.randn(4, 8)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, used = common.train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), batch, loss_fn, 4,
                                   clip=0, device=CPU, amp_dtype=None, log=lambda m: None)
    assert used == 2
    assert alive_at_retry == [False], "the failed micro-batch's graph was still alive at the retry's forward"


# --- item 4: under DDP an OOM is one clear error, not a lone retry -------------------------------

def test_oom_under_ddp_is_one_error_line_with_the_batch_to_use():
    model = torch.nn.Linear(8, 1)

    def oom(m, mb):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
    with pytest.raises(common.UserError, match=r"under torchrun.*--batch-size 2 --grad-accum 4"):
        common.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                          {"x": torch.randn(8, 8)}, oom, 4, clip=0, device=CPU, amp_dtype=None, log=lambda m: None,
                          no_sync=contextlib.nullcontext)


# --- item 7: an OOM inside optimizer.step() is not retried ---------------------------------------

def test_oom_in_the_optimizer_step_is_not_retried(monkeypatch):
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters())
    real_step = opt.step

    def oom_while_making_state(*a, **kw):  # as foreach AdamW would, part-way through creating its state
        opt.state[model.weight]["step"] = torch.tensor(0.0)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
    monkeypatch.setattr(opt, "step", oom_while_making_state)
    batch = {"x": torch.randn(8, 8)}

    def loss_fn(m, mb):
        return m(mb["x"]).square().sum(), len(mb["x"])
    # the old retry called AdamW's real step on half-made state: KeyError 'exp_avg'
    with pytest.raises(common.UserError, match="out of memory in the optimizer step"):
        common.train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), batch, loss_fn, 8, clip=1.0,
                          device=CPU, amp_dtype=None, log=lambda m: None)
    assert real_step is not None


# --- item 6: a resume that sees fewer GPUs -------------------------------------------------------

def test_rng_state_of_two_gpus_restores_on_one(monkeypatch):
    fake_gpu(monkeypatch)
    set_calls = []

    def set_rng_state(state, device="cuda"):
        if device not in (0, "cuda"):
            raise IndexError("list index out of range")  # torch.cuda.default_generators[1] on one GPU
        set_calls.append(device)

    def set_all(states):  # what torch.cuda.set_rng_state_all does: one set_rng_state per saved GPU
        for i, s in enumerate(states):
            set_rng_state(s, i)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(8, dtype=torch.uint8)] * 2)
    state = common.rng_state()
    assert len(state["cuda"]) == 2
    common.set_rng_state(state)
    assert set_calls == [0]


# --- item 8: the plan counts foreach AdamW's temporary on CUDA -----------------------------------

def test_plan_counts_foreach_adamws_temporary_on_cuda(monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights, almost no activations
    monkeypatch.setattr(memory_plan, "activation_bytes", lambda *a, **kw: 1024)
    weights = sum(p.numel() * 4 for p in model.parameters())
    plan_args = dict(device=torch.device("cuda", 0), amp_dtype=None, world=1, log=lambda m: None, worst="x")
    plan = memory_plan.plan_parts(model, torch.optim.AdamW(model.parameters()), None, {"x": torch.zeros(1)},
                                  **plan_args)
    # the step holds weights + gradients + 2 moments + sqrt(exp_avg_sq) of every weight at once
    assert plan["total"] * 2**20 == pytest.approx(5 * weights, rel=0.01)
    fused = memory_plan.plan_parts(model, torch.optim.AdamW(model.parameters(), fused=True), None,
                                   {"x": torch.zeros(1)}, **plan_args)
    assert fused["total"] * 2**20 == pytest.approx(4 * weights, rel=0.01) and "step_temporary" not in fused


# --- item 9: the batch probe takes off what the card already holds -------------------------------

def test_probe_counts_memory_already_held(monkeypatch):
    gb = 2**30
    fake_gpu(monkeypatch, total_gb=4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(1.6 * gb), 4 * gb))  # 2.4 GB in use
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: int(0.9 * gb))  # this run's allocator
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: int(0.8 * gb))  # its weights, say
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None: contextlib.nullcontext())
    args = argparse.Namespace(gpu_memory=None, gpu_threshold=90.0)
    tried, logs = [], []

    def probe(bs):  # the step adds 0.15 GB a sample
        tried.append(bs)
        return int(bs * 0.15 * gb)
    # 90 % of 4 GB = 3.6 GB, less 1.5 GB others hold and 0.8 GB this run holds: 1.3 GB for the step.
    # The old limit (3.6 GB) kept 16 (2.4 GB), which fails at step 1
    assert common.probe_batch_size(probe, 16, torch.device("cuda", 0), args, logs.append) == 8
    assert tried == [16, 8] and "held by this run" in logs[0]


# --- item 11: summary's peak_mem_mb is the run's peak, though the step meter resets the stats -----

def test_peak_memory_survives_the_step_meters_reset(monkeypatch):
    alloc = {"now": 100 * 2**20, "peak": 900 * 2**20}  # the probe peaked at 900 MB before training

    def reset(d=None):
        alloc["peak"] = alloc["now"]
    for fn, value in {"synchronize": lambda d=None: None, "reset_peak_memory_stats": reset,
                      "max_memory_allocated": lambda d=None: alloc["peak"],
                      "memory_allocated": lambda d=None: alloc["now"]}.items():
        monkeypatch.setattr(torch.cuda, fn, value)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    dev = torch.device("cuda", 0)
    peak = memory_plan.StepPeak(dev, model, opt)
    with peak.measure(10):
        alloc["peak"] = 300 * 2**20  # the step itself peaks at 300 MB
    assert common.peak_memory_mb(dev, peak) == 900.0


# --- item 12: the GRU's recurrence stays fp32 under autocast -------------------------------------

def test_gru_runs_its_recurrence_in_fp32_under_autocast():
    import train_gru
    model = train_gru.CadenceGRU(vocab=50, n_cats=3, emb=8, cat_emb=4, hidden=16, dropout=0.0)
    seen = []
    model.gru.register_forward_pre_hook(lambda m, inp: seen.append((inp[0].dtype, torch.is_autocast_enabled("cpu"))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randint(1, 50, (2, 5)), torch.tensor([0, 1]))
    # on CUDA, ATen's autocast runs cuDNN's RNN in fp16 whatever autocast's dtype: no scaler guards it
    assert seen == [(torch.float32, False)]
    assert logits.dtype == torch.bfloat16  # the head still runs in the autocast dtype


# --- resume with a smaller micro-batch after an out-of-memory error ------------------------------

def test_typed_batch_on_resume_wins_when_the_effective_batch_is_the_same():
    args = argparse.Namespace(effective_batch=8, batch_size=1, grad_accum=8, quick=True, resource_efficient=False)
    sources = {"batch_size": "flag", "grad_accum": "flag"}
    micro, accum, why = common.choose_batch_size(args, sources, CPU, None, lambda m: None, resumed=(2, 4))
    assert (micro, accum) == (1, 8) and "the checkpoint's 2 x 4" in why
    args.batch_size, args.grad_accum, sources = 4, "auto", {"batch_size": "flag", "grad_accum": "default"}
    micro, accum, why = common.choose_batch_size(args, sources, CPU, None, lambda m: None, resumed=(2, 4))
    assert (micro, accum) == (4, 2) and why.startswith("4 x 2 (--batch-size typed), for the checkpoint's 2 x 4: "
                                                       "the same effective batch")  # 2 was derived, not typed
    # another product is a new effective batch: allowed and said (the trainer then calls common.rebatch),
    # with the accumulation that would have kept it
    args.batch_size, args.grad_accum, sources = 4, 4, {"batch_size": "flag", "grad_accum": "flag"}
    micro, accum, why = common.choose_batch_size(args, sources, CPU, None, lambda m: None, resumed=(2, 4))
    assert (micro, accum) == (4, 4) and "a new effective batch (was 8)" in why and "no longer bit-identical" in why
    assert why.endswith("(--batch-size 4 --grad-accum 2 would keep it)")
    args.batch_size, args.grad_accum = 3, 4  # no whole accumulation keeps 8 at micro-batch 3: nothing suggested
    assert "would keep it" not in common.choose_batch_size(args, sources, CPU, None, lambda m: None, resumed=(2, 4))[2]


# --- flags typed on resume: a new learning rate wins and is said ---------------------------------

def test_lr_typed_on_resume_scales_the_rest_of_the_schedule():
    def build(lr):
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    model, opt, sched = build(1e-3)
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        sched.step()
    saved = common.training_state(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    logs = []
    model, opt, sched = build(1e-3)
    common.restore_training_state(saved, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), logs.append)
    assert logs == [] and opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    model, opt, sched = build(5e-4)  # --lr 5e-4 typed on resume (the optimizer state used to put 1e-3 back)
    common.restore_training_state(saved, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), logs.append)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 / 4) and sched.base_lrs == [5e-4]
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 / 5)
    assert logs == ["learning rate 0.0005 as typed, where the checkpoint trained at 0.001: the schedule goes on at "
                    "the new rate; the run is no longer bit-identical to an uninterrupted one"]


def test_tensorboard_without_the_package_is_one_line_before_anything_is_built(monkeypatch):
    import importlib.util
    import train_gru
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(common.UserError, match="--tensorboard: the tensorboard package is not installed"):
        common.resolve_settings(train_gru.parser, ["--tensorboard"], lambda m: None)
