"""Tests for llmd4rec.py: fast, CPU only, no network. Run: python -m pytest -q test_llmd4rec.py"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmd4rec as L

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)  # the models here are tiny: one thread is faster than two contending
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cfg_for(tmp_path, **kw):
    base = dict(out=str(tmp_path / "out"), d=32, llm_dim=32, llm_layers=1, llm_heads=2, crm_epochs=30,
                llm_epochs=6, rounds=1, patience=3)
    base.update(kw)
    return L.Config(**base)


def write(tmp_path, text, name="data.txt"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------------------------------------- data


def test_both_formats_give_the_same_sequences(tmp_path):
    seq = write(tmp_path, "7 30 10 20\n3 10 40\n", "seq.txt")
    pairs = write(tmp_path, "7 30\n7 10\n3 10\n7 20\n3 40\n", "pairs.txt")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + open(seq, "rb").read())  # saved with a UTF-8 byte-order mark
    assert L.read_sequences(seq) == L.read_sequences(pairs) == L.read_sequences(str(tmp_path / "bom.txt")) == {
        7: [30, 10, 20], 3: [10, 40]}


def test_split_leave_one_out_and_remapping(tmp_path):
    seqs = {1: [100, 200, 300, 400, 500], 2: [300, 100], 3: [500, 400, 300]}
    d = L.split(seqs, max_len=2, name="toy")
    assert (d.num_users, d.num_items, d.num_interactions) == (3, 5, 10)
    # ids remapped in sorted order: 100->1 ... 500->5
    assert d.items == [100, 200, 300, 400, 500]
    assert d.valid_y.tolist() == [4, 4] and d.test_y.tolist() == [5, 3]
    # evaluation keeps whole histories (the models read the last max_len items; exclusion uses all of them)
    assert d.valid_x.tolist() == [[1, 2, 3], [0, 0, 5]] and d.test_x.tolist() == [[1, 2, 3, 4], [0, 0, 5, 4]]
    # user 2 (2 items) only trains; user 1 trains on 1->2->3, user 3 has no training target
    assert sorted(d.train_y[d.train_y > 0].tolist()) == [1, 2, 3]


def test_no_eval_target_is_a_training_target_of_its_user():
    seqs = L.synthetic_sequences(0)
    d = L.split(seqs, max_len=5, name="syn")  # short max_len: long histories become several windows
    got = sorted(d.train_y[d.train_y > 0].tolist())
    expected = []
    for s in seqs.values():
        train = s[:-2] if len(s) >= 3 else s
        expected += train[1:]  # items are already 1..N in the synthetic data
    assert got == sorted(expected)
    # each window's target at t is the input at t+1: training never looks past the split
    x, y = d.train_x, d.train_y
    inner = (x[:, 1:] > 0) & (y[:, :-1] > 0)
    assert torch.equal(x[:, 1:][inner], y[:, :-1][inner])
    assert not torch.equal(L.load_data(L.Config(seed=1)).test_y, L.load_data(L.Config()).test_y)  # data from --seed


def test_prefix_samples_hold_the_window_targets_one_a_prefix():
    seqs = L.synthetic_sequences(0)
    windows, prefixes = (L.split(seqs, max_len=5, name="syn", prefixes=p) for p in (False, True))
    assert sorted(prefixes.train_y[prefixes.train_y > 0].tolist()) == sorted(windows.train_y[windows.train_y > 0].tolist())
    assert (prefixes.train_y[:, :-1] == 0).all() and (prefixes.train_y[:, -1] > 0).all()  # one target, the newest
    want = sorted((tuple(s[max(0, e - 5):e]), s[e]) for s in seqs.values() for e in range(1, len(s) - 2))
    got = sorted((tuple(x[x > 0].tolist()), int(y[-1])) for x, y in zip(prefixes.train_x, prefixes.train_y))
    assert got == want  # every prefix of a training sequence, its last max_len items, its next item
    assert torch.equal(prefixes.test_x, windows.test_x) and torch.equal(prefixes.valid_y, windows.valid_y)


@pytest.mark.parametrize("text, expected", [
    ("", "empty file"),
    ("1 2 3\n2 4 x5\n", ":2: expected integer ids, got 'x5'"),
    ("1 2 3\n2 4 \u00b2\n", ":2: expected integer ids, got '\u00b2'"),  # a digit to isdigit(), not to int()
    ("1 2 3\n2 0 4\n", ":2: expected positive ids (0 is padding), got 0"),
    ("1 2 3\n2 -4 4\n", ":2: expected positive ids (0 is padding), got -4"),
    ("1 2 3\n2 4 --5\n", ":2: expected integer ids, got '--5'"),
    ("1 2 3\n2\n", ":2: user 2 has no items"),
    ("1 2 3\n1 4 5\n", ":2: user 1 appears again (first on line 1)"),
    ("1 2 3\n1 4\n", ":2: user 1 appears again (first on line 1)"),  # not pairs: one line has three ids
])
def test_bad_data_names_file_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(L.UserError) as e:
        L.read_sequences(path)
    assert str(e.value).startswith(path) and expected in str(e.value)


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"1 2 3\n2 4 5\xe9\n")
    with pytest.raises(L.UserError, match=r"latin1.txt:2: expected integer ids"):
        L.read_sequences(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(L.UserError, match="file not found"):
        L.read_sequences(str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------------------------------------- models


def small_models(tmp_path, num_items=20):
    cfg = cfg_for(tmp_path, max_len=10, crm_dropout=0.0, llm_dropout=0.0)
    torch.manual_seed(0)
    crm = L.SASRec(num_items, cfg).eval()
    llm = L.build_llm(cfg, crm, num_items).eval()
    return cfg, crm, llm


@pytest.mark.parametrize("which", ["crm", "llm"])
def test_causal_and_padding_invariant(tmp_path, which):
    _, crm, llm = small_models(tmp_path)
    model = crm if which == "crm" else llm
    seq = torch.tensor([[0, 0, 3, 5, 7, 2, 9, 4]])
    h = model.hidden(seq)
    assert h.shape == (1, 8, 32)
    later = seq.clone()
    later[0, 6:] = torch.tensor([11, 12])  # change the items after position 5
    assert torch.allclose(model.hidden(later)[0, :6], h[0, :6], atol=1e-5)
    assert not torch.allclose(model.hidden(later)[0, 6:], h[0, 6:], atol=1e-3)
    # more left padding (and a different batch mate) leaves the real positions alone
    padded = torch.tensor([[0, 0, 0, 0, 3, 5, 7, 2, 9, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    assert torch.allclose(model.hidden(padded)[0, 4:], h[0, 2:], atol=1e-5)


def test_llm_reads_the_instruction_then_the_soft_tokens(tmp_path):
    _, _, llm = small_models(tmp_path)
    words = L.INSTRUCTION.split()  # the tiny backbone's tokenizer: one id a word, the same word the same id
    ids = llm.prompt_ids.tolist()
    assert len(ids) == len(words) and len(set(ids)) == len(set(words)) == len(set(zip(ids, words)))
    seq = torch.tensor([[3, 5, 7, 2]])  # E4SRec's input: [instruction tokens][W_in . E_c[i] ...], in one sequence
    embeds = torch.cat([llm.backbone.get_input_embeddings()(llm.prompt_ids[None]), llm.W_in(llm.E_c[seq])], 1)
    whole = llm.backbone(inputs_embeds=embeds).last_hidden_state[:, len(ids):]
    assert torch.allclose(llm.hidden(seq), whole, atol=1e-5)


def test_llm_dropout_on_the_soft_tokens_and_the_tiny_decoders_attention(tmp_path):
    cfg = cfg_for(tmp_path, llm_dropout=0.5)
    llm = L.build_llm(cfg, L.SASRec(20, cfg), 20)
    assert llm.backbone.config.attention_dropout == 0.5
    seq = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    llm.train().backbone.eval()  # the soft tokens' dropout alone
    assert not torch.allclose(llm.hidden(seq), llm.hidden(seq))
    assert torch.equal(llm.eval().hidden(seq), llm.hidden(seq))


def test_sasrec_drops_out_at_every_site_in_training_only(tmp_path, monkeypatch):
    # the input embeddings, the attention, each sublayer's output (the SASRec paper's x + Dropout(g(LN(x)))) and
    # inside the feed-forward (the original code's)
    cfg = cfg_for(tmp_path, crm_dropout=0.4, crm_blocks=2)
    crm, calls, attention_p = L.SASRec(20, cfg), [], []
    for name, m in crm.named_modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.4
            m.register_forward_hook(lambda m, args, out, name=name: calls.append((name, m.training)))
    sdpa = F.scaled_dot_product_attention

    def attention(*args, **kw):
        attention_p.append(kw["dropout_p"])
        return sdpa(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    seq = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    crm.train().hidden(seq)
    block = lambda i: [f"blocks.{i}.drop", f"blocks.{i}.ffn.2", f"blocks.{i}.drop"]
    assert calls == [(n, True) for n in ["drop"] + block(0) + block(1)] and attention_p == [0.4, 0.4]
    calls.clear()
    attention_p.clear()
    crm.eval().hidden(seq)
    assert [t for _, t in calls] == [False] * 7 and attention_p == [0.0, 0.0]


def test_scores_cover_all_items_and_candidates(tmp_path):
    _, crm, llm = small_models(tmp_path)
    seq = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    for model in (crm, llm):
        h = model.hidden(seq)[:, -1]
        full = model.score(h)
        assert full.shape == (2, 20)
        cand = torch.tensor([[3, 1, 20], [7, 8, 9]])
        assert torch.allclose(model.score(h, cand), full.gather(1, cand - 1), atol=1e-5)


def test_soft_tokens_come_from_frozen_crm_embeddings(tmp_path):
    _, crm, llm = small_models(tmp_path)
    seq = torch.tensor([[0, 1, 2, 3]])
    before = llm.score(llm.hidden(seq)[:, -1])
    llm.E_c[2] += 1.0
    after = llm.score(llm.hidden(seq)[:, -1])
    assert not torch.allclose(before, after)
    assert "E_c" not in dict(llm.named_parameters())  # a buffer: no gradient, no optimizer
    after.sum().backward()
    assert crm.item_emb.weight.grad is None and llm.W_in.weight.grad is not None


def tiny_pretrained(tmp_path):
    """A tiny Qwen2 model and a byte-level BPE tokenizer saved with save_pretrained, as a user's folder would be."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    folder = tmp_path / "tiny-lm"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([L.INSTRUCTION], vocab_size=300, min_frequency=1, show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(folder)
    conf = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf).to(torch.bfloat16).save_pretrained(folder)  # as released LLMs are
    return str(folder), bpe.encode(L.INSTRUCTION).ids


def test_from_pretrained_with_lora(tmp_path):
    from transformers import AutoModel

    folder, prompt_ids = tiny_pretrained(tmp_path)
    cfg = cfg_for(tmp_path, llm=folder, max_len=8, llm_dropout=0.0, lora_dropout=0.0)
    base = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    crm = L.SASRec(20, cfg)
    llm = L.build_llm(cfg, crm, 20).eval()
    # LoRA starts as the identity: the adapted backbone equals the base model
    x = torch.randn(2, 5, 32)
    assert torch.allclose(llm.backbone(inputs_embeds=x).last_hidden_state, base(inputs_embeds=x).last_hidden_state,
                          atol=1e-5)
    trainable = {n.split(".")[-1] if n.startswith("backbone") else n.split(".")[0]
                 for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "W_in", "W_out"}
    assert sum(isinstance(m, L.LoRALinear) for m in llm.modules()) == 2 * 4  # 2 layers x q, k, v, o
    assert llm.prompt_ids.tolist() == prompt_ids  # the model's own tokenizer
    assert llm.hidden(torch.tensor([[0, 1, 2]])).shape == (1, 3, 32)
    with pytest.raises(L.UserError, match="--lora-targets nothing: no such nn.Linear modules"):
        L.build_llm(dataclasses.replace(cfg, lora_targets="nothing"), crm, 20)
    # checkpoints hold what training changes, not the pretrained weights (reloaded from --llm)
    frozen, saved = {n for n, p in llm.named_parameters() if not p.requires_grad}, set(L.trained_state(llm))
    assert frozen and not frozen & saved and {"W_in.weight", "W_out.weight", "E_c"} <= saved
    L.load_trained(llm, L.trained_state(llm))  # the frozen weights stay as loaded; a trained one must be there
    with pytest.raises(AssertionError, match="W_out.weight"):
        L.load_trained(llm, {k: v for k, v in L.trained_state(llm).items() if k != "W_out.weight"})
    # a pretrained backbone trains at E4SRec's learning rate unless told otherwise
    L.run(dataclasses.replace(cfg, rounds=0, crm_epochs=1, llm_epochs=1))
    assert json.load(open(os.path.join(cfg.out, "config.json")))["llm_lr"] == 3e-4


def test_lora_adds_alpha_over_r_times_b_a():
    base = torch.nn.Linear(6, 4)
    lora = L.LoRALinear(base, r=2, alpha=8.0, dropout=0.0)
    torch.nn.init.normal_(lora.B)  # B starts at 0; give it weights
    x = torch.randn(3, 6)
    assert torch.allclose(lora(x), base(x) + 4.0 * x @ lora.A.T @ lora.B.T, atol=1e-6)
    lora = L.LoRALinear(base, r=2, alpha=8.0, dropout=0.5)  # --lora-dropout: on the adapter's input, in training
    torch.nn.init.normal_(lora.B)
    assert not torch.allclose(lora(x), lora(x)) and torch.equal(lora.eval()(x), lora(x))


def test_a_backbone_without_the_cache_argument_is_refused(tmp_path, monkeypatch):
    import transformers

    # what Qwen2Model.forward looks like under transformers 5.17, which ignores cache= and drops the instruction
    monkeypatch.setattr(transformers.Qwen2Model, "forward", lambda self, inputs_embeds=None, past_key_values=None: None)
    with pytest.raises(L.UserError, match=r"--llm tiny: Qwen2Model.forward takes no 'cache' argument under "
                                          r"transformers .*; install the version in requirements.txt"):
        cfg = cfg_for(tmp_path)
        L.build_llm(cfg, L.SASRec(20, cfg), 20)


def test_unloadable_llm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(L.socket, "create_connection", lambda *a, **k: pytest.fail("offline, yet the hub was tried"))
    cfg = cfg_for(tmp_path, llm="no-such-org/no-such-model-llmd4rec")
    with pytest.raises(L.UserError, match="cannot load .*hub is unreachable"):
        L.load_backbone(cfg)


# ---------------------------------------------------------------------------------------------- losses


def test_kd_loss_matches_float64_formula_value_and_gradient():
    torch.manual_seed(0)
    s = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    T = 2.5
    got = L.kd_loss(s, t, T)
    p_t, p_s = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    ref = T ** 2 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)
    assert torch.allclose(got, ref, atol=1e-12)
    g_got, = torch.autograd.grad(got.sum(), s)
    g_ref, = torch.autograd.grad(ref.sum(), s)
    assert torch.allclose(g_got, g_ref, atol=1e-10)
    L.kd_loss(s, t, T).sum().backward()  # the teacher gets no gradient
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_fused_loss_equals_ce_plus_weighted_kd_loss(T):
    """Training's distill_ce is CE + c * kd_loss (the plain definition), in value and gradient."""
    torch.manual_seed(2)
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(5, 11, dtype=torch.float64)
    target, c = torch.tensor([0, 3, 10, 3, 7]), torch.tensor([0.0, 0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    ref = F.cross_entropy(s, target, reduction="none") + c * L.kd_loss(s, t, T)
    got, negent = L.distill_ce(s, t, target, c, T)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    p_t = torch.softmax(t / T, -1)
    assert torch.allclose(negent.double(), (p_t * torch.log(p_t)).sum(-1), atol=1e-6)
    weights = torch.rand(5, dtype=torch.float64)  # a non-uniform upstream gradient
    g_ref, = torch.autograd.grad((ref * weights).sum(), s)
    for given in (None, negent):  # the teacher's sum p log p computed, or given back
        loss, back = L.distill_ce(s, t, target, c, T, given)
        assert torch.allclose(loss.double(), ref, atol=1e-5) and torch.equal(back, negent)
        g_got, = torch.autograd.grad((loss * weights).sum(), s)
        assert torch.allclose(g_got, g_ref, atol=1e-6)
    # a wrong value given back shows in the loss: it is used, not recomputed
    assert not torch.allclose(L.distill_ce(s, t, target, c, T, negent - 1)[0], got)
    # float32 logits with a float64 weight
    loss, _ = L.distill_ce(s.float().detach().requires_grad_(), t.float(), target, c, T)
    loss.sum().backward()


def test_kd_loss_nonnegative_zero_on_equal_and_stable():
    torch.manual_seed(1)
    a, b = torch.randn(64, 50), torch.randn(64, 50)
    for T in (0.5, 1.0, 4.0):
        assert (L.kd_loss(a, b, T) >= -1e-6).all()
        assert L.kd_loss(a, a.clone(), T).abs().max() < 1e-5
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]])
    assert torch.isfinite(L.kd_loss(big, big.flip(1), 1.0)).all()
    assert torch.isfinite(L.kd_loss(a.bfloat16(), b.bfloat16(), 2.0)).all()


def test_ranks_ties_do_not_favour_the_target():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    assert L.ranks(logits, torch.tensor([2, 0, 0])).tolist() == [2, 3, 0]


def test_adaptive_weights_by_hand():
    r_c = torch.tensor([0, 4, 2, 10, 3, 0, 1])
    r_l = torch.tensor([0, 1, 6, 5, 3, 7, 0])
    w1, w2 = L.adaptive_weights(r_c, r_l)
    # w1: the LLM learns from the CRM. r_l > r_c: 1 + (r_l - r_c) / max(r_c, 1), else 1 - (r_c - r_l) / max(r_l, 1)
    unclipped = [1, 1 - 3 / 1, 1 + 4 / 2, 1 - 5 / 5, 1, 1 + 7 / 1, 1 - 1 / 1]
    assert w1.tolist() == pytest.approx([min(max(w, 0), 2) for w in unclipped]) == [1, 0, 2, 0, 1, 2, 0]
    # w2: the CRM learns from the LLM, the same rule with the roles swapped
    assert w2.tolist() == pytest.approx([1, 2, 0, 2, 1, 0, 2])
    assert torch.equal(L.adaptive_weights(r_l, r_c)[0], w2)
    r_c, r_l = torch.tensor([4, 5]), torch.tensor([6, 4])  # unclipped values
    w1, w2 = L.adaptive_weights(r_c, r_l)
    assert w1.tolist() == pytest.approx([1 + 2 / 4, 1 - 1 / 4]) and w2.tolist() == pytest.approx([1 - 2 / 4, 1 + 1 / 4])


# ---------------------------------------------------------------------------------------------- evaluation


class FixedScores(torch.nn.Module):
    """A 'model' with given scores: row b of the matrix scores user b of the batch."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(scores, requires_grad=False)

    def hidden(self, seq):
        return torch.arange(len(seq), dtype=torch.float)[:, None, None].expand(-1, seq.shape[1], 1)

    def score(self, h):
        return self.scores[h[:, 0].long()]


def test_metrics_on_a_hand_made_ranking():
    scores = torch.zeros(3, 25)
    scores[0, 4] = 1.0                 # user 0: target item 5 is the unique top -> rank 0
    scores[1, :] = torch.arange(25.0)  # user 1: target item 20 (score 19): items 21..25 above -> rank 5
    scores[2, :] = 1.0                 # user 2: all tied: the 24 others count as above -> rank 24
    x = torch.tensor([[0, 1], [2, 3], [4, 5]])
    r = L.evaluate(FixedScores(scores), x, torch.tensor([5, 20, 3]), max_len=2)["kept"]
    assert r.tolist() == [0, 5, 24]
    m = L.metrics(r)
    assert [m[f"HR@{k}"] for k in (5, 10, 20)] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert m["NDCG@5"] == pytest.approx(1 / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(7)) / 3)


def test_a_diverged_model_gets_the_worst_rank():
    scores = torch.zeros(3, 25)
    scores[0] = float("nan")  # all NaN
    scores[1, 4] = float("inf")  # the target's score is infinite
    scores[2, 4], scores[2, 7] = 1.0, float("nan")  # a NaN elsewhere counts as above the target
    r = L.evaluate(FixedScores(scores), torch.tensor([[1], [2], [3]]), torch.tensor([5, 5, 5]), max_len=2)
    assert r["kept"].tolist() == [24, 24, 1]
    assert L.metrics(r["kept"][:2])["HR@20"] == 0 and L.metrics(r["kept"][:2])["NDCG@20"] == 0


def test_excluded_protocol_removes_the_whole_history_but_not_the_target():
    scores = torch.arange(10.0)[None].repeat(2, 1)  # item k scores k - 1: items 9 and 10 beat item 8
    model = FixedScores(scores)
    # user 0 saw 10 long ago (before the last max_len = 2 items), then 9 and its own target 8
    hist = torch.tensor([[10, 1, 9, 8], [0, 0, 0, 1]])
    r = L.evaluate(model, hist, torch.tensor([8, 8]), max_len=2)
    assert r["kept"].tolist() == [2, 2]
    assert r["excluded"].tolist() == [0, 2]  # user 0: 9 and 10 removed, the target kept


def test_evaluation_ranks_belong_to_their_users(tmp_path):
    _, crm, _ = small_models(tmp_path)  # 20 items, max_len 10
    g = torch.Generator().manual_seed(0)
    x = L.left_pad([torch.randint(1, 21, (n,), generator=g).tolist() for n in (7, 1, 12, 3, 3, 9, 2)])
    y = torch.randint(1, 21, (7,), generator=g)
    together = L.evaluate(crm, x, y, max_len=10, batch=3)  # sorted by length, three users at a time
    for i in range(len(y)):
        alone = L.evaluate(crm, x[i:i + 1], y[i:i + 1], max_len=10)
        assert all(together[p][i] == alone[p][0] for p in L.PROTOCOLS), i


# ---------------------------------------------------------------------------------------------- training


def popularity_hr10(data):
    counts = torch.bincount(data.train_y[data.train_y > 0], minlength=data.num_items + 1)[1:].float()
    top = counts.argsort(descending=True)[:10] + 1
    return torch.isin(data.test_y, top).float().mean().item()


def test_models_learn_the_synthetic_data_and_a_round_improves_both(tmp_path):
    # On the synthetic data a round without distillation (--direction up for the LLM, down for SASRec) gains as
    # much (README): this checks that a round warm-starts both models and improves them, not the KD itself.
    # (That a seeded run repeats exactly is checked by the resume and --baselines tests, which compare two runs.)
    # The tests' one-layer, width-32 LLM learns too slowly at the default rate for 6 epochs: it gets 1e-3.
    cfg = cfg_for(tmp_path, llm_lr=1e-3)
    res = L.run(cfg)
    pop = popularity_hr10(L.load_data(cfg))
    assert pop < 0.2
    for name in ("SASRec", "E4SRec"):
        assert res["models"][name]["test"]["kept"]["HR@10"] > pop + 0.4, (name, res["models"][name], pop)
    valid = {s["stage"]: s["valid"]["kept"]["NDCG@10"] for s in res["rounds"]}
    assert valid["LLM"] > valid["E4SRec"] + 0.02 and valid["CRM"] > valid["SASRec"] + 0.01, valid
    assert res["models"]["LLMD4Rec_C"]["round"] == res["models"]["LLMD4Rec_L"]["round"] == 1


def record_training(monkeypatch):
    """Spy on what training runs: every stage (its rate, its teacher, the soft tokens it starts from, the embeddings it
    ends with) and every call of the loss (student logits, teacher logits, targets, the weight c = lambda * w, T)."""
    stages, calls = [], []
    real_stage, real_loss = L.train_stage, L.distill_ce

    def stage(student, teacher, data, cfg, dev, **kw):
        entry = {"tag": kw["tag"], "lr": kw["lr"], "teacher": teacher,
                 "E_c": getattr(student, "E_c", torch.zeros(0)).clone()}
        stages.append(entry)
        log = real_stage(student, teacher, data, cfg, dev, **kw)
        if isinstance(student, L.SASRec):
            entry["item_emb"] = student.item_emb.weight.detach().clone()
        return log

    def loss(s, t, target, c, T, t_negent=None):
        calls.append((stages[-1]["tag"], s.detach(), t.detach(), target, c, T))
        return real_loss(s, t, target, c, T, t_negent)

    monkeypatch.setattr(L, "train_stage", stage)
    monkeypatch.setattr(L, "distill_ce", loss)
    return stages, calls


def rank_of(logits, tidx):
    return ((logits >= logits.gather(1, tidx[:, None])).sum(1) - 1).float()


def w1(r_c, r_l):  # METHOD.md: the LLM learning from the CRM
    return torch.where(r_l > r_c, 1 + (r_l - r_c) / r_c.clamp(min=1), 1 - (r_c - r_l) / r_l.clamp(min=1)).clamp(0, 2)


def w2(r_c, r_l):  # METHOD.md: the CRM learning from the LLM
    return torch.where(r_c > r_l, 1 + (r_c - r_l) / r_l.clamp(min=1), 1 - (r_l - r_c) / r_c.clamp(min=1)).clamp(0, 2)


def test_training_distills_both_ways_with_the_papers_weights_and_soft_tokens(tmp_path, monkeypatch):
    stages, calls = record_training(monkeypatch)
    cfg = cfg_for(tmp_path, crm_epochs=2, llm_epochs=2, rounds=2, T1=1.5, T2=2.0, lambda1=0.7, lambda2=0.4)
    res = L.run(cfg)
    assert [s["tag"] for s in stages] == [(0, "SASRec"), (0, "E4SRec"), (1, "LLM"), (1, "CRM"), (2, "LLM"), (2, "CRM")]
    assert [s["teacher"] is not None for s in stages] == [False, False, True, True, True, True]
    # tiny LLM: 5e-4 for E4SRec, half in the rounds
    assert [s["lr"] for s in stages] == [cfg.crm_lr, 5e-4, 2.5e-4, cfg.crm_lr, 2.5e-4, cfg.crm_lr]
    assert {c[0] for c in calls} == {(1, "LLM"), (1, "CRM"), (2, "LLM"), (2, "CRM")}  # L_down and L_up, each round
    not_one = 0
    for tag, s, t, target, c, T in calls:
        if tag[1] == "LLM":  # L_LLM = CE + lambda1 * w1 * T1^2 * KL(p_c || p_l): the student is the LLM
            r_l, r_c = rank_of(s, target), rank_of(t, target)
            assert T == cfg.T1 and torch.allclose(c, cfg.lambda1 * w1(r_c, r_l)), tag
        else:  # L_CRM = CE + lambda2 * w2 * T2^2 * KL(p_l || p_c): the student is SASRec
            r_c, r_l = rank_of(s, target), rank_of(t, target)
            assert T == cfg.T2 and torch.allclose(c, cfg.lambda2 * w2(r_c, r_l)), tag
        not_one += int((c != c[0]).sum())
    assert not_one > 100  # the weights differ between samples
    # soft tokens: E4SRec reads the SASRec baseline's embeddings, round 1 too; round 2 reads round 1's SASRec
    sasrec, crm1 = stages[0]["item_emb"], stages[3]["item_emb"]
    assert torch.equal(stages[1]["E_c"], sasrec) and torch.equal(stages[2]["E_c"], sasrec)
    assert torch.equal(stages[4]["E_c"], crm1) and not torch.equal(crm1, sasrec)
    ties = 0  # teacher_better: the share of an epoch's samples whose teacher ranks the target strictly better
    for stage in res["rounds"][2:]:
        mine = [c for c in calls if c[0] == (stage["round"], stage["stage"])]
        n = len(mine) // len(stage["epochs"])  # loss calls per epoch: the same batches every epoch
        assert n * len(stage["epochs"]) == len(mine)
        for e, epoch in enumerate(stage["epochs"]):
            r = [(rank_of(s, y), rank_of(t, y)) for _, s, t, y, _, _ in mine[e * n:(e + 1) * n]]
            better = sum(int((r_t < r_s).sum()) for r_s, r_t in r) / sum(len(r_s) for r_s, _ in r)
            assert epoch["teacher_better"] == pytest.approx(better, abs=1e-9), stage["stage"]
            ties += sum(int((r_t == r_s).sum()) for r_s, r_t in r)
    assert ties > 100


def test_ablations_no_weight_and_no_id_update(tmp_path, monkeypatch):
    stages, calls = record_training(monkeypatch)
    L.run(cfg_for(tmp_path, crm_epochs=2, llm_epochs=1, rounds=2, lambda1=0.7, lambda2=0.4, no_weight=True,
                  no_id_update=True))
    assert {c[0] for c in calls} == {(1, "LLM"), (1, "CRM"), (2, "LLM"), (2, "CRM")}
    for tag, _, _, _, c, _ in calls:  # w = 1: c is lambda for every sample
        assert torch.equal(c, torch.full_like(c, 0.7 if tag[1] == "LLM" else 0.4)), tag
    assert torch.equal(stages[4]["E_c"], stages[0]["item_emb"])  # round 2 still reads the SASRec baseline's


@pytest.mark.parametrize("direction, distilled", [("up", {"CRM"}), ("down", {"LLM"})])
def test_one_way_directions(tmp_path, monkeypatch, direction, distilled):
    stages, calls = record_training(monkeypatch)
    L.run(cfg_for(tmp_path, direction=direction, crm_epochs=2, llm_epochs=1))
    assert [s["teacher"] is not None for s in stages] == [False, False, "LLM" in distilled, "CRM" in distilled]
    assert {c[0][1] for c in calls} == distilled


def test_the_teacher_scores_the_targets_of_the_batch(monkeypatch):
    """A teacher identical to the student (no dropout) gives the student's own logits at the first step, row for
    row: the teacher's cached rows belong to the batch's targets."""
    cfg = L.Config(d=32, crm_dropout=0.0)
    data = L.load_data(cfg)
    crm = L.SASRec(data.num_items, cfg)
    teacher = L.make_teacher(copy.deepcopy(crm), data, 1.0, 1.0, True)
    seen, real = [], L.distill_ce
    monkeypatch.setattr(L, "distill_ce", lambda s, t, *a: seen.append((s.detach(), t)) or real(s, t, *a))
    L.train_stage(crm, teacher, data, cfg, torch.device("cpu"), lr=1e-3, epochs=1, tag=(1, "CRM"),
                  gen=torch.Generator().manual_seed(3))
    assert len(seen[0][0]) > 100 and torch.allclose(seen[0][0], seen[0][1], atol=1e-5)


def test_a_step_runs_a_plain_batch_in_length_groups(monkeypatch):
    """The windows of a step are those of a plain shuffled batch, run in groups of one length class; the hidden
    states, targets and teacher rows that reach the loss are those of the batch padded as one (no dropout)."""
    cfg = L.Config(d=32, crm_dropout=0.0)
    data = L.load_data(cfg)
    crm = L.SASRec(data.num_items, cfg)
    plain = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(3)).split(cfg.batch_size)
    steps = L.batches(data, cfg.batch_size, torch.Generator().manual_seed(3))
    group = torch.bucketize((data.train_x > 0).sum(1), L.LENGTH_GROUPS)
    assert len(steps) == len(plain) and max(map(len, steps)) >= 3
    for groups, idx in zip(steps, plain):
        assert sorted(torch.cat(groups).tolist()) == sorted(idx.tolist())
        assert all(len(group[g].unique()) == 1 for g in groups)
    seen, real = [], L.backward
    monkeypatch.setattr(L, "backward", lambda s, h, tidx, *a: seen.append((h.detach(), tidx, a[-1])) or
                        real(s, h, tidx, *a))
    before = copy.deepcopy(crm).eval()
    L.train_stage(crm, L.make_teacher(copy.deepcopy(crm), data, 1.0, 1.0, True), data, cfg, torch.device("cpu"),
                  lr=1e-3, epochs=1, tag=(1, "CRM"), gen=torch.Generator().manual_seed(3))
    h, tidx, rows = seen[0]
    x, y = data.train_x[plain[0]], data.train_y[plain[0]]
    flat = torch.cumsum((data.train_y > 0).flatten(), 0).view_as(data.train_y) - 1
    want_rows, want_tidx, want_h = flat[plain[0]][y > 0], y[y > 0] - 1, before.hidden(x)[y > 0]
    got, want = rows.argsort(), want_rows.argsort()  # a target's teacher row names it
    assert torch.equal(rows[got], want_rows[want]) and torch.equal(tidx[got], want_tidx[want])
    assert torch.allclose(h[got], want_h[want], atol=1e-5)


def test_with_prefix_samples_the_llm_teaches_sasrec_at_the_newest_position(tmp_path, monkeypatch):
    """--crm-prefixes: the SASRec stages train on prefixes, with as many targets a step on average as the LLM's
    batches of windows; the LLM stages keep windows; the LLM teaches each prefix from its state at the newest
    position, the one evaluation reads for that history."""
    cfg = cfg_for(tmp_path, crm_prefixes=True, crm_epochs=1, llm_epochs=1)
    windows, prefixes = L.load_data(cfg), L.load_data(cfg, prefixes=True)
    seen, real = [], L.train_stage

    def stage(student, teacher, data, stage_cfg, dev, **kw):
        if kw["tag"][1] == "CRM":  # before the stage: the rounds' ID update changes the LLM afterwards
            rows = torch.cat([torch.arange(0, len(data.train_x), 97), torch.arange(len(data.train_x) - 5,
                                                                                 len(data.train_x))])
            with torch.no_grad():
                want = torch.stack([teacher.model.hidden(x[x > 0][None])[0, -1] for x in data.train_x[rows]])
            assert torch.allclose(teacher.hidden[rows], want, atol=1e-5)  # one teacher row a prefix, in order
        seen.append((kw["tag"][1], data, stage_cfg.batch_size))
        return real(student, teacher, data, stage_cfg, dev, **kw)

    monkeypatch.setattr(L, "train_stage", stage)
    L.run(cfg)
    assert [s[0] for s in seen] == ["SASRec", "E4SRec", "LLM", "CRM"]
    per_window = (windows.train_y > 0).sum().item() / len(windows.train_y)
    assert per_window > 3 and prefixes.train_x.shape[0] > 3 * windows.train_x.shape[0]
    for name, data, batch in seen:
        crm = name in ("SASRec", "CRM")
        assert torch.equal(data.train_x, (prefixes if crm else windows).train_x), name
        assert batch == pytest.approx(cfg.batch_size * (per_window if crm else 1), rel=0.01), name


def test_the_reported_rounds_are_chosen_on_validation():
    def stage(rnd, name, valid, test):
        return {"round": rnd, "stage": name, "valid": {p: {"NDCG@10": valid} for p in L.PROTOCOLS},
                "test": {p: {"NDCG@10": test} for p in L.PROTOCOLS}}

    res = {"models": {}, "rounds": [stage(1, "LLM", .5, .9), stage(1, "CRM", .3, .8), stage(2, "LLM", .6, .1),
                                    stage(2, "CRM", .2, .9)]}
    L.select_best(res, "kept")
    assert res["models"]["LLMD4Rec_L"]["round"] == 2 and res["models"]["LLMD4Rec_C"]["round"] == 1
    res["rounds"][3]["valid"]["excluded"]["NDCG@10"] = .4  # selection on the other protocol
    L.select_best(res, "excluded")
    assert res["models"]["LLMD4Rec_C"]["round"] == 2


def test_a_diverged_epoch_is_never_kept(monkeypatch):
    cfg = L.Config(d=16, patience=2)
    data = L.load_data(cfg)
    crm = L.SASRec(data.num_items, cfg)
    before = {k: v.clone() for k, v in crm.state_dict().items()}
    real = L.backward

    def nan_gradients(student, *a):
        out = real(student, *a)
        for p in student.parameters():
            p.grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(L, "backward", nan_gradients)
    log = L.train_stage(crm, None, data, cfg, torch.device("cpu"), lr=1e-3, epochs=5, tag=(0, "SASRec"),
                        gen=torch.Generator().manual_seed(0))
    assert len(log) == cfg.patience  # stopped after `patience` epochs without a better validation NDCG@10
    assert math.isnan(log[0]["loss"]) and log[0]["valid"]["HR@20"] == 0
    assert all(torch.equal(before[k], v) for k, v in crm.state_dict().items())  # the starting weights, not NaN


def test_a_warm_started_stage_keeps_its_start_unless_an_epoch_beats_it(monkeypatch):
    cfg = L.Config(d=16, patience=1)
    data, dev, gen = L.load_data(cfg), torch.device("cpu"), torch.Generator().manual_seed(0)
    crm = L.SASRec(data.num_items, cfg)
    L.train_stage(crm, None, data, cfg, dev, lr=1e-2, epochs=10, tag=(0, "SASRec"), gen=gen)
    start, real = {k: v.clone() for k, v in crm.state_dict().items()}, L.backward
    start_ndcg = L.metrics(L.evaluate(crm, data.valid_x, data.valid_y, cfg.max_len)["kept"])["NDCG@10"]

    def random_steps(student, *a):  # every epoch ends worse than the trained start
        out = real(student, *a)
        for p in student.parameters():
            p.grad = torch.randn_like(p)
        return out

    monkeypatch.setattr(L, "backward", random_steps)
    for tag in ((1, "CRM"), (0, "SASRec")):  # a round's stage starts from trained weights; round 0 from scratch
        crm.load_state_dict(start)
        log = L.train_stage(crm, None, data, cfg, dev, lr=0.05, epochs=1, tag=tag, gen=gen)
        assert log[0]["valid"]["NDCG@10"] < start_ndcg - 0.1
        assert all(torch.equal(start[k], v) for k, v in crm.state_dict().items()) == (tag[0] > 0), tag


def test_the_logged_loss_is_the_mean_objective_over_the_training_targets():
    cfg = L.Config(d=16, crm_dropout=0.0, T2=2.0, lambda2=0.5)
    data, dev = L.load_data(cfg), torch.device("cpu")
    crm, other = L.SASRec(data.num_items, cfg), L.SASRec(data.num_items, cfg)
    h, y = L.hidden_at_targets(crm, data.train_x, data.train_y), data.train_y[data.train_y > 0] - 1
    with torch.no_grad():
        z, t = crm.score(h), other.score(L.hidden_at_targets(other, data.train_x, data.train_y))
        w = L.adaptive_weight(L.ranks(z, y), L.ranks(t, y))
        ce = F.cross_entropy(z, y, reduction="none")
        want = {"none": ce.mean(), "itself": ce.mean(), "another": (ce + 0.5 * w * L.kd_loss(z, t, 2.0)).mean()}
    for name, model in (("none", None), ("itself", crm), ("another", other)):  # lr 0: the student does not move
        teacher = None if model is None else L.make_teacher(model, data, cfg.T2, cfg.lambda2, True)
        log = L.train_stage(crm, teacher, data, cfg, dev, lr=0.0, epochs=1, tag=(1, "CRM"), gen=torch.Generator())
        assert log[0]["loss"] == pytest.approx(want[name].item(), rel=1e-5), name


def test_chunked_logits_give_the_same_gradient(monkeypatch):
    cfg = L.Config(d=32, llm_dim=32, llm_layers=1, llm_heads=2)
    data = L.load_data(cfg)
    crm = L.SASRec(data.num_items, cfg).eval()
    llm = L.build_llm(cfg, crm, data.num_items).eval()
    x, y = data.train_x[:64], data.train_y[:64]
    m = y > 0
    t_h = llm.hidden(x)[m].detach()
    grads, sums = [], []
    for chunk in (10 ** 6, 7):  # one chunk per batch, or many
        monkeypatch.setattr(L, "CHUNK", chunk)
        crm.zero_grad()
        teacher = L.Teacher(llm, 2.0, 0.5, True, t_h, torch.zeros(len(t_h), dtype=torch.int32), torch.zeros(len(t_h)))
        loss, better = L.backward(crm, crm.hidden(x)[m], y[m] - 1, None, teacher, torch.arange(len(t_h)))
        grads.append([p.grad.clone() for p in crm.parameters()])
        sums.append((loss.item(), int(better)))
    assert m.sum() > 7 * 10 and grads[0][0].abs().sum() > 0
    assert sums[0][1] == sums[1][1] and math.isclose(sums[0][0], sums[1][0], rel_tol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_teacher_ranks_and_entropy_kept_from_the_first_epoch_train_the_same(monkeypatch):
    """From the second epoch on the teacher's rank and sum p log p per target are read, not recomputed: the same
    training as recomputing them in every epoch."""
    cfg = L.Config(d=32, llm_dim=32, llm_layers=1, llm_heads=2, T2=2.0, patience=10)
    data = L.load_data(cfg)
    real, given = L.objective, []

    def recompute(student, h, tidx, cand, teacher, rows):
        given.append(teacher.known)
        known, teacher.known = teacher.known, False
        try:
            return real(student, h, tidx, cand, teacher, rows)
        finally:
            teacher.known = known

    logs, states = [], []
    for patch in (False, True):
        L.set_seed(0)
        crm = L.SASRec(data.num_items, cfg)
        llm = L.build_llm(cfg, crm, data.num_items)
        if patch:
            monkeypatch.setattr(L, "objective", recompute)
        logs.append(L.train_stage(crm, L.make_teacher(llm, data, cfg.T2, 1.0, True), data, cfg, torch.device("cpu"),
                                  lr=cfg.crm_lr, epochs=3, tag=(1, "CRM"), gen=torch.Generator().manual_seed(0)))
        states.append(crm.state_dict())
    n = len(given) // 3  # objective calls per epoch
    assert not any(given[:n]) and all(given[n:])  # known from the second epoch on
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], rel=1e-6)
    assert [e["teacher_better"] for e in logs[0]] == [e["teacher_better"] for e in logs[1]]
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-5), k


def test_sampled_candidates_train_and_rank_the_target(tmp_path, monkeypatch):
    _, calls = record_training(monkeypatch)
    seen, real = [], L.objective

    def spy(student, h, tidx, cand, *rest):
        seen.append((tidx, cand))
        return real(student, h, tidx, cand, *rest)

    monkeypatch.setattr(L, "objective", spy)
    cfg = cfg_for(tmp_path, num_candidates=10, rounds=1, crm_epochs=8, llm_epochs=1)
    res = L.run(cfg)
    assert res["models"]["SASRec"]["test"]["kept"]["HR@10"] > 0.3  # full-ranking evaluation still works
    for tidx, cand in seen:  # the target first, then 10 other items
        assert cand.shape == (len(tidx), 11) and (tidx == 0).all() and (cand[:, 1:] != cand[:, :1]).all()
    negatives = torch.cat([cand[:, 1:].flatten() for _, cand in seen]).unique()
    assert negatives.tolist() == list(range(1, L.load_data(cfg).num_items + 1))  # every item can be drawn
    assert {tag for tag, *_ in calls} == {(1, "LLM"), (1, "CRM")}
    for tag, s, t, y, c, _ in calls:  # w from the ranks among each step's own candidates, in every epoch
        r_s, r_t = rank_of(s, y), rank_of(t, y)
        assert torch.allclose(c, w2(r_s, r_t) if tag[1] == "CRM" else w1(r_t, r_s)), tag


def test_exclude_seen_selects_with_the_history_excluded(tmp_path, monkeypatch):
    protocols, real = [], L.select_best
    monkeypatch.setattr(L, "select_best", lambda res, protocol: protocols.append(protocol) or real(res, protocol))
    res = L.run(cfg_for(tmp_path, exclude_seen=True, crm_epochs=4, llm_epochs=2))
    assert set(protocols) == {"excluded"} and "selection: excluded" in res["protocol"]
    for stage in res["rounds"][:2]:  # early stopping read the excluded protocol: its best epoch is what was kept
        best = max(e["valid"]["NDCG@10"] for e in stage["epochs"])
        assert best == stage["valid"]["excluded"]["NDCG@10"] != stage["valid"]["kept"]["NDCG@10"], stage["stage"]


def test_a_failed_save_leaves_no_file(tmp_path):
    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot be saved")

    with pytest.raises(RuntimeError, match="cannot be saved"):  # the write fails half-way
        L.save_atomic({"model": Unsaveable()}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_existing_results_are_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "models.pt", "checkpoint.pt"):  # checkpoint.pt: a killed run, resumed, not redone
        (out / name).write_text('{"mine": 1}')
        with pytest.raises(L.UserError, match=f"already holds {name}; pass --overwrite, --resume"):
            L.run(cfg_for(tmp_path))
        assert os.listdir(out) == [name] and (out / name).read_text() == '{"mine": 1}'
        (out / name).unlink()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small default run (3 SASRec epochs, 2 LLM epochs, 1 round), shared by the tests that compare with it."""
    cfg = cfg_for(tmp_path_factory.mktemp("small"), crm_epochs=3, llm_epochs=2)
    return cfg, L.run(cfg)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, small_run):
    cfg, full = small_run
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    for stop in (1, 3):  # killed after SASRec, then again after the first LLM stage
        L.run(part if stop == 1 else L.Config(resume=part.out), stop_after=stop)
    assert L.main(["--report", part.out]) == 0  # a stopped run is reported from its checkpoint
    resumed = L.run(L.Config(resume=part.out))  # the flags come from the checkpoint

    assert resumed["models"] == full["models"]
    assert [(s["valid"], s["test"]) for s in resumed["rounds"]] == [(s["valid"], s["test"]) for s in full["rounds"]]


# ---------------------------------------------------------------------------------------------- end to end


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(HERE, "llmd4rec.py"), "--out", str(out), "--crm-epochs", "3",
           "--llm-epochs", "1", "--rounds", "1", "--d", "16", "--llm-dim", "16", "--llm-heads", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results.json").read_text())
    keys = {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}
    for name in ("SASRec", "E4SRec", "LLMD4Rec_C", "LLMD4Rec_L"):
        for split in ("valid", "test"):
            assert set(res["models"][name][split]) == {"kept", "excluded"}
            assert all(set(res["models"][name][split][p]) == keys for p in ("kept", "excluded"))
    data = L.load_data(L.Config())
    assert res["dataset"] == {"name": "synthetic", "users": 600, "items": 120, "interactions": data.num_interactions,
                              "train_targets": sum(len(s) - 3 for s in L.synthetic_sequences(0).values()),
                              "eval_users": 600}  # every synthetic user has 6 or more items
    timing, epochs = res["timing"]["round 0 SASRec"], res["rounds"][0]["epochs"]
    assert timing["epochs"] == len(epochs) and timing["seconds_per_epoch"] == pytest.approx(
        np.mean([e["seconds"] for e in epochs]))
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["d"] == 16 and resolved["llm_lr"] == 5e-4  # the tiny LLM's rate, chosen on Beauty validation
    assert "test, history kept" in p.stdout and "test, history excluded" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("synthetic data: it checks the machinery, not the method")
    # the same command again refuses to overwrite, with one line
    assert L.main(cmd[2:]) == 2 and capsys.readouterr().err.startswith(f"error: --out {out} already holds results.json")


def test_evaluate_reloads_the_reported_models_and_their_numbers(tmp_path, capsys):
    cfg = cfg_for(tmp_path, crm_epochs=3, llm_epochs=2, rounds=2, crm_ffn=48)
    res = L.run(cfg)
    saved = torch.load(os.path.join(cfg.out, "models.pt"), weights_only=False)
    assert set(saved["models"]) == set(L.MODELS) and saved["items"] == L.load_data(cfg).items
    ranks = np.load(os.path.join(cfg.out, "ranks.npz"))
    assert [res["models"][n]["valid"] for n in ("SASRec", "E4SRec")] == [s["valid"] for s in res["rounds"][:2]]
    assert L.main(["--evaluate", cfg.out]) == 0
    for p, table in zip(L.PROTOCOLS, capsys.readouterr().out.split("test, history excluded")):  # the printed tables
        row = next(l.split() for l in table.splitlines() if l.strip().startswith("NDCG@10"))
        assert [float(v) for v in row[1:]] == pytest.approx([res["models"][n]["test"][p]["NDCG@10"] for n in L.MODELS],
                                                            abs=2e-4)
    again = L.evaluate_run(cfg.out)
    for name in L.MODELS:
        for p in L.PROTOCOLS:
            assert again["models"][name]["test"][p] == pytest.approx(res["models"][name]["test"][p], abs=1e-4)
            assert L.metrics(ranks[f"{name}/{p}"]) == pytest.approx(res["models"][name]["test"][p], abs=1e-12)
    # the README's example: LLMD4Rec_C's top 10 for a history of the dataset's own item ids
    cfg, items, models = L.load_models(cfg.out)
    row = {item: j + 1 for j, item in enumerate(items)}
    history = torch.tensor([[row[i] for i in (3, 4, 5)]])
    model = models["LLMD4Rec_C"]
    top10 = [items[j] for j in model.score(model.hidden(history)[:, -1]).topk(10).indices[0]]
    assert len(set(top10)) == 10 and set(top10) <= set(items)
    assert [b.ffn[0].out_features for b in model.blocks] == [48, 48]  # --crm-ffn


def test_sasrec_alone_trains_as_in_a_full_run(tmp_path):  # the README's SASRec-only variants rely on it
    alone = L.run(cfg_for(tmp_path / "alone", crm_epochs=2, llm_epochs=0, rounds=0))
    full = L.run(cfg_for(tmp_path / "full", crm_epochs=2, llm_epochs=1, rounds=0))
    assert alone["models"]["SASRec"] == full["models"]["SASRec"]


def test_a_run_from_before_crm_ffn_reloads_with_its_ffn_d(tmp_path):
    cfg = L.Config(d=16, crm_ffn=16, out=str(tmp_path))
    crm = L.SASRec(9, cfg)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite", "crm_ffn")}
    torch.save({"config": old, "items": list(range(1, 10)), "models": {"SASRec": L.trained_state(crm)}},
               tmp_path / "models.pt")
    _, _, models = L.load_models(str(tmp_path))
    assert all(torch.equal(v, crm.state_dict()[k]) for k, v in models["SASRec"].state_dict().items())


def fake_run(folder, ranks):
    """A finished run's results.json and ranks.npz from given test ranks {model: (U,)} with history kept; excluding
    the history halves each rank."""
    os.makedirs(folder)
    ranks = {n: {"kept": r, "excluded": r // 2} for n, r in ranks.items()}
    models = {n: {"round": 0, "test": {p: L.metrics(r[p]) for p in L.PROTOCOLS}} for n, r in ranks.items()}
    with open(os.path.join(folder, "results.json"), "w") as fh:
        json.dump({"models": models}, fh)
    np.savez(os.path.join(folder, "ranks.npz"), **{f"{n}/{p}": r[p] for n, r in ranks.items() for p in L.PROTOCOLS})


def numbers(line, column=4):
    """A cell of a gain line, NDCG@10 by default (3: HR@10): gain [low, high]."""
    return [float(v) for v in line.split("|")[column].replace("[", " ").replace(",", " ").replace("]", " ").split()]


def test_report_means_and_paired_bootstrap_intervals(tmp_path, capsys):
    rng = np.random.default_rng(0)
    runs, per_user = [], []
    for seed in range(3):
        base = rng.integers(0, 40, 3000)
        better = np.where(rng.random(3000) < 0.3, base // 4, base)  # a clear gain
        same = np.where(rng.random(3000) < 0.5, base, rng.permutation(base))  # no gain on average
        runs.append(str(tmp_path / f"s{seed}"))
        fake_run(runs[-1], {"SASRec": base, "LLMD4Rec_C": better, "E4SRec": base, "LLMD4Rec_L": same})
        ndcg10 = [np.where(r < 10, 1 / np.log2(r + 2.0), 0) for r in (better, base, same)]
        per_user.append((ndcg10[0] - ndcg10[1], ndcg10[2] - ndcg10[1]))
    assert L.main(["--report"] + runs) == 0
    kept, excluded = capsys.readouterr().out.split("test, history excluded")
    res = [json.load(open(os.path.join(r, "results.json"))) for r in runs]
    widths = []  # each interval's width over the normal approximation's, +-1.96 standard errors of the mean gain
    for p, out in (("kept", kept), ("excluded", excluded)):
        ndcg = [r["models"]["LLMD4Rec_C"]["test"][p]["NDCG@10"] for r in res]
        assert f"| LLMD4Rec_C | " in out and f"{np.mean(ndcg):.4f} ± {np.std(ndcg, ddof=1):.4f}" in out
        for r, folder, diffs in zip(res, runs, per_user):
            lines = [next(l for l in out.splitlines() if l.startswith(f"| {g} | {folder} |"))
                     for g in ("LLMD4Rec_C - SASRec", "LLMD4Rec_L - E4SRec")]
            gain = {k: r["models"]["LLMD4Rec_C"]["test"][p][k] - r["models"]["SASRec"]["test"][p][k]
                    for k in ("HR@10", "NDCG@10")}
            cells = [numbers(l) for l in lines]  # NDCG@10: gain [low, high]
            value, lo, hi = cells[0]
            assert value == pytest.approx(gain["NDCG@10"], abs=1e-4) and 0 < lo < value < hi  # the interval excludes 0
            assert numbers(lines[0], 3)[0] == pytest.approx(gain["HR@10"], abs=1e-4)
            value, lo, hi = cells[1]
            assert lo < value < hi and hi - lo > 0.005
            if p == "kept":
                widths += [(c[2] - c[1]) / (2 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))) for c, d in zip(cells, diffs)]
    assert np.mean(widths) == pytest.approx(1, abs=0.06)  # 95% intervals (90% ones: about 0.84)
    assert max(abs(w - 1) for w in widths) < 0.12  # 1000 resamples: each endpoint within a few percent
    assert L.main(["--report"] + runs) == 0 and capsys.readouterr().out == kept + "test, history excluded" + excluded
    fake_run(str(tmp_path / "baselines_only"), {"SASRec": base, "E4SRec": base})
    assert L.main(["--report", runs[0], str(tmp_path / "baselines_only")]) == 0  # the models every run has
    assert "| LLMD4Rec_C |" not in capsys.readouterr().out
    assert L.main(["--report", str(tmp_path / "nothing")]) == 2


def test_report_against_the_same_budget_control(tmp_path, capsys):
    rng = np.random.default_rng(1)
    runs, controls, ndcg, gain = [], [], [], []
    for seed in range(2):
        base = rng.integers(0, 40, 3000)
        ctl = np.where(rng.random(3000) < 0.1, base // 2, base)  # the control gains a little
        better = np.where(rng.random(3000) < 0.3, base // 4, base)
        runs.append(str(tmp_path / f"s{seed}"))
        fake_run(runs[-1], {"SASRec": base, "LLMD4Rec_C": better})
        controls.append(str(tmp_path / f"s{seed}_down"))
        fake_run(controls[-1], {"SASRec": base, "LLMD4Rec_C": ctl})
        ndcg.append(L.metrics(ctl)["NDCG@10"])
        gain.append(L.metrics(better)["NDCG@10"] - ndcg[-1])
    assert L.main(["--report"] + runs + ["--control"] + controls) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("| control (no L_up) | "))
    assert f"| {np.mean(ndcg):.4f} ± {np.std(ndcg, ddof=1):.4f} |" in row
    for folder, g in zip(runs, gain):  # paired with its own control, not another seed's
        row = next(l for l in out.splitlines() if l.startswith(f"| LLMD4Rec_C - control | {folder} |"))
        value, lo, hi = numbers(row)
        assert value == pytest.approx(g, abs=1e-4) and 0 < lo < value < hi
    assert L.main(["--report"] + runs + ["--control", controls[0]]) == 2  # one control a run
    fake_run(str(tmp_path / "no_crm"), {"SASRec": rng.integers(0, 40, 3000)})
    assert L.main(["--report", runs[0], "--control", str(tmp_path / "no_crm")]) == 2
    path = os.path.join(controls[1], "results.json")
    res = json.load(open(path))
    with open(path, "w") as fh:
        json.dump({**res, "dataset": {"name": "Toys_and_Games.txt"}}, fh)
    assert L.main(["--report"] + runs + ["--control"] + controls) == 2  # a control on other data
    assert f"{controls[1]} Toys_and_Games.txt" in capsys.readouterr().err
    assert L.main(["--report"] + runs + [controls[1]]) == 2  # runs on two datasets: no mean over them
    assert L.main(["--control"] + controls) == 2  # only with --report
    assert "--control" in capsys.readouterr().err


def test_bad_data_is_one_line_before_anything_is_written(tmp_path, capsys):
    bad = write(tmp_path, "1 2 3\n2 3 oops\n")
    assert L.main(["--data", bad, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {bad}:2: expected integer ids, got 'oops'\n"
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- hardening


BAD = [  # (extra flags, exact error message); {out} and {tmp} are filled in
    (["--T1", "0"], "--crm-lr, --T1 and --T2 must be > 0"),
    (["--T2", "0"], "--crm-lr, --T1 and --T2 must be > 0"),
    (["--crm-lr", "0"], "--crm-lr, --T1 and --T2 must be > 0"),
    (["--llm-epochs", "0"], "--rounds > 0 needs an LLM stage (--llm-epochs >= 1)"),
    (["--rounds", "-1"], "--rounds must be >= 0"),
    (["--lambda2", "-0.5"], "--lambda2 must be >= 0"),
    (["--T2", "nan"], "--T2 must be a finite number"),  # passes every comparison
    (["--lambda1", "inf"], "--lambda1 must be a finite number"),
    (["--max-len", "1"], "--max-len must be >= 2"),
    (["--direction", "sideways"], "--direction must be both, up or down"),
    (["--d", "30", "--crm-heads", "4"], "--d must be divisible by --crm-heads"),
    (["--llm-dim", "30", "--llm-heads", "4"], "--llm-dim must be divisible by --llm-heads"),
    (["--device", "gpu"], "--device must be auto, cpu or cuda"),
    (["--llm-heads", "0"], "--llm-heads must be >= 1"),
    (["--llm-dim", "0"], "--llm-dim must be >= 1"),
    (["--num-candidates", "120"], "--num-candidates must be < the number of items (120)"),
    (["--data", "{tmp}/missing.txt"], "{tmp}/missing.txt: file not found (expected a dataset file or 'synthetic')"),
    (["--data", "{tmp}/three.txt"], "three.txt: no user has 4 or more items; nothing to train on"),
    (["--data", "{tmp}/two.txt"], "two.txt: no user has 3 or more items; nothing to validate or test on"),
    (["--crm-dropout", "1"], "dropouts: in [0, 1)"),
    (["--lora-dropout", "-0.1"], "dropouts: in [0, 1)"),
    (["--llm", "no-such-org/no-such-model"], None),  # message checked by prefix below
    (["--resume", "{tmp}/out"], "--resume and --overwrite exclude each other"),
    (["--out", "{tmp}/three.txt/run"], "--out {tmp}/three.txt/run: {tmp}/three.txt is a file; expected a folder"),
]


@pytest.mark.parametrize("flags, message", BAD)
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    (tmp_path / "three.txt").write_text("1 1 2 3\n2 2 3 4\n")
    (tmp_path / "two.txt").write_text("1 1 2\n2 2 3\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier results")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert L.main(["--out", str(out), "--overwrite", "--crm-epochs", "1", "--llm-epochs", "1"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    if message is None:
        assert err.startswith("error: --llm no-such-org/no-such-model: cannot load (not a local folder")
    else:
        assert err == f"error: {message.format(tmp=tmp_path)}\n"
    assert os.listdir(out) == ["results.json"] and (out / "results.json").read_text() == "earlier results"


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"), (["--patience", "0"], "--patience must be >= 1"),
    (["--d", "0"], "--d must be >= 1"), (["--crm-blocks", "0"], "--crm-blocks must be >= 1"),
    (["--crm-heads", "0"], "--crm-heads must be >= 1"), (["--crm-ffn", "0"], "--crm-ffn must be >= 1"),
    (["--crm-epochs", "0"], "--crm-epochs must be >= 1"), (["--llm-layers", "0"], "--llm-layers must be >= 1"),
    (["--lora-r", "0"], "--lora-r must be >= 1"), (["--llm-epochs", "-1"], "--llm-epochs must be >= 0"),
    (["--num-candidates", "-1"], "--num-candidates must be >= 0"), (["--lambda1", "-1"], "--lambda1 must be >= 0"),
    (["--llm-lr", "-0.0001"], "--llm-lr must be >= 0")])
def test_every_lower_bound_is_checked(flags, message):
    with pytest.raises(L.UserError) as e:
        L.check_config(L.parse_args(flags)[0])
    assert str(e.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda(tmp_path, capsys):
    assert L.main(["--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: --device cuda: CUDA is not available here\n"


def test_resume_after_a_crash_mid_stage(tmp_path, monkeypatch, small_run):
    cfg, full = small_run
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    calls, real = [], L.evaluate

    def crash(*a, **kw):  # dies inside the LLM stage of round 1, before that stage is saved
        calls.append(1)
        if len(calls) == 14:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(L, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        L.run(part)
    monkeypatch.setattr(L, "evaluate", real)
    assert not os.path.exists(os.path.join(part.out, "results.json"))
    resumed = L.run(dataclasses.replace(part, resume=part.out))
    assert resumed["models"] == full["models"]


def test_resume_from_the_command_line_takes_the_runs_flags(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = ["--d", "16", "--llm-dim", "16", "--llm-layers", "1", "--llm-heads", "2", "--crm-epochs", "2",
             "--llm-epochs", "1", "--rounds", "1", "--out", out]
    L.run(L.parse_args(flags)[0], stop_after=2)  # killed after round 0
    assert L.main(["--resume", out, "--d", "32"]) == 2  # a flag that contradicts the run: refused, nothing changes
    assert capsys.readouterr().err == (f"error: --resume {out} continues with the flags the run was started with; "
                                       "given otherwise: --d 32 (the run: 16)\n")
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert L.main(["--resume", out, "--baselines", os.path.join(out, "baselines.pt")]) == 2
    assert capsys.readouterr().err == "error: --resume and --baselines exclude each other\n"
    if not torch.cuda.is_available():  # a CUDA run resumed on a machine without CUDA: refused
        moved = str(tmp_path / "moved")
        shutil.copytree(out, moved)
        state = torch.load(os.path.join(moved, "checkpoint.pt"), weights_only=False)
        state["config"]["device"] = "cuda"
        torch.save(state, os.path.join(moved, "checkpoint.pt"))
        assert L.main(["--resume", moved]) == 2
        assert capsys.readouterr().err == "error: --device cuda: CUDA is not available here\n"
    assert L.main(["--resume", out, "--d", "16"]) == 0
    assert "starting from " + out + " after stage 2 of 4" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "config.json")))["d"] == 16
    assert [s["stage"] for s in json.load(open(os.path.join(out, "results.json")))["rounds"]] == ["SASRec", "E4SRec",
                                                                                                  "LLM", "CRM"]


def test_unreadable_checkpoint_is_refused(tmp_path):
    cfg = cfg_for(tmp_path)
    os.makedirs(cfg.out)
    with open(os.path.join(cfg.out, "checkpoint.pt"), "wb") as fh:
        fh.write(b"PK\x03\x04 half a file")
    with pytest.raises(L.UserError, match="cannot be read"):
        L.run(L.Config(resume=cfg.out))
    torch.save({"config": {"d": 64, "no_such_flag": 1}}, os.path.join(cfg.out, "checkpoint.pt"))
    with pytest.raises(L.UserError, match="written by another version"):
        L.run(L.Config(resume=cfg.out))


def test_named_dataset_download_verify_and_cache(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "tiny.txt").write_text("1 1 2 3 4\n2 2 3 4 5\n")
    good = hashlib.sha256((src / "tiny.txt").read_bytes()).hexdigest()
    monkeypatch.setattr(L, "DATA_URL", src.as_uri() + "/")
    monkeypatch.setenv("LLMD4REC_CACHE", str(tmp_path / "cache"))
    # a corrupted download: clear error, nothing cached
    monkeypatch.setitem(L.DATASETS, "tiny", ("tiny.txt", "0" * 64))
    with pytest.raises(L.UserError, match="expected 0000.*nothing was cached"):
        L.fetch_dataset("tiny")
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.setitem(L.DATASETS, "tiny", ("tiny.txt", good))
    path = L.fetch_dataset("tiny")
    assert path == str(tmp_path / "cache" / "tiny.txt") and L.read_sequences(path) == {1: [1, 2, 3, 4], 2: [2, 3, 4, 5]}
    # cached: the mirror can disappear
    (src / "tiny.txt").unlink()
    assert L.fetch_dataset("tiny") == path
    (tmp_path / "cache" / "tiny.txt").write_text("1 1 2 3 4\n")  # a cached copy changed since: refused
    with pytest.raises(L.UserError, match="does not match its pinned sha256"):
        L.fetch_dataset("tiny")
    # offline with no cached copy: says where to put the file
    os.remove(path)
    with pytest.raises(L.UserError, match=f"cannot download .*put tiny.txt at {path}"):
        L.fetch_dataset("tiny")


def test_ablation_from_saved_baselines_equals_a_full_run(tmp_path, small_run):
    first, first_res = small_run  # the same data and model flags; every other flag changed
    cfg = dataclasses.replace(first, rounds=2, T1=2.0, T2=0.5, lambda1=0.5, lambda2=2.0, direction="up",
                              no_weight=True, no_id_update=True, out=str(tmp_path / "full"))
    full = L.run(cfg)
    assert first_res["models"]["SASRec"] == full["models"]["SASRec"]  # a seeded run repeats its round 0
    baselines = os.path.join(first.out, "baselines.pt")
    ablation = L.run(dataclasses.replace(cfg, out=str(tmp_path / "ablation"), baselines=baselines))
    assert ablation["models"] == full["models"]
    with pytest.raises(L.UserError, match=r"flags differ .*baselines.pt: --d 32 \(now 16\)$"):  # other model flags
        L.run(dataclasses.replace(cfg, d=16, out=str(tmp_path / "other"), baselines=baselines))
    with pytest.raises(L.UserError, match=r"flags differ .*baselines.pt: --seed 0 \(now 1\)$"):  # another seed's
        L.run(dataclasses.replace(cfg, seed=1, out=str(tmp_path / "other"), baselines=baselines))
    finished = os.path.join(first.out, "checkpoint.pt")  # a finished run's last checkpoint: its rounds are done
    with pytest.raises(L.UserError, match=r"after stage 4 of its run, not after round 0 \(stage 2\); pass that run's"):
        L.run(dataclasses.replace(cfg, out=str(tmp_path / "late"), baselines=finished))
