"""The memory plan, the measured peak, --max-memory, --plan, and --optim adamw8bit (adamw8bit.py)."""
import signal

import pytest
import torch

import adamw8bit
import common
import memory_plan
from conftest import metrics, popen, read_json, run, wait_for

CPU = torch.device("cpu")
GRU = ["--quick", "--dataset-size", "1500", "--batch-size", "8", "--precision", "fp32"]


# -- 8-bit quantization and the optimizer

def test_the_dynamic_codes_span_seven_decades_per_sign():
    signed, unsigned = adamw8bit.dynamic_codes(signed=True), adamw8bit.dynamic_codes(signed=False)
    assert len(signed) == len(unsigned) == 255  # fits a uint8 index
    assert torch.equal(signed, signed.sort().values) and torch.equal(signed, -signed.flip(0))
    assert signed[0] == -1 and signed[-1] == 1 and 0 in signed and unsigned[0] == 0 and unsigned[-1] == 1
    pos = signed[signed > 0]
    assert pos.min() == pytest.approx(1e-6) and (pos > 0.1).sum() == 64  # most codes near the block's largest


def test_quantize_rounds_each_value_to_its_nearest_code_times_the_block_absmax():
    torch.manual_seed(0)
    x = torch.randn(5000) * torch.logspace(-8, 0, 5000)  # magnitudes over eight decades
    x[:3] = 0
    for signed, values in ((True, x), (False, x.abs())):
        codes = adamw8bit.dynamic_codes(signed)
        idx, absmax = adamw8bit.quantize(values, adamw8bit.code_table(codes), 2048)
        assert idx.dtype == torch.uint8 and idx.numel() == 3 * 2048 and absmax.shape == (3,)
        # the reference: brute force over all 255 codes, block by block
        blocks = torch.nn.functional.pad(values, (0, 3 * 2048 - 5000)).view(3, 2048)
        ref_absmax = blocks.abs().amax(dim=1)
        ref_idx = ((blocks / ref_absmax[:, None])[..., None] - codes).abs().argmin(dim=-1).view(-1)
        assert torch.equal(absmax, ref_absmax)
        y = adamw8bit.dequantize(idx, absmax, codes, values)
        ref = (codes[ref_idx].view(3, 2048) * ref_absmax[:, None]).view(-1)[:5000]
        # the table reads a value rounded to fp16 first (0.05 %): only a value that close to a
        # midpoint between two codes may take the other one
        assert (idx.long() != ref_idx).float().mean() < 0.01
        assert ((y - values).abs() <= (ref - values).abs() + 1e-3 * values.abs() + 1e-12).all()
        big = values.abs() > 0.1 * absmax.repeat_interleave(2048)[:5000]
        assert ((y - values).abs() / values.abs())[big].max() < 0.08  # within the top decade: 64 codes


def test_adamw8bit_equals_torch_adamw_on_tensors_under_4096_values():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(40, 50))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    ours = adamw8bit.AdamW8bit([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(40, 50)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b)


def test_adamw8bit_takes_adamws_step_from_the_dequantized_moments_then_stores_them_again():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100, 100))
    opt = adamw8bit.AdamW8bit([p], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    cm, cr = adamw8bit.dynamic_codes(signed=True), adamw8bit.dynamic_codes(signed=False)
    tm, tr = adamw8bit.code_table(cm), adamw8bit.code_table(cr)
    w, m, v = p.detach().clone(), torch.zeros(100, 100), torch.zeros(100, 100)
    for t in range(1, 6):
        g = torch.randn(100, 100)
        p.grad = g.clone()
        opt.step()
        # the reference: AdamW's update in fp32, from the moments as they were stored
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        w = w * (1 - 1e-2 * 0.1) - 1e-2 / (1 - 0.9 ** t) * m / ((v / (1 - 0.99 ** t)).sqrt() + 1e-8)
        assert torch.allclose(p.detach(), w, rtol=0, atol=1e-5)
        st = opt.state[p]
        mi, _ = adamw8bit.quantize(m, tm, 2048)
        ri, _ = adamw8bit.quantize(v.sqrt(), tr, 2048)
        assert (st["m_idx"] != mi).float().mean() < 1e-3 and (st["r_idx"] != ri).float().mean() < 1e-3
        m = adamw8bit.dequantize(st["m_idx"], st["m_absmax"], cm, m)  # what the next step starts from
        v = adamw8bit.dequantize(st["r_idx"], st["r_absmax"], cr, v).square()


def test_adamw8bit_state_is_under_a_third_of_adamws_and_survives_a_save_and_load(tmp):
    p = torch.nn.Parameter(torch.randn(1000, 1000))
    full, small = torch.optim.AdamW([p]), adamw8bit.AdamW8bit([p])
    p.grad = torch.randn(1000, 1000)
    full.step()
    small.step()
    assert memory_plan.optimizer_state_bytes(small) == memory_plan.optimizer_state_bytes(small, planned=True)
    assert memory_plan.optimizer_state_bytes(small) / memory_plan.optimizer_state_bytes(full) < 0.3
    torch.save(small.state_dict(), tmp / "opt.pt")
    again = adamw8bit.AdamW8bit([p])
    again.load_state_dict(torch.load(tmp / "opt.pt", weights_only=True))
    assert again.state[p]["m_idx"].dtype == torch.uint8  # torch's load would have made it fp32
    assert all(torch.equal(small.state[p][k], again.state[p][k]) for k in ("m_idx", "m_absmax", "r_idx", "r_absmax"))


# -- the plan and the measured peak

def test_the_memory_plan_of_a_known_model():
    model = torch.nn.Sequential(torch.nn.Linear(1000, 2000), torch.nn.ReLU(), torch.nn.Linear(2000, 10))
    B = 64
    loss_fn, batch = (lambda m, b: (m(b["x"]).square().sum(), B)), {"x": torch.randn(B, 1000)}
    acts = memory_plan.activation_bytes(model, loss_fn, batch, CPU, None)
    # saved for backward: the input, ReLU's output (the second Linear's input too), the square's input
    assert acts == B * (1000 + 2000 + 10) * 4
    n = 1000 * 2000 + 2000 + 2000 * 10 + 10
    kw = dict(device=CPU, amp_dtype=None, world=1, log=lambda _: None, worst="rows")
    plan = memory_plan.plan_parts(model, torch.optim.AdamW(model.parameters()), loss_fn, batch, **kw)
    assert plan["weights"] == plan["gradients"] == round(4 * n / 2**20, 1)
    assert plan["optimizer"] == round((8 * n + 4 * 4) / 2**20, 1)  # two fp32 moments, a step per tensor
    assert plan["total"] == round((4 * n * 4 + 16 + acts) / 2**20, 1)
    plan8 = memory_plan.plan_parts(model, adamw8bit.AdamW8bit(model.parameters()), loss_fn, batch, **kw)
    assert plan8["optimizer"] < 0.3 * plan["optimizer"]


def test_without_measure_peak_a_cpu_run_loads_no_profiler_and_measures_nothing(monkeypatch):
    model = torch.nn.Linear(50, 50)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 50)).sum().backward()
    opt.step()
    args = common.make_parser("t", "gru", epochs=1, lr=1e-3, effective_batch=8).parse_args([])
    monkeypatch.setattr(torch.autograd.profiler, "profile", None)  # called, it would raise
    batch = {"x": torch.ones(2, 50)}
    plan = common.memory_plan(args, model, opt, lambda m, b: (m(b["x"]).sum(), 2), batch, device=CPU, amp_dtype=None,
                              world=1, log=lambda _: None, worst="rows")
    assert type(plan.peak) is memory_plan.StepPeak
    with plan.measure(100):
        torch.ones(1000)
    assert plan.figures()["peak_tensor_mb"] is None
    args.measure_peak = True
    plan = common.memory_plan(args, model, opt, lambda m, b: (m(b["x"]).sum(), 2), batch, device=CPU, amp_dtype=None,
                              world=1, log=lambda _: None, worst="rows")
    assert isinstance(plan.peak, memory_plan.ProfiledPeak)


def test_tensor_peak_counts_what_the_largest_step_allocates_on_top_of_what_it_holds():
    model = torch.nn.Linear(500, 500)
    opt = torch.optim.AdamW(model.parameters())
    peak = memory_plan.ProfiledPeak(CPU, model, opt)
    with peak.measure(100):  # a fresh AdamW has no state yet: not measured
        torch.ones(1_000_000)
    assert peak.mb is None
    model(torch.ones(1, 500)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    held = 3 * 501 * 500 * 4 + 2 * 4  # weights, two moments, a step count per tensor
    with peak.measure(100):
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(1_000_000)  # 8 MB live here
        del a, b
        c = torch.ones(500_000)
        del c
    assert peak.mb == pytest.approx((held + 8e6) / 2**20, rel=0.02)
    with peak.measure(100):  # a batch no larger than one measured: not measured again
        torch.ones(4_000_000)
    assert peak.mb == pytest.approx((held + 8e6) / 2**20, rel=0.02)
    with peak.measure(200):
        torch.ones(4_000_000)
    assert peak.mb == pytest.approx((held + 16e6) / 2**20, rel=0.02)


def test_plan_prints_the_plan_and_trains_nothing(tmp):
    p = run("train_gru.py", *GRU, "--plan", "--out", "r", cwd=tmp, check=0)
    assert "memory plan: weights" in p.stdout and "nothing trained" in p.stdout
    assert not list((tmp / "r" / "checkpoints").glob("*.pt")) and not (tmp / "r" / "summary.json").exists()
    p = run("memory_optimizer.py", "plan", "gru", *GRU, cwd=tmp, check=0)
    assert "memory plan: weights" in p.stdout
    assert sorted(f.name for f in tmp.iterdir()) == ["r"]  # a temporary folder, gone


def test_max_memory_lowers_the_probed_micro_batch_and_keeps_the_effective_batch(tmp):
    auto = ["--quick", "--dataset-size", "1500", "--precision", "fp32", "--plan"]
    p = run("train_gru.py", *auto, "--out", "a", cwd=tmp, check=0)
    assert "batch 16 x 4 accumulation = 64" in p.stdout
    # under what this process already holds: nothing fits, so the probe halves down to 1
    p = run("train_gru.py", *auto, "--max-memory", "0.05", "--out", "b", cwd=tmp, check=0)
    assert "over --max-memory 0.05" in p.stdout
    assert "batch 1 x 64 accumulation = 64" in p.stdout


def test_a_resume_keeps_the_optimizer_it_was_trained_with(tmp):
    run("train_gru.py", *GRU, "--max-steps", "4", "--optim", "adamw8bit", "--out", "r", cwd=tmp, check=0)
    p = run("train_gru.py", *GRU, "--max-steps", "8", "--out", "r", cwd=tmp, check=2)
    assert "trained with AdamW8bit (--optim adamw8bit), this run builds AdamW" in p.stderr and "Traceback" not in p.stderr


def test_adamw8bit_kill_9_then_resume_equals_an_uninterrupted_run(tmp):
    flags = [*GRU, "--optim", "adamw8bit", "--max-steps", "16", "--save-every", "5", "--log-every", "2"]
    run("train_gru.py", *flags, "--out", "ref", cwd=tmp, check=0)
    proc = popen("train_gru.py", *flags, "--out", "killed", cwd=tmp)
    wait_for(lambda: (tmp / "killed" / "status.json").exists() and
             read_json(tmp / "killed" / "status.json").get("step", 0) >= 8, what="step 8")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = run("train_gru.py", *flags, "--out", "killed", cwd=tmp, check=0)
    assert "resumed from" in p.stdout
    assert metrics(tmp / "killed") == metrics(tmp / "ref")
    ref, got = (read_json(tmp / d / "summary.json") for d in ("ref", "killed"))
    assert ref["value"] == got["value"] and got["optim"] == "adamw8bit"
    assert got["optimizer_state_mb"] < 0.3 * 4 * got["params"] * 2 / 2**20  # AdamW: 8 bytes a weight


def test_activations_are_measured_on_one_and_two_items_and_extended_to_the_batch():
    model = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    sizes = []

    def loss_fn(m, b):
        sizes.append(len(b["x"]))
        return m(b["x"]).square().sum(), len(b["x"])
    assert memory_plan.activation_bytes(model, loss_fn, {"x": torch.randn(64, 100)}, CPU, None) == 64 * 310 * 4
    assert sizes == [1, 2]  # a whole micro-batch's forward would hold its activations before training
    # a part per step (here a constant tensor saved once, whatever the batch) is counted once
    const = torch.randn(1000)

    def with_const(m, b):
        return (m(b["x"]).square().sum() + (const * const.detach().clone().requires_grad_()).sum()), len(b["x"])
    # (the product saves `const`, 4,000 bytes, for the gradient of the other factor)
    assert memory_plan.activation_bytes(model, with_const, {"x": torch.randn(64, 100)}, CPU, None) == 64 * 310 * 4 + 4000
