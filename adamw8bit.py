"""adamw8bit.py -- AdamW with 8-bit moments (--optim adamw8bit), imported only under that flag.

How it works (after Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv
2110.02861): each tensor's two moments are cut into blocks of 2,048 values; a block is divided
by its largest magnitude (its absmax, kept in fp32) and each value is stored as the index (uint8)
of the nearest of 255 codes on [-1, 1]. The codes are spaced by decade, not linearly, because
Adam's moments span many decades. A step dequantizes a tensor's moments to fp32, updates them and
the weight exactly as torch.optim.AdamW would, and quantizes them again: only the stored moments
carry rounding. State: 2 bytes per weight + 8 per block, against AdamW's 8 bytes per weight.
"""
import math

import torch


def dynamic_codes(signed):
    """The 255 values an 8-bit moment can take, on [-1, 1] (signed) or [0, 1], sorted.

    A linear 8-bit grid would round every entry under 1/255 of its block's largest to zero, and
    Adam's moments span many decades. So, as in Dettmers et al.'s 8-bit optimizers (arXiv
    2110.02861), the codes are split by decade, 10^0 down to 10^-6, with evenly spaced fractions
    inside each, and more of them in the larger decades: 64, 32, ..., 1 per sign, plus zero
    (unsigned: twice as many per decade). Relative rounding error is about 1 % near the block's
    largest value, and an entry a million times smaller still keeps its decade."""
    mags = torch.cat([torch.linspace(0.1, 1.0, (1 if signed else 2) * 2 ** (6 - k) + 1, dtype=torch.float64)[1:]
                      * 10.0 ** -k for k in range(7)])
    codes = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]) if signed else \
        torch.cat([torch.zeros(1, dtype=torch.float64), mags])
    return codes.sort().values.float()


def code_table(codes):
    """For each of the 65,536 fp16 bit patterns, the index of the code nearest its value: a table
    that quantize reads instead of searching the codes for every value (torch.bucketize took 100
    ns a value on a CPU, 6x the rest of quantize together). fp16 keeps 11 significant bits from
    1 down to 6e-5, and the codes are 0.5 % apart at the closest: rounding to fp16 first moves
    a value at most 0.05 %, so a code is picked over the nearest only that close to a midpoint."""
    p = torch.arange(65536, dtype=torch.int32)
    values = torch.where(p >= 32768, p - 65536, p).to(torch.int16).view(torch.float16).float()
    values = torch.nan_to_num(values, nan=0.0).clamp(float(codes[0]), 1.0)  # NaN, inf: never asked
    return torch.bucketize(values, (codes[1:] + codes[:-1]) / 2).to(torch.uint8)  # midpoints: the boundaries


def quantize(x, table, block):
    """Block-wise 8-bit quantization of a tensor: each block of `block` values is divided by its
    largest magnitude (its absmax, kept in fp32), then rounded to the nearest code through
    `table` (code_table) by its fp16 bit pattern.
    Returns (uint8 indices, padded to whole blocks; fp32 absmax per block)."""
    flat = x.detach().float().reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)  # (blocks, block)
    absmax = flat.abs().amax(dim=1)
    scaled = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    bits = scaled.to(torch.float16).view(torch.int16).int().bitwise_and_(0xFFFF)  # 0..65535
    return table[bits].view(-1), absmax


def dequantize(idx, absmax, codes, like):
    """The inverse of quantize, back to fp32 in the shape of `like`."""
    blocks = codes[idx.int()].view(absmax.numel(), -1) * absmax[:, None]  # int32: uint8 would be a mask
    return blocks.view(-1)[:like.numel()].view_as(like)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, as torch.optim.AdamW) whose two moments are
    stored in 8 bits: 2 bytes per weight plus 8 per block of 2,048, against AdamW's 8 bytes per
    weight. Each step dequantizes a tensor's moments to fp32, updates them and the weight exactly
    as AdamW would, and quantizes them again; only the stored moments carry rounding.
    The second moment is stored as its square root (the gradient's running RMS): that spans half
    the decades, so small entries do not round to zero under a large neighbour, which would
    divide their update by eps alone. Tensors under 4,096 values (biases, norms, small heads)
    keep fp32 moments: their state is small and they are the most sensitive.
    The state is plain tensors, saved and loaded with the checkpoint, and every operation is
    deterministic: a resumed run takes the same steps."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, block=2048, min_size=4096):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.block, self.min_size = block, min_size
        self.codes = {signed: dynamic_codes(signed) for signed in (True, False)}
        self.tables = {signed: code_table(self.codes[signed]) for signed in (True, False)}
        # {device: (codes_m, codes_r, table_m, table_r)} on that device, copied on first use: a
        # copy per tensor per step would be 4 host-to-device copies (and syncs) on a GPU. Not
        # state: rebuilt from the constructor's arguments, never saved in a checkpoint.
        self.on_device = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts every state tensor to the weight's dtype: undo it
            for k in ("m_idx", "r_idx"):
                if k in st:
                    st[k] = st[k].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad.float(), self.state[p]
                small = p.numel() < self.min_size
                if not st:
                    st["step"] = 0
                    if small:
                        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                    else:
                        n = math.ceil(p.numel() / self.block)
                        for k in ("m", "r"):  # absmax 0: every entry dequantizes to 0
                            st[f"{k}_idx"] = torch.zeros(n * self.block, dtype=torch.uint8, device=p.device)
                            st[f"{k}_absmax"] = torch.zeros(n, device=p.device)
                st["step"] += 1
                if p.device not in self.on_device:
                    self.on_device[p.device] = (self.codes[True].to(p.device), self.codes[False].to(p.device),
                                                self.tables[True].to(p.device), self.tables[False].to(p.device))
                codes_m, codes_r, table_m, table_r = self.on_device[p.device]
                if small:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                else:
                    m = dequantize(st["m_idx"], st["m_absmax"], codes_m, g)
                    v = dequantize(st["r_idx"], st["r_absmax"], codes_r, g).square_()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                t = st["step"]
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - b1 ** t))
                if not small:
                    st["m_idx"], st["m_absmax"] = quantize(m, table_m, self.block)
                    st["r_idx"], st["r_absmax"] = quantize(v.sqrt_(), table_r, self.block)
        return loss

    def planned_state_bytes(self, p):
        """The state p will hold once it has taken a step."""
        if p.numel() < self.min_size:
            return 2 * 4 * p.numel()
        n = math.ceil(p.numel() / self.block)
        return 2 * (n * self.block + 4 * n)

