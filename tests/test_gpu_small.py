"""Small CUDA-path fixes (issue 32, items 5, 10, 12), proven on a CPU: each test replaces the
`torch.cuda` / `torch.distributed` functions at the boundary with what a GPU machine would answer."""
import types

import pytest
import torch
import torch.distributed as dist

import adamw8bit
import common
import ddp
import memory_optimizer


# -- item 10: AdamW8bit copies its code tables to the weight's device once, not every step

def test_adamw8bit_copies_its_code_tables_to_the_device_once_not_every_step(monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(100, 100)), torch.nn.Parameter(torch.randn(5000)),
              torch.nn.Parameter(torch.randn(10))]  # two 8-bit tensors and one small fp32 one
    opt = adamw8bit.AdamW8bit(params, lr=1e-2)
    host = {id(t) for t in (*opt.codes.values(), *opt.tables.values())}
    copies = []
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):  # on a GPU each of these is a host-to-device copy
        moved = to(self, *args, **kwargs)
        if id(self) in host:
            copies.append(moved)
        return moved

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if step == 0:
            first = copies[:]
    assert len(copies) == len(first), "a later step copied the code tables again"
    assert len(first) == 4  # codes and table, signed and unsigned, once for the one device
    assert all(a is b for a, b in zip(opt.on_device[torch.device("cpu")], first))  # the cached copies
    # the copies are not state: a checkpoint holds the moments, never the 65,536-entry tables
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups"}
    assert all(v.numel() != 65536 for st in saved["state"].values() for v in st.values()
               if isinstance(v, torch.Tensor))


# -- item 12: NCCL is not built on Windows: DDP on CUDA falls back to gloo

@pytest.mark.parametrize("device,nccl,backend", [("cuda", False, "gloo"), ("cuda", True, "nccl"),
                                                 ("cpu", True, "gloo")])
def test_ddp_asks_for_nccl_only_where_torch_has_it(monkeypatch, tmp_path, device, nccl, backend):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    asked = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: asked.append(backend))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)  # False: a Windows (or macOS) build
    monkeypatch.setattr(common, "start_run", lambda *a, **kw: ("log", "status", "stop"))
    args = types.SimpleNamespace(device="cpu")  # "cpu": Ranks() must not call torch.cuda.set_device
    ranks = ddp.Ranks(args)
    assert ranks.start(tmp_path, args, "gru", "loss", {}, torch.device(device, 0)) == ("log", "status", "stop")
    assert asked == [backend]


# -- item 5: `profile`/`config` on torch < 2.5, whose is_bf16_supported has no including_emulation

@pytest.mark.parametrize("major,minor,native", [(7, 5, False), (8, 0, True)])  # a T4, an A100
def test_machine_profile_says_native_bf16_by_capability_on_torch_before_2_5(monkeypatch, major, minor, native):
    import train_lm
    props = types.SimpleNamespace(name="Fake GPU", total_memory=16 * 2**30, major=major, minor=minor)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    # torch 2.3/2.4: no including_emulation, and yes to emulated bf16 on a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(train_lm, "matmul_peak", lambda device, dtype: 1e12)  # would time CUDA matmuls
    prof = memory_optimizer.machine_profile()
    assert prof["gpu_capability"] == f"{major}.{minor}" and prof["bf16_supported"] is native
    # and config recommends from it: fp16 with a GradScaler on the T4, bf16 on the A100
    rec = memory_optimizer.recommend(prof, quick=False)
    assert {t["precision"]["value"] for t in rec.values()} == {"bf16" if native else "fp16"}
