"""train_asr.py: audio and features against first principles, the model's pieces, decoding, and
the real script end to end in subprocesses on CPU with a small built-in speech set."""
import itertools
import json
import math
import re
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_plan_near_peak, call, metrics, read_json, run, tree_digest

sys.argv = sys.argv[:1]  # train_asr builds its parser at import; keep pytest's flags away from it
import train_asr as asr  # noqa: E402
from common import UserError  # noqa: E402

# a small built-in set and the tiny model: learns in about a minute on 2 cores
SMALL = ["--quick", "--dataset-size", "320", "--batch-size", "16"]


# -----------------------------------------------------------------------------
# audio

def write_pcm(path, x, rate, width, channels=1):
    """x (samples, channels) floats in [-1, 1] -> PCM WAV of the given sample width."""
    x = np.asarray(x, np.float64).reshape(len(x), channels)
    if width == 1:
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.round(x * (2**23 - 1)).astype(np.int32).reshape(-1)
        raw = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], 1).astype(np.uint8).tobytes()
    else:
        raw = np.round(x * (2 ** (8 * width - 1) - 1)).astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def tone(freq, rate, seconds=0.5, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


@pytest.mark.parametrize("width,tol", [(1, 1 / 100), (2, 1e-4), (3, 1e-6), (4, 1e-7)])
def test_wav_reader_reads_every_pcm_width(tmp, width, tol):
    x = tone(440, 16000)
    write_pcm(tmp / "a.wav", x, 16000, width)
    got = asr.read_wav(tmp / "a.wav").numpy()
    assert got.shape == x.shape and np.abs(got - x).max() < tol


def test_wav_reader_mixes_stereo_down(tmp):
    left, right = tone(440, 16000), tone(1000, 16000, amp=0.25)
    write_pcm(tmp / "s.wav", np.stack([left, right], 1), 16000, 2, channels=2)
    got = asr.read_wav(tmp / "s.wav").numpy()
    assert np.abs(got - (left + right) / 2).max() < 1e-4


@pytest.mark.parametrize("rate", [44100, 8000, 22050, 48000])
def test_wav_reader_resamples_to_16k(tmp, rate):
    write_pcm(tmp / "r.wav", tone(1000, rate, seconds=1.0), rate, 2)
    got = asr.read_wav(tmp / "r.wav").numpy()
    want = tone(1000, 16000, seconds=1.0)
    assert abs(len(got) - len(want)) <= 1
    inner = slice(200, len(want) - 200)  # the filter's edges see zeros beyond the file
    assert np.abs(got[inner] - want[inner]).max() < 5e-3


def test_extensible_24_bit_wav_is_read(tmp):
    # sox/ffmpeg write 24-bit as WAVE_FORMAT_EXTENSIBLE with a PCM SubFormat GUID
    x = tone(440, 16000)
    v = np.round(x * (2**23 - 1)).astype(np.int32)
    data = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], 1).astype(np.uint8).tobytes()
    guid = (1).to_bytes(2, "little") + bytes.fromhex("000000001000800000aa00389b71")
    fmt = ((0xFFFE).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
           + (48000).to_bytes(4, "little") + (3).to_bytes(2, "little") + (24).to_bytes(2, "little")
           + (22).to_bytes(2, "little") + (24).to_bytes(2, "little") + (4).to_bytes(4, "little") + guid)
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    (tmp / "x.wav").write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    assert np.abs(asr.read_wav(tmp / "x.wav").numpy() - x).max() < 1e-6
    assert asr.wav_duration(tmp / "x.wav") == pytest.approx(0.5)


def test_odd_rates_resample_with_a_bounded_filter():
    # 15999 Hz shares no factor with 16 kHz: exact polyphase would need 16000 phases
    x = torch.tensor(tone(1000, 15999, seconds=1.0), dtype=torch.float32)
    t0 = time.perf_counter()
    y = asr.resample(x, 15999, 16000)
    assert time.perf_counter() - t0 < 30  # not a timing target: the unbounded filter took minutes and GBs
    spectrum = np.abs(np.fft.rfft(y.numpy(), 16000))  # 1 Hz bins at 16 kHz
    assert abs(len(y) - 16000) <= 1 and abs(int(spectrum.argmax()) - 1000) <= 1


def test_resampling_down_removes_what_the_new_rate_cannot_carry(tmp):
    # 7 kHz is above the Nyquist rate of 8 kHz audio: it must vanish, not fold back to 1 kHz
    x = torch.tensor(tone(7000, 16000, seconds=1.0), dtype=torch.float32)
    y = asr.resample(x, 16000, 8000)
    assert y[200:-200].abs().max() < 0.02 * x.abs().max()


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00", b"not a wav file at all" * 10])
def test_corrupt_wav_is_a_user_error_naming_the_file(tmp, content):
    (tmp / "bad.wav").write_bytes(content)
    with pytest.raises(UserError, match="bad.wav: not a readable PCM WAV"):
        asr.read_wav(tmp / "bad.wav")


def truncated_manifest(tmp, ext=".jsonl"):
    """Four 0.5 s WAVs in a manifest (a blank line before the third row); the third lost the last
    3,000 bytes of its samples, as a copy cut short does. Returns the manifest's path."""
    rows = []
    for i in range(4):
        write_pcm(tmp / f"u{i}.wav", tone(300 + 100 * i, 16000), 16000, 2)
        rows.append({"audio_filepath": f"u{i}.wav", "text": "ab"})
    cut = (tmp / "u2.wav").read_bytes()
    (tmp / "u2.wav").write_bytes(cut[:-3000])
    if ext == ".csv":
        lines = ["path,text"] + [f"{r['audio_filepath']},{r['text']}" for r in rows]
    else:
        lines = [json.dumps(r) for r in rows]
    lines.insert(len(lines) - 2, "")
    (tmp / f"m{ext}").write_text("\n".join(lines) + "\n")
    return tmp / f"m{ext}"


@pytest.mark.parametrize("ext,line", [(".jsonl", 4), (".csv", 5)])
def test_truncated_wav_is_a_bad_row(tmp, ext, line):
    # the audit: `wave` returns what is there, so a clip cut mid-data trained on its whole transcript
    m = truncated_manifest(tmp, ext)
    with pytest.raises(asr.TruncatedWav, match=r"u2.wav: truncated: 3,000 bytes of samples missing \(0.09 s of its 0.50"):
        asr.read_wav(tmp / "u2.wav")
    with pytest.raises(asr.TruncatedWav, match="u2.wav: truncated"):
        asr.wav_duration(tmp / "u2.wav")  # the header-only check every manifest row gets
    lines = []
    items, bad = asr.read_manifest(m, "--train-manifest", "skip", log=lines.append)
    assert [Path(it["path"]).name for it in items] == ["u0.wav", "u1.wav", "u3.wav"] and bad == 1
    assert lines == [f"warning: --train-manifest {m}: {tmp / 'u2.wav'}: truncated: 3,000 bytes of samples missing "
                     "(0.09 s of its 0.50 s); copy or convert it again; skipped",
                     f"--train-manifest {m}: 1 bad rows skipped"]
    p = call("train_asr.py", "--train-manifest", m.name, "--bad-rows", "fail", "--max-steps", "1", cwd=tmp)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error: --train-manifest {m.name}: line {line}: u2.wav: truncated") and \
        "(--bad-rows skip drops such rows)" in p.stderr, p.stderr
    assert not (tmp / "runs").exists()


def test_a_streamed_wav_whose_header_gives_no_size_is_not_truncated(tmp):
    # ffmpeg writing to a pipe cannot seek back: its data chunk says 0xFFFFFFFF bytes
    import wave
    with wave.open(str(tmp / "s.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(800, np.int16).tobytes())
    raw = bytearray((tmp / "s.wav").read_bytes())
    i = raw.find(b"data")
    raw[i + 4:i + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp / "s.wav").write_bytes(bytes(raw))
    assert asr.missing_bytes(bytes(raw), len(raw)) == 0


def test_float_wav_is_refused_with_how_to_convert(tmp):
    data = np.zeros(100, np.float32).tobytes()  # IEEE float (format 3), which `wave` does not read
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little") + \
        (64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    (tmp / "f.wav").write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    with pytest.raises(UserError, match=r"f.wav: .*ffmpeg"):
        asr.read_wav(tmp / "f.wav")


# -----------------------------------------------------------------------------
# features

def test_log_mel_matches_a_direct_dft():
    noise = np.random.default_rng(0).normal(0, 0.01, 4800)  # so every band has energy to compare
    x = torch.tensor(tone(1000, 16000, seconds=0.3) + tone(3100, 16000, seconds=0.3, amp=0.2) + noise,
                     dtype=torch.float32)
    got = asr.log_mel(x).double().numpy()  # (frames, 80)
    # by hand: reflect-pad n_fft/2, 400-sample periodic-Hann frames every 160, DFT as a matrix
    xs = np.pad(x.double().numpy(), 200, mode="reflect")
    frames = 1 + len(x) // 160
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    k = np.arange(201)[:, None] * np.arange(400)[None, :]
    dft = np.exp(-2j * np.pi * k / 400)  # (201, 400)
    power = np.stack([np.abs(dft @ (xs[t * 160:t * 160 + 400] * win)) ** 2 for t in range(frames)])
    want = np.log(power @ asr.MEL_FB.double().numpy() + 1e-10)
    assert got.shape == (frames, 80)
    loud = want > want.max() - 14  # within 60 dB of the peak: below that float32 rounding dominates the log
    assert loud.mean() > 0.9 and np.abs(got - want)[loud].max() < 1e-3
    # and the filterbank puts the 1 kHz tone in the band centred nearest 1 kHz
    centres = 700 * (10 ** (np.linspace(0, 2595 * math.log10(1 + 8000 / 700), 82)[1:-1] / 2595) - 1)
    assert got[frames // 2].argmax() == np.abs(centres - 1000).argmin()


def test_normalisation_and_spec_augment():
    f = asr.normalize(torch.randn(300, 80) * 5 + 3)
    assert f.mean(0).abs().max() < 1e-5 and (f.std(0, unbiased=False) - 1).abs().max() < 1e-3
    g = asr.spec_augment(f, torch.Generator().manual_seed(0))
    zero_rows, zero_cols = (g == 0).all(1).sum(), (g == 0).all(0).sum()
    assert 0 < zero_rows <= 60 and 0 < zero_cols <= 27  # one time mask (<= T/5), one frequency mask


def test_speed_perturbation_resamples_each_utterance_by_its_own_draw(tmp):
    t = torch.arange(16000) / 16000
    noise = torch.randn(16000, generator=torch.Generator().manual_seed(1))
    asr.write_wav(tmp / "a.wav", torch.sin(2 * math.pi * 1000 * t) + 0.1 * noise)
    items = [{"path": str(tmp / "a.wav"), "text": "ab"}]
    stoi = {c: i for i, c in enumerate(asr.build_vocab(items))}

    def feats(speed, seed):
        return asr.make_batch(items, [0], stoi, torch.Generator().manual_seed(seed), speed)["feats"][0]
    assert torch.equal(feats(0.2, 0), feats(0.2, 0))  # the draw comes from the (checkpointed) generator
    for seed in range(4):
        # the utterance's first draw is its speed: played `rate` times as fast, 1 s (101 frames) lasts 1 / rate s
        rate = 1 + 0.2 * (2 * float(torch.rand((), generator=torch.Generator().manual_seed(seed))) - 1)
        assert abs(len(feats(0.2, seed)) - (1 + 16000 / rate // 160)) <= 1, (seed, rate)
    assert len(feats(0.0, 0)) == 101
    # SpecAugment then masks the resampled features: at speed 0 exactly what it masks without speed
    assert torch.equal(feats(0.0, 3), asr.spec_augment(asr.normalize(asr.log_mel(asr.read_wav(tmp / "a.wav"))),
                                                       torch.Generator().manual_seed(3)))


# -----------------------------------------------------------------------------
# model

def test_presets_parameter_counts():
    # the seed's table (V = 200, no subsampling): optimized = encoder 6.89M + CTC 0.04M + decoder 2.45M
    args = {"heads": 4, "dropout": 0.1, "subsample": 1}
    m = asr.build_model(asr.PRESETS["optimized"], 200, args)
    enc = sum(p.numel() for p in [*m.encoder.parameters(), *m.input.parameters()])
    assert sum(p.numel() for p in m.parameters()) == 9_381_712
    assert round(enc / 1e6, 2) == 6.89 and sum(p.numel() for p in m.ctc_head.parameters()) == 38_600
    counts = {name: sum(p.numel() for p in asr.build_model(shape, 200, dict(args, subsample=4)).parameters())
              for name, shape in asr.PRESETS.items()}
    # x4 subsampling (32 channels) costs ~0.1M more than the seed's Linear(80, d) front end
    assert 9.4e6 < counts["optimized"] < 9.6e6
    assert counts["original"] > counts["optimized"] > counts["minimal"] > counts["tiny"]
    assert 24.5e6 < counts["original"] < 25.5e6  # d 256, 12 + 6 layers


def tiny_model(subsample=4):
    torch.manual_seed(0)
    return asr.ASRModel(12, 32, 2, 1, heads=4, dropout=0.0, subsample=subsample)


def padded_batch(lengths, U=5):
    torch.manual_seed(1)
    B, T = len(lengths), max(lengths)
    feats = torch.randn(B, T, 80)
    for i, L in enumerate(lengths):
        feats[i, L:] = 0
    tgt = [torch.randint(5, 12, (u,)).tolist() for u in range(2, 2 + B)]
    b = {"feats": feats, "feat_len": torch.tensor(lengths), "chars": torch.zeros(B, U + B, dtype=torch.long),
         "dec_in": torch.zeros(B, U + B + 1, dtype=torch.long), "dec_out": torch.zeros(B, U + B + 1, dtype=torch.long),
         "tgt_len": torch.tensor([len(t) for t in tgt])}
    for i, t in enumerate(tgt):
        b["chars"][i, :len(t)] = torch.tensor(t)
        b["dec_in"][i, :len(t) + 1] = torch.tensor([asr.SOS] + t)
        b["dec_out"][i, :len(t) + 1] = torch.tensor(t + [asr.EOS])
    return b


@pytest.mark.parametrize("subsample", [4, 1])
def test_padding_does_not_change_an_utterance_result(subsample):
    m = tiny_model(subsample).eval()
    b = padded_batch([90, 61, 40])
    with torch.no_grad():
        enc, lens, _ = m.encode(b["feats"], b["feat_len"])
        alone, lens1, _ = m.encode(b["feats"][1:2, :61], b["feat_len"][1:2])
    assert lens[1] == lens1[0]
    assert torch.allclose(enc[1, :lens[1]], alone[0, :lens1[0]], atol=1e-5)


def test_batchnorm_statistics_ignore_padding_in_training():
    # the same utterances with 30 more padded frames: same output on real frames, same statistics
    m = tiny_model().train()
    b = padded_batch([90, 61, 40])
    more = torch.cat([b["feats"], torch.zeros(3, 30, 80)], 1)
    out = []
    for feats in (b["feats"], more):
        torch.manual_seed(0)
        enc, lens, _ = m.encode(feats, b["feat_len"])
        out.append((enc, lens))
    for i in range(3):
        L = out[0][1][i]
        assert torch.allclose(out[0][0][i, :L], out[1][0][i, :L], atol=1e-5)
    bn = m.encoder[0].conv.bn
    assert int(bn.num_batches_tracked) == 2


def test_gradient_checkpointing_same_gradients_and_one_statistics_update():
    grads, stats = [], []
    for ckpt in (False, True):
        m = tiny_model().train()
        m.grad_checkpointing = ckpt
        loss, n = asr.loss_fn(m, padded_batch([90, 61, 40]), 0.3)
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        stats.append([t.clone() for t in m.buffers()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    assert all(torch.equal(a, b) for a, b in zip(*stats))  # running stats updated once, not twice


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_accumulation_over_padded_micro_batches_equals_one_batch(micro):
    # eval mode: BatchNorm uses running statistics (in training mode its batch statistics differ
    # by micro-batch in any BatchNorm model); the test is about the loss normalisation
    grads = {}
    for bs in (4, micro):
        m = tiny_model().eval()
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        before = [p.detach().clone() for p in m.parameters()]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        asr.common.train_step(m, opt, scaler, padded_batch([120, 97, 60, 33]),
                              lambda mod, mb: asr.loss_fn(mod, mb, 0.3), bs, clip=0, device=torch.device("cpu"), amp_dtype=None)
        grads[bs] = [b0 - p.detach() for b0, p in zip(before, m.parameters())]  # SGD lr 1: the gradient
    for a, b in zip(grads[4], grads[micro]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_decoder_is_causal():
    m = tiny_model().eval()
    b = padded_batch([80])
    with torch.no_grad():
        enc, _, pad = m.encode(b["feats"], b["feat_len"])
        tokens = b["dec_in"][:, :5]
        full = m.decode(tokens, enc, pad)
        changed = tokens.clone()
        changed[0, 4] = 7
        assert torch.allclose(full[:, :4], m.decode(changed, enc, pad)[:, :4], atol=1e-6)


# -----------------------------------------------------------------------------
# decoding and metrics

def test_ctc_greedy_merges_repeats_and_drops_blanks():
    B, V = asr.BLANK, 10
    frames = [7, 7, B, 7, 8, 8, B, B, 9, asr.EOS, 9]  # "7 7 8 9 9": a blank splits the repeat
    lp = torch.full((1, len(frames), V), -10.0)
    lp[0, torch.arange(len(frames)), torch.tensor(frames)] = 0
    assert asr.ctc_greedy(lp, torch.tensor([len(frames)])) == [[7, 7, 8, 9, 9]]
    assert asr.ctc_greedy(lp, torch.tensor([3])) == [[7]]  # frames past the length are padding


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0),
                                   ("flaw", "lawn", 2)])
def test_edit_distance(a, b, d):
    assert asr.edit_distance(a, b) == d


def test_error_rates_are_corpus_level():
    cer, wer = asr.error_rates(["ab cd", "efgh"], ["ab cx", "efgh"])
    assert cer == pytest.approx(100 * 1 / 9) and wer == pytest.approx(100 * 1 / 3)


def test_ctc_prefix_scores_equal_brute_force_enumeration():
    # every alignment of T frames over V symbols, collapsed; psi(h) = P(output starts with h)
    torch.manual_seed(0)
    T, V = 5, 7  # ids 0..4 are specials (1 = blank); every non-blank id counts as an output here
    x = torch.randn(T, V, dtype=torch.double).log_softmax(-1)  # rows sum to 1 in double precision
    prob = {}
    for path in itertools.product(range(V), repeat=T):
        out = tuple(c for i, c in enumerate(path) if c != asr.BLANK and (i == 0 or c != path[i - 1]))
        prob[out] = prob.get(out, 0.0) + math.exp(sum(x[t, c] for t, c in enumerate(path)))

    def starts_with(h):
        return sum(p for o, p in prob.items() if o[:len(h)] == tuple(h))

    # the empty prefix, then each prefix extended from its parent's state
    r_n, r_b = torch.full((T, 1), -math.inf, dtype=torch.double), torch.cumsum(x[:, asr.BLANK], 0)[:, None]
    new_n, new_b, psi = asr.ctc_prefix_scores(x, r_n, r_b, torch.tensor([asr.PAD]), first=True)
    for c in (5, 6):
        assert math.exp(psi[0, c]) == pytest.approx(starts_with([c]), rel=1e-9)
    for c in (5, 6):  # two-character prefixes, repeats included ("5 5" needs a blank between)
        _, _, psi2 = asr.ctc_prefix_scores(x, new_n[:, :, c], new_b[:, :, c], torch.tensor([c]), first=False)
        for c2 in (5, 6):
            assert math.exp(psi2[0, c2]) == pytest.approx(starts_with([c, c2]), rel=1e-9)
        # P(output is exactly h) = r_n + r_b at the last frame
        exact = math.exp(torch.logaddexp(new_n[-1, 0, c], new_b[-1, 0, c]))
        assert exact == pytest.approx(prob.get((c,), 0.0), rel=1e-9)


def test_oom_advice_lists_next_commands_in_order():
    args = asr.parser.parse_args(["--preset", "optimized", "--subsample", "1", "--max-duration", "30"])
    args.precision = "fp32"
    steps = asr.oom_advice(["--preset", "optimized", "--subsample", "1", "--out", "r"], args, torch.device("cuda"))
    assert steps[0].endswith("--precision auto") and "--subsample 4" in steps[1]
    assert "--grad-checkpointing" in steps[2] and steps[3].count("--preset") == 1 and "minimal" in steps[3]
    assert steps[-1].endswith("--max-duration 15") and all("--out r" in s for s in steps)


# -----------------------------------------------------------------------------
# the script end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small built-in-set run, once, for the tests that need a trained model."""
    d = tmp_path_factory.mktemp("asr")
    # 900 s, not run's 300: ~1 min on 2 idle cores, but it must not fail on a shared machine.
    # --measure-peak: on a CPU the profiler measures the peak the plan is checked against only then
    p = run("train_asr.py", *SMALL, "--epochs", "10", "--measure-peak", "--out", "runs/a", cwd=d, check=0, timeout=900)
    return d, d / "runs" / "a", p


def test_quick_run_learns_and_writes_the_run_folder(trained):
    d, out, p = trained
    s = read_json(out / "summary.json")
    # bars: character error well under the 100 % of an untrained model, on held-out speakers/noise
    assert s["val_cer"] < 20 and s["test_cer"] < 25, s
    assert s["trainer"] == "asr" and s["metric"] == "val_cer" and s["subsample"] == 4
    assert_plan_near_peak(s)
    st = read_json(out / "status.json")
    assert st["state"] == "finished" and st["step"] == s["steps"]
    recs = metrics(out)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert max(r["padding"] for r in recs if "padding" in r) < 0.2  # length bucketing works
    assert "device cpu, precision fp32" in p.stdout and "parameters (encoder" in p.stdout
    assert json.loads((out / "vocab.json").read_text())[:5] == asr.SPECIALS
    # one plain line per --log-every interval (10 steps), in train.log as on the console
    log = (out / "train.log").read_text().splitlines()
    lines = [line for line in log if re.search(r"step .* \| loss .* ms/step", line)]
    assert len(lines) == math.ceil(s["steps"] / 10) and "utterances/s | RAM" in lines[-1], lines[-3:]
    assert f"step {s['steps']:>6}/{s['steps']} | loss " in lines[-1]


def test_transcribe_prints_one_line_per_file(trained, tmp):
    d, out, _ = trained
    test = [json.loads(line) for line in (d / "data" / "asr-synthetic-n320-s1337" / "test.jsonl").read_text().splitlines()]
    wavs = [str(d / "data" / "asr-synthetic-n320-s1337" / t["audio_filepath"]) for t in test[:4]]
    p = run("train_asr.py", "--transcribe", *wavs, "--out", out, cwd=tmp, check=0)
    lines = [line.split("\t") for line in p.stdout.splitlines() if "\t" in line]
    assert [w for w, _ in lines] == wavs
    cer, _ = asr.error_rates([t["text"] for t in test[:4]], [h for _, h in lines])
    assert cer < 30


def test_eval_only_reproduces_the_summary_and_writes_only_eval_json(trained):
    """summary.json's validation figure comes from best.pt (report() loads it after the loop: the
    lowest val loss, not the last step), at the run's precision and evaluation batch; --eval-only
    loads the same best.pt at the checkpoint's precision and batch, so every figure is the same
    (compared as both files round them). --resume CKPT scores that checkpoint instead: the last
    one's val CER is metrics.jsonl's at its step. Nothing in the run folder but eval.json changes."""
    d, out, _ = trained
    files = ("status.json", "metrics.jsonl", "train.log", "summary.json", "args.json")
    before = [tree_digest(out / "checkpoints")] + [(out / f).read_bytes() for f in files]
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    p = run("train_asr.py", *SMALL, "--eval-only", "--out", "runs/a", cwd=d, check=0)
    s, e = read_json(out / "summary.json"), read_json(out / "eval.json")
    assert e["metric"] == "val_cer" and e["checkpoint"] == str((out / "checkpoints" / "best.pt").resolve()), e
    for k in ("value", "val_cer", "val_wer", "val_loss", "test_cer", "test_wer", "test_cer_greedy_ctc",
              "test_wer_greedy_ctc", "precision", "device"):
        assert e[k] == pytest.approx(s[k], abs=1e-6) if isinstance(s[k], float) else e[k] == s[k], k
    assert f"eval-only: val CER {s['val_cer']:.2f}%, WER {s['val_wer']:.2f}% (greedy CTC)" in p.stdout
    assert "test (" in p.stdout and not p.stderr.strip(), p.stderr
    last = sorted((out / "checkpoints").glob("ckpt_step*.pt"))[-1]
    run("train_asr.py", *SMALL, "--eval-only", "--out", "runs/a", "--resume", last, "--beam", "1", cwd=d, check=0)
    e = read_json(out / "eval.json")
    rec = [r for r in metrics(out) if r.get("step") == e["step"] and "val_cer" in r][-1]
    assert e["checkpoint"] == str(last.resolve()) and e["val_cer"] == pytest.approx(rec["val_cer"], abs=1e-6)
    assert [tree_digest(out / "checkpoints")] + [(out / f).read_bytes() for f in files] == before
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(listing + [Path("eval.json")])
    # other data flags would score other utterances (a new user's review: without --quick it built and scored
    # the 3,000-utterance set): refused before any data is built, eval.json as it was
    eval_json = (out / "eval.json").read_bytes()
    p = call("train_asr.py", "--eval-only", "--out", "runs/a", cwd=d)
    assert p.returncode == 2 and p.stderr.startswith("error: --eval-only: ") and \
        "was trained with --dataset-size 320 (now 3000); repeat the training command's data flags" in p.stderr, p.stderr
    assert (out / "eval.json").read_bytes() == eval_json and not (d / "data" / "asr-synthetic-n3000-s1337").exists()


def test_eval_only_without_a_checkpoint_is_one_error_and_writes_nothing(tmp):
    p = call("train_asr.py", "--quick", "--eval-only", "--out", "none", cwd=tmp)
    assert p.returncode == 2 and p.stderr.startswith("error: --out none: no checkpoint there"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp / "none").exists()
    p = call("train_asr.py", "--quick", "--eval-only", cwd=tmp)  # no --out and no run under runs/
    assert p.returncode == 2 and "pass --out RUN" in p.stderr and not any(tmp.iterdir()), p.stderr


def test_tensorboard_gets_the_loss_and_the_metric(tmp):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run("train_asr.py", "--quick", "--dataset-size", "32", "--max-steps", "2", "--log-every", "1", "--beam", "1",
        "--tensorboard", "--out", "o", cwd=tmp, check=0)
    ea = EventAccumulator(str(tmp / "o" / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/val_cer", "eval/val_loss"} <= set(tags), tags
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2] and [e.step for e in ea.Scalars("eval/val_cer")] == [2]
    assert ea.Scalars("eval/val_cer")[0].value == pytest.approx(read_json(tmp / "o" / "summary.json")["val_cer"])


def test_csv_manifest_of_user_wavs_trains(trained, tmp):
    # a user's data: 16 kHz WAVs elsewhere, a CSV manifest with relative paths, 44.1 kHz in it too
    d, _, _ = trained
    src = d / "data" / "asr-synthetic-n320-s1337"
    (tmp / "audio").mkdir()
    rows = []
    for i, t in enumerate(json.loads(line) for line in (src / "train.jsonl").read_text().splitlines()[:40]):
        name = f"audio/u{i}.wav"
        (tmp / name).write_bytes((src / t["audio_filepath"]).read_bytes())
        rows.append(f'{name},"{t["text"]}"')
    write_pcm(tmp / "audio" / "cd.wav", tone(440, 44100), 44100, 2)
    rows.append("audio/cd.wav,a")
    (tmp / "m.csv").write_text("path,text\n" + "\n".join(rows) + "\n")
    run("train_asr.py", "--train-manifest", "m.csv", "--quick", "--max-steps", "3", "--out", "u", cwd=tmp, check=0)
    assert read_json(tmp / "u" / "summary.json")["steps"] == 3


def bad_manifest(tmp, kind):
    (tmp / "a.wav").write_bytes(b"garbage" * 20)
    if kind == "corrupt wav":
        (tmp / "m.jsonl").write_text(json.dumps({"audio_filepath": "a.wav", "text": "hi"}) + "\n")
    elif kind == "corrupt wav with duration":  # the seed's manifests carry durations
        (tmp / "m.jsonl").write_text(json.dumps({"audio_filepath": "a.wav", "text": "hi", "duration": 1.0}) + "\n")
    elif kind == "missing wav":
        (tmp / "m.jsonl").write_text(json.dumps({"audio_filepath": "nope.wav", "text": "hi"}) + "\n")
    elif kind == "bad json":
        (tmp / "m.jsonl").write_text("{not json\n")
    elif kind == "extra csv field":
        write_pcm(tmp / "b.wav", tone(440, 16000), 16000, 2)
        (tmp / "m.csv").write_text("path,text\nb.wav,hello, world\n")
        return "m.csv"
    return "m.jsonl"


@pytest.mark.parametrize("flags,expect", [
    (["--train-manifest", "corrupt wav"], "a.wav: not a readable PCM WAV"),
    (["--train-manifest", "corrupt wav with duration"], "a.wav: not a readable PCM WAV"),
    (["--train-manifest", "extra csv field"], "no utterances (every row needs an audio path and a text) (first: line 2: 3 fields, expected 2"),
    (["--transcribe", "short.wav", "--out", "r"], "too short to transcribe"),
    (["--train-manifest", "missing wav"], "nope.wav not found"),
    (["--train-manifest", "bad json"], "(first: line 1: not JSON"),
    (["--train-manifest", "absent.jsonl"], "absent.jsonl: file not found"),
    (["--val-manifest", "x.jsonl"], "need --train-manifest"),
    (["--ctc-weight", "1.5"], "--ctc-weight 1.5"),
    (["--speed-perturb", "-0.1"], "--speed-perturb -0.1: must be between 0 and 0.3"),
    (["--speed-perturb", "0.1", "--no-spec-augment"], "--speed-perturb 0.1 needs --spec-augment"),
    (["--d-model", "90"], "--d-model 90 is not a multiple of --heads 4"),
    (["--subsample", "2"], "invalid choice"),
    (["--transcribe", "nothere.wav", "--out", "r"], "nothere.wav: audio file not found"),
    (["--quick", "--out", "afile"], "--out afile: exists and is not a folder"),
])
def test_bad_input_exits_2_with_one_line(tmp, flags, expect):
    """...before anything is written: no run folder, and not the built-in speech set either."""
    flags = [bad_manifest(tmp, f) if f in ("corrupt wav", "corrupt wav with duration", "missing wav", "bad json",
                                           "extra csv field") else f for f in flags]
    write_pcm(tmp / "short.wav", tone(440, 16000, seconds=0.05), 16000, 2)
    (tmp / "afile").write_text("not a folder")
    p = call("train_asr.py", *flags, "--max-steps", "1", cwd=tmp)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    assert expect in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and not (tmp / "runs").exists() and not (tmp / "data").exists()


def test_validation_oom_halves_its_batch_and_keeps_it(tmp, monkeypatch):
    # the audit: an out-of-memory error in validation ended the run; now the batch halves (8 -> 4
    # -> 2 here), the size that fitted is kept for the next evaluations, and no figure changes
    real = asr.evaluate
    flags = ["--quick", "--dataset-size", "32", "--batch-size", "8", "--max-steps", "2", "--beam", "1"]

    def losses(out, fits):
        seen = []

        def evaluate(*a, **kw):  # a[-1]: the batch (the process group comes as a keyword)
            if a[-1] > fits:
                seen.append("oom")
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            r = real(*a, **kw)
            seen.append(r[0])  # the exact loss: metrics.jsonl rounds it
            return r
        monkeypatch.setattr(asr, "evaluate", evaluate)
        p = call("train_asr.py", *flags, "--out", out, cwd=tmp)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr
        return seen, p.stdout
    ref, _ = losses("ref", 8)
    got, stdout = losses("oom", 2)
    assert got[:2] == ["oom", "oom"] and "oom" not in got[2:]  # halved twice, then kept
    assert [line.split("] ")[-1] for line in stdout.splitlines() if "out of memory" in line] == [
        "out of memory in evaluation: its batch halved to 4; evaluating again",
        "out of memory in evaluation: its batch halved to 2; evaluating again"]
    assert len(ref) == len(got[2:]) == 3  # the last step's evaluation, then val and test in the report
    assert got[2:] == pytest.approx(ref, rel=1e-6)
    assert read_json(tmp / "oom" / "summary.json")["steps"] == 2


def test_demo_config_keeps_the_tiny_model_for_quick(tmp):
    # ./run.sh demo writes optimal_config.json (asr preset "minimal" on a CPU): --quick must still be quick
    run("memory_optimizer.py", "config", cwd=tmp, check=0)
    p = run("train_asr.py", "--quick", "--dataset-size", "40", "--max-steps", "1", "--out", "c", cwd=tmp, check=0)
    assert "model: tiny d 96" in p.stdout
    p = run("train_asr.py", "--dataset-size", "40", "--max-steps", "1", "--out", "d", cwd=tmp, check=0)
    assert "model: minimal d 128" in p.stdout and "preset=minimal" in p.stdout
    # the minimal preset's measured defaults (README "ASR on real speech"), recorded in args.json
    a = read_json(tmp / "d" / "args.json")["settings"]
    assert (a["lr"]["value"], a["lr"]["source"]) == (2e-3, "auto")
    assert (a["epochs"]["value"], a["epochs"]["source"]) == (15, "auto")
    assert (a["ctc_weight"]["value"], a["ctc_weight"]["source"]) == (0.7, "auto")
    assert (a["dropout"]["value"], a["dropout"]["source"]) == (0.0, "auto")
    assert (a["speed_perturb"]["value"], a["speed_perturb"]["source"]) == (0.1, "auto")
    assert "recipe: lr 0.002 (cosine), 15 epochs, CTC weight 0.7, dropout 0, speed 1 +- 0.1, SpecAugment" in p.stdout
    assert read_json(tmp / "d" / "args.json")["chosen"]["effective_batch"] == 8
    c = read_json(tmp / "c" / "args.json")["settings"]
    assert (c["dropout"]["value"], c["speed_perturb"]["value"]) == (0.1, 0.0)  # tiny keeps the seed's


def test_dashed_spellings_are_the_primary_flags():
    help_text = " ".join(asr.parser.format_help().split())
    for dashed, seed in (("--d-model", "--d_model"), ("--encoder-layers", "--encoder_layers"),
                         ("--decoder-layers", "--decoder_layers")):
        assert f"{dashed} {seed.upper()[2:]}, {seed} {seed.upper()[2:]}" in help_text, dashed


def test_the_seeds_lr_and_epochs_stay_reachable(tmp):
    run("train_asr.py", "--preset", "minimal", "--lr", "5e-4", "--epochs", "10", "--dataset-size", "40",
        "--max-steps", "1", "--beam", "1", "--out", "s", cwd=tmp, check=0)
    a = read_json(tmp / "s" / "args.json")["settings"]
    assert (a["lr"]["value"], a["lr"]["source"], a["epochs"]["value"]) == (5e-4, "flag", 10)
    run("train_asr.py", "--preset", "optimized", "--dataset-size", "40", "--max-steps", "1", "--beam", "1",
        "--d_model", "32", "--encoder_layers", "1", "--decoder_layers", "1",  # the seed's spellings: aliases
        "--out", "o", cwd=tmp, check=0)
    a = read_json(tmp / "o" / "args.json")["settings"]
    assert (a["lr"]["value"], a["epochs"]["value"], a["ctc_weight"]["value"], a["dropout"]["value"],
            a["speed_perturb"]["value"]) == (5e-4, 10, 0.3, 0.1, 0.0)  # the seed's
    assert [a[k]["value"] for k in ("d_model", "encoder_layers", "decoder_layers")] == [32, 1, 1]
    assert read_json(tmp / "o" / "args.json")["chosen"]["effective_batch"] == 16  # the seed's


# -----------------------------------------------------------------------------
# benchmarks/make_speech_data.py and the BiGRU baseline of bench_asr.py --accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_asr  # noqa: E402
import make_speech_data  # noqa: E402


def test_speech_set_text_and_voices():
    pool = make_speech_data.clauses()
    assert len(pool) >= sum(make_speech_data.SPLITS.values())
    assert all(re.fullmatch(r"[a-z][a-z' ]+[a-z]", c) and 4 <= len(c.split()) <= 8 for c in pool)
    train = make_speech_data.TRAIN_VOICES
    for accent, variant in make_speech_data.TEST_VOICES:  # unseen voice = unseen accent and variant
        assert accent not in {a for a, _ in train} and variant not in {v for _, v in train}
        assert make_speech_data.KNOWN_ACCENT[accent] in {a for a, _ in train}  # test_known_accents.jsonl
    # the default set: no clause twice, so no test sentence was heard in training
    rows = make_speech_data.assign(pool, np.random.default_rng(0))
    assert [s for s, _, _ in rows] == [s for s, n in make_speech_data.SPLITS.items() for _ in range(n)]
    assert len({c for _, c, _ in rows}) == len(rows)
    # --train-clauses: more training clauses after the default set's, which stays as it was
    more = make_speech_data.assign(pool, np.random.default_rng(0), train_clauses=1300)
    assert more[:len(rows)] == rows and [s for s, _, _ in more[len(rows):]] == ["train"] * 100
    assert len({c for _, c, _ in more}) == len(more)
    docs = make_speech_data.clauses(docstrings=True)  # past the manual's: the stdlib's docstrings, none twice
    assert len(docs) > 1000 and not set(docs) & set(pool) and all(re.fullmatch(r"[a-z][a-z' ]+[a-z]", c) for c in docs)
    most = make_speech_data.assign(pool, np.random.default_rng(0), train_clauses=len(pool) + 100, more=docs)
    assert most[:len(rows)] == rows and len({c for _, c, _ in most}) == len(most)
    # --heard-text: every val/test clause is a training clause, said by a voice that did not say it there
    rows = make_speech_data.assign(pool, np.random.default_rng(0), heard_text=True)
    said = {(c, v) for s, c, v in rows if s == "train"}
    assert len(said) == sum(1 for s, _, _ in rows if s == "train") == make_speech_data.SPLITS["train"]
    for split in ("val", "test"):
        held = [(c, v) for s, c, v in rows if s == split]
        assert len(held) == make_speech_data.SPLITS[split] and len({c for c, _ in held}) == len(held)
        assert all(c in {c for c, _ in said} and (c, v) not in said for c, v in held)
    assert {v for s, _, v in rows if s == "val"} == set(train)
    assert {v for s, _, v in rows if s == "test"} == set(make_speech_data.TEST_VOICES)


def test_bigru_baseline_size_and_padding():
    torch.manual_seed(0)
    m = bench_asr.bigru_model(32).eval()
    assert 2.0e6 < sum(p.numel() for p in m.parameters()) < 2.2e6  # "2.1M" in the README
    x = torch.randn(1, 203, 80)
    alone, L = m(x, torch.tensor([203]))
    padded, L2 = m(torch.cat([x, torch.zeros(1, 100, 80)], 1), torch.tensor([203]))
    assert alone.shape == (1, 50, 32) and int(L) == int(L2) == 50
    assert torch.allclose(alone[0], padded[0, :50], atol=1e-5)  # packed: padding never reaches the GRU


def test_accuracy_benchmark_runs_end_to_end(tmp):
    paths = asr.synthetic_set(tmp / "data", 40, 0, log=lambda *a: None)  # the same three manifests
    # and make_speech_data.py's second test split beside them (here a copy of test): the BiGRU
    # worker and --errors read it too
    (paths["test"].parent / "test_known_accents.jsonl").write_text(paths["test"].read_text())
    p = run("benchmarks/bench_asr.py", "--accuracy", paths["train"].parent, "--out", tmp / "b",
            "--ours-flags", "--max-steps 2 --beam 1", "--budget-s", "5", cwd=tmp, check=0)  # the BiGRU: 5 CPU s
    assert "| train_asr.py minimal (lr 0.002)" in p.stdout and "| BiGRU-CTC 2x256" in p.stdout
    assert "beam 1, speed 1 +- 0.1, SpecAugment; BiGRU: AdamW 1e-3, plateau halving, batch 16, " \
        "SpecAugment, stopped" in p.stdout
    s = read_json(tmp / "b" / "ours" / "summary.json")
    assert s["steps"] == 2 and s["test_cer"] is not None
    # --errors decodes the run again: its test CER (beam and greedy) is the run's, split by how
    # often a word was heard; test_known_accents.jsonl is one more row
    p = run("benchmarks/bench_asr.py", "--errors", tmp / "b" / "ours", cwd=tmp, check=0)
    test_row, known_row = ([l for l in p.stdout.splitlines() if l.startswith(f"| {split} ")][0].split("|")
                           for split in ("test", "test_known_accents"))
    assert float(test_row[3]) == pytest.approx(s["test_cer"], abs=0.006) and "spans with an unseen word" in p.stdout
    assert float(test_row[4]) == pytest.approx(s["test_cer_greedy_ctc"], abs=0.006) and known_row[3:] == test_row[3:]
    p = run("benchmarks/bench_asr.py", "--errors", tmp / "nothing", cwd=tmp, check=2)
    assert p.stderr.startswith("error: --errors") and len(p.stderr.strip().splitlines()) == 1
    p = run("benchmarks/bench_asr.py", "--accuracy", tmp / "nothing", cwd=tmp, check=2)
    assert p.stderr.startswith("error: --accuracy") and "make_speech_data.py" in p.stderr


@pytest.mark.parametrize("flags", [["--subsample", "1"], ["--schedule", "plateau", "--eval-every", "1"],
                                   ["--no-spec-augment"], ["--grad-checkpointing"], ["--resource-efficient"],
                                   ["--precision", "bf16"]])
def test_every_training_option_runs(tmp, flags):
    p = run("train_asr.py", "--quick", "--dataset-size", "32", "--max-steps", "2", "--beam", "1", *flags,
            "--out", "o", cwd=tmp, check=0)
    s = read_json(tmp / "o" / "summary.json")
    assert s["steps"] == 2 and math.isfinite(s["val_loss"])
    a = read_json(tmp / "o" / "args.json")["settings"]
    if "--resource-efficient" in flags:
        assert a["grad_checkpointing"]["value"] is True and a["batch_size"]["value"] == 8  # 16 halved
    if "--subsample" in flags:
        assert "subsample x1" in p.stdout


def test_short_clips_are_dropped_and_counted_and_a_foreign_checkpoint_is_refused(tmp):
    rows = []
    for i, sec in enumerate([0.01, 0.05] + [0.6] * 12):
        write_pcm(tmp / f"u{i}.wav", tone(300 + 50 * i, 16000, seconds=sec), 16000, 2)
        rows.append(json.dumps({"audio_filepath": f"u{i}.wav", "text": "ab" if sec > 0.1 else "a", "duration": 9.0}))
    rows.append(json.dumps({"audio_filepath": "u2.wav", "text": "  "}))  # empty transcript
    (tmp / "m.jsonl").write_text("\n".join(rows) + "\n")
    p = run("train_asr.py", "--train-manifest", "m.jsonl", "--val-frac", "0.2", "--preset", "tiny",
            "--max-steps", "1", "--out", "s", cwd=tmp, check=0)
    assert "dropped: 1 bad rows, 2 under 0.1 s" in p.stdout
    assert "--train-manifest m.jsonl: 1 bad rows skipped (first: line 15: empty 'text')" in p.stdout
    torch.save({"model": {}, "step": 1}, tmp / "other.pt")
    p = run("train_asr.py", "--transcribe", "u3.wav", "--out", "s", "--resume", "other.pt", cwd=tmp, check=2)
    assert "other.pt is not a train_asr.py checkpoint" in p.stderr
