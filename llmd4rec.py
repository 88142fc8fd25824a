"""LLMD4Rec: bidirectional knowledge distillation between SASRec and an LLM-centric recommender.

Paper: Wu et al., "Bidirectional Knowledge Distillation for Enhancing Sequential Recommendation with
Large Language Models", https://arxiv.org/abs/2505.18120 (2025).

A conventional recommender (CRM, SASRec) and an LLM-centric recommender (E4SRec-style: the CRM's item
embeddings enter the LLM as soft tokens, a new layer W_out scores every item) are trained in turns.
Downward, the frozen CRM teaches the LLM (L_down); upward, the frozen LLM teaches the CRM (L_up). Each
sample is weighted by how much better the teacher ranks the true item than the student (w1, w2).
After training SASRec is served alone: LLMD4Rec_C costs exactly what SASRec costs at inference.

Notation (paper -> code):
    E_c                  SASRec item embeddings            SASRec.item_emb / LLMScorer.E_c (frozen copy)
    W_in, W_out          soft-token projection, item head  LLMScorer.W_in, LLMScorer.W_out
    z_c, z_l             CRM / LLM logits over items       logits returned by .score()
    T1, T2               temperatures (down / up)          Config.T1, Config.T2
    lambda1, lambda2     distillation weights              Config.lambda1, Config.lambda2
    r_c, r_l             rank of the true item (0 = top)   ranks()
    w1, w2               sample-wise adaptive weights      adaptive_weights()
    L_down, L_up         KL(p_c || p_l), KL(p_l || p_c)    kd_loss(student, teacher, T)
    L_LLM, L_CRM         CE + lambda * w * T^2 * KL        objective() with a Teacher; fused: distill_ce()

Run:
    python llmd4rec.py                                    # synthetic data, about a minute on a laptop CPU
    python llmd4rec.py --data Beauty.txt --out runs/beauty
    python llmd4rec.py --report runs/beauty_s0 runs/beauty_s1  # mean ± sd, each gain with a 95% interval
    python llmd4rec.py --help
"""
import argparse
import ctypes
import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
import socket
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Config


def arg(default, help):
    """A Config field whose help text becomes the flag's --help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data and run
    data: str = arg("synthetic", "dataset file ('user item item ...' a line, or 'user item' pairs), "
                    "'synthetic', or beauty | sports | toys | yelp (downloaded once, sha256-checked)")
    out: str = arg("runs/default", "folder for results.json, ranks.npz, models.pt, config.json and checkpoint.pt")
    overwrite: bool = arg(False, "allow replacing the results of an earlier run in --out")
    resume: str = arg("", "folder of an interrupted run: continue it from its last finished stage, with its flags")
    baselines: str = arg("", "start the rounds from an earlier run's baselines.pt (same data and model flags)")
    seed: int = arg(0, "seed for data generation, initialisation, shuffling and dropout")
    device: str = arg("auto", "auto | cpu | cuda (auto picks CUDA when present)")
    max_len: int = arg(50, "history length: only the last max_len items of a history are used")
    exclude_seen: bool = arg(False, "select (early stopping, rounds) with the history excluded; both are reported")
    batch_size: int = arg(128, "training windows per batch")
    patience: int = arg(3, "early stopping: epochs without a better validation NDCG@10")
    # CRM: SASRec
    d: int = arg(64, "SASRec width (item embedding size d)")
    crm_blocks: int = arg(2, "SASRec self-attention blocks")
    crm_heads: int = arg(1, "SASRec attention heads")
    crm_ffn: int = arg(64, "SASRec feed-forward inner size (the original SASRec's: d; RecBole's: 256)")
    crm_dropout: float = arg(0.3, "SASRec dropout")
    crm_lr: float = arg(2e-3, "SASRec learning rate (Adam)")
    crm_epochs: int = arg(40, "SASRec epochs per stage, at most (early stopping)")
    crm_prefixes: bool = arg(False, "SASRec stages train on every prefix of a training sequence, its next item the one "
                             "target (RecBole's samples), instead of windows; the LLM keeps windows")
    # LLM-centric recommender (E4SRec-style)
    llm: str = arg("tiny", "'tiny' (small random decoder, trained fully) or a Hugging Face name/folder (LoRA)")
    llm_dim: int = arg(128, "tiny backbone: hidden size D")
    llm_layers: int = arg(2, "tiny backbone: decoder layers")
    llm_heads: int = arg(4, "tiny backbone: attention heads")
    llm_dropout: float = arg(0.0, "dropout on the soft tokens (and attention, for tiny); 0 won on validation")
    llm_lr: float = arg(0.0, "the E4SRec baseline's learning rate (the rounds' LLM stages: half); 0: 5e-4 for tiny, "
                             "E4SRec's 3e-4 for LoRA on a pretrained --llm")
    llm_epochs: int = arg(10, "LLM epochs per stage, at most (early stopping); 0 = no LLM stage")
    lora_r: int = arg(16, "LoRA rank (pretrained --llm only)")
    lora_alpha: float = arg(16.0, "LoRA alpha (pretrained --llm only)")
    lora_dropout: float = arg(0.05, "LoRA dropout (pretrained --llm only)")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj", "comma-separated module names that get LoRA adapters")
    num_candidates: int = arg(0, "0: score the whole catalogue; K > 0: train on the target + K sampled negatives")
    # LLMD4Rec
    rounds: int = arg(3, "distillation rounds R after the two baselines (0 = baselines only)")
    T1: float = arg(1.0, "temperature of L_down (CRM -> LLM)")
    T2: float = arg(1.0, "temperature of L_up (LLM -> CRM)")
    lambda1: float = arg(1.0, "weight of L_down in the LLM objective")
    lambda2: float = arg(1.0, "weight of L_up in the CRM objective")
    direction: str = arg("both", "both | up (LLM -> CRM only) | down (CRM -> LLM only)")
    no_weight: bool = arg(False, "ablation: w1 = w2 = 1 (no sample-wise adaptive weights)")
    no_id_update: bool = arg(False, "ablation: keep the LLM's soft-token embeddings from the first SASRec")


def flag(name):
    """The command-line flag of a Config field: crm_lr -> --crm-lr."""
    return "--" + name.replace("_", "-")


def parse_args(argv=None):
    """(Config, commands): every Config field is a flag; --evaluate and --report are commands on finished runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = dict(action="store_true") if f.type in (bool, "bool") else dict(type=type(f.default), default=f.default)
        p.add_argument(flag(f.name), help=f.metadata["help"], **kind)
    p.add_argument("--evaluate", metavar="OUT", default="",
                   help="reload the four models a finished run in OUT reports and print their test table")
    p.add_argument("--report", metavar="RUN", nargs="+", default=[],
                   help="runs' folders (seeds): mean +- sd of the four models, each run's gains with 95%% intervals")
    p.add_argument("--control", metavar="RUN", nargs="+", default=[],
                   help="with --report: each run's same-budget control (--direction down from its baselines.pt), in "
                        "order; adds the control's SASRec side and each run's LLMD4Rec_C gain over it")
    args = vars(p.parse_args(argv))
    commands = {k: args.pop(k) for k in ("evaluate", "report", "control")}
    return Config(**args), commands


class UserError(Exception):
    """Bad input (data, flags, files): reported as one line, before any training."""


def check_config(cfg):
    at_least = dict(max_len=2, batch_size=1, patience=1, d=1, crm_blocks=1, crm_heads=1, crm_ffn=1, crm_epochs=1,
                    llm_dim=1, llm_layers=1, llm_heads=1, lora_r=1, llm_epochs=0, rounds=0, num_candidates=0,
                    lambda1=0, lambda2=0, llm_lr=0)
    floats = [f.name for f in dataclasses.fields(cfg) if f.type in (float, "float")]  # argparse takes 'nan', 'inf'
    problems = [(not math.isfinite(getattr(cfg, k)), f"{flag(k)} must be a finite number") for k in floats] + [
        (getattr(cfg, k) < v, f"{flag(k)} must be >= {v}") for k, v in at_least.items()] + [
        (min(cfg.crm_lr, cfg.T1, cfg.T2) <= 0, "--crm-lr, --T1 and --T2 must be > 0"),
        (cfg.d % max(cfg.crm_heads, 1) != 0, "--d must be divisible by --crm-heads"),
        (cfg.llm_dim % max(cfg.llm_heads, 1) != 0, "--llm-dim must be divisible by --llm-heads"),
        (not all(0 <= p < 1 for p in (cfg.crm_dropout, cfg.llm_dropout, cfg.lora_dropout)), "dropouts: in [0, 1)"),
        (cfg.rounds > 0 and cfg.llm_epochs == 0, "--rounds > 0 needs an LLM stage (--llm-epochs >= 1)"),
        (cfg.direction not in ("both", "up", "down"), "--direction must be both, up or down"),
        (cfg.device not in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
        (cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda: CUDA is not available here"),
        (cfg.resume != "" and cfg.overwrite, "--resume and --overwrite exclude each other"),
        (cfg.resume != "" and cfg.baselines != "", "--resume and --baselines exclude each other")]
    for bad, msg in problems:
        if bad:
            raise UserError(msg)


def fewer_page_faults():
    """Speed only (CPU, Linux): glibc maps each (targets x items) logit tensor fresh, and the page faults cost as
    much as the arithmetic; keeping freed memory in the heap makes a full-softmax step over 12k items ~2x faster."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap
        libc.mallopt(-2, 1 << 30)  # M_TOP_PAD: grow and trim the heap in 1 GiB steps
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def set_seed(seed):  # every random draw here comes from torch's global generator or a seeded generator
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Data: the paper's one-user-a-line format or SASRec's 'user item' pairs; leave-one-out split


def read_sequences(path):
    """Read a dataset file into {user: [item, ...]} (time order), with clear errors for bad input."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found (expected a dataset file or 'synthetic')")
    rows = []  # (line number, [ints])
    with open(path, encoding="utf-8-sig", errors="replace") as fh:  # -sig: a leading BOM is not an id
        for lineno, line in enumerate(fh, 1):
            toks = line.split()
            for tok in toks:
                if not tok.removeprefix("-").isdecimal():  # int() refuses '²' (a digit to isdigit()) and '--5'
                    raise UserError(f"{path}:{lineno}: expected integer ids, got {tok!r}")
                if int(tok) <= 0:
                    raise UserError(f"{path}:{lineno}: expected positive ids (0 is padding), got {tok}")
            if toks:
                rows.append((lineno, [int(tok) for tok in toks]))
    if not rows:
        raise UserError(f"{path}: empty file (expected 'user_id item_id item_id ...' lines)")
    users = [ids[0] for _, ids in rows]
    pairs = all(len(ids) == 2 for _, ids in rows) and len(set(users)) < len(users)
    seqs, first_line = {}, {}
    for lineno, ids in rows:
        if pairs:
            seqs.setdefault(ids[0], []).append(ids[1])
            continue
        if len(ids) < 2:
            raise UserError(f"{path}:{lineno}: user {ids[0]} has no items (expected 'user_id item_id item_id ...')")
        if ids[0] in seqs:
            raise UserError(f"{path}:{lineno}: user {ids[0]} appears again (first on line {first_line[ids[0]]}); "
                            "expected one line per user")
        seqs[ids[0]], first_line[ids[0]] = ids[1:], lineno
    return seqs


def synthetic_sequences(seed, n_users=600, n_items=120, n_clusters=6):
    """Users drift between latent item clusters; inside a cluster each item tends to lead to a fixed next one."""
    rng = np.random.default_rng(seed)
    size = n_items // n_clusters
    successor = np.zeros(n_items + 1, dtype=np.int64)
    for c in range(n_clusters):
        members = c * size + 1 + rng.permutation(size)
        successor[members] = np.roll(members, -1)  # a cycle through the cluster
    seqs = {}
    for u in range(1, n_users + 1):
        c = int(rng.integers(n_clusters))
        seq = [c * size + 1 + int(rng.integers(size))]
        for _ in range(int(rng.integers(5, 20))):
            r = rng.random()
            c = (c + 1) % n_clusters if r < 0.1 else c  # drift to the neighbouring cluster
            seq.append(int(successor[seq[-1]]) if 0.1 <= r < 0.75 else c * size + 1 + int(rng.integers(size)))
        seqs[u] = seq
    return seqs


def left_pad(rows, L=None):
    """(len(rows), L) int64 tensor (L: the longest row by default), each row right-aligned, 0 = padding."""
    L = L or max(map(len, rows))
    out = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, -len(r[-L:]):] = torch.tensor(r[-L:])
    return out


@dataclass
class Data:
    name: str
    items: list  # the dataset's item id of model row 1..N: items[row - 1]
    num_users: int
    num_items: int
    num_interactions: int
    train_x: torch.Tensor  # (W, L) input windows (or prefixes), left-padded
    train_y: torch.Tensor  # (W, L) next-item targets, 0 where there is none (a prefix: its last column only)
    valid_x: torch.Tensor  # (U, H) whole histories for the validation targets; the models read the last max_len
    valid_y: torch.Tensor  # (U,)
    test_x: torch.Tensor   # (U, H) whole histories (including the validation item) for the test targets
    test_y: torch.Tensor   # (U,)


def split(seqs, max_len, name, prefixes=False):
    """Remap ids to 1..N and split leave-one-out: last item = test, second-to-last = validation; users with fewer than
    3 items only train. Every training position predicts its next item, in windows of at most max_len inputs; or
    (prefixes) every prefix of a training sequence is a sample, its last max_len items the input, the next item its
    one target, as RecBole trains SASRec: the same targets, read at the newest position as evaluation reads them."""
    raw_ids = sorted({it for s in seqs.values() for it in s})
    item_ids = {it: i + 1 for i, it in enumerate(raw_ids)}
    train_x, train_y, valid_x, valid_y, test_x, test_y = [], [], [], [], [], []
    for items in seqs.values():
        s = [item_ids[it] for it in items]
        train = s[:-2] if len(s) >= 3 else s
        if len(s) >= 3:
            valid_x.append(s[:-2]), valid_y.append(s[-2])
            test_x.append(s[:-1]), test_y.append(s[-1])
        inp, tgt = train[:-1], train[1:]
        if prefixes:
            for end in range(1, len(train)):
                x = inp[max(0, end - max_len):end]
                train_x.append(x), train_y.append([0] * (len(x) - 1) + [tgt[end - 1]])
            continue
        # NOTE: deviation: SASRec keeps only the last max_len positions of a long sequence; we cut it into
        # windows so that every training position is a target once.
        for end in range(len(inp), 0, -max_len):
            train_x.append(inp[max(0, end - max_len):end]), train_y.append(tgt[max(0, end - max_len):end])
    if not test_y:
        raise UserError(f"{name}: no user has 3 or more items; nothing to validate or test on")
    if not any(train_y):
        raise UserError(f"{name}: no user has 4 or more items; nothing to train on")
    if prefixes:  # speed only: shortest first, so that a teacher's consecutive rows (make_teacher) pad little
        order = sorted(range(len(train_x)), key=lambda i: len(train_x[i]))
        train_x, train_y = [train_x[i] for i in order], [train_y[i] for i in order]
    return Data(name, raw_ids, len(seqs), len(item_ids), sum(len(s) for s in seqs.values()),
                left_pad(train_x, max_len), left_pad(train_y, max_len), left_pad(valid_x),
                torch.tensor(valid_y), left_pad(test_x), torch.tensor(test_y))


# The paper's preprocessed files in the data/ folder of salesforce/ICLRec (as S3Rec and E4SRec use), sha256-pinned.
DATA_URL = "https://raw.githubusercontent.com/salesforce/ICLRec/master/data/"
DATASETS = {"beauty": ("Beauty.txt", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
            "sports": ("Sports_and_Outdoors.txt", "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2"),
            "toys": ("Toys_and_Games.txt", "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f"),
            "yelp": ("Yelp.txt", "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed")}


def fetch_dataset(name):
    """Path of a named dataset in the cache ($LLMD4REC_CACHE or ~/.cache/llmd4rec), downloaded once and verified."""
    file, digest = DATASETS[name]
    cache = os.environ.get("LLMD4REC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmd4rec")
    path, url = os.path.join(cache, file), DATA_URL + file
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
        except OSError as e:
            raise UserError(f"--data {name}: cannot download {url} ({e}); put {file} at {path}") from None
        if hashlib.sha256(body).hexdigest() != digest:
            raise UserError(f"--data {name}: {url} has sha256 {hashlib.sha256(body).hexdigest()}, expected {digest}; "
                            "nothing was cached")
        save_atomic(body, path)
    elif hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest:
        raise UserError(f"--data {name}: {path} does not match its pinned sha256 {digest}; delete it to download again")
    return path


def load_data(cfg, prefixes=False):
    if cfg.data == "synthetic":
        return split(synthetic_sequences(cfg.seed), cfg.max_len, "synthetic", prefixes)
    path = fetch_dataset(cfg.data) if cfg.data in DATASETS else cfg.data
    return split(read_sequences(path), cfg.max_len, os.path.basename(path), prefixes)


# ----------------------------------------------------------------------------------------------------
# CRM: SASRec (Kang & McAuley, ICDM 2018), pre-LN blocks, item embeddings tied to the output


# NOTE: deviation: pre-LN blocks as SASRec's paper writes them, x + Dropout(g(LN(x))) (its code normalises only the
# queries and adds the residual after the LayerNorm), with a GELU feed-forward (its: ReLU) and N(0, 0.02) init;
# the item embeddings enter unscaled (its code multiplies them by sqrt(d)); each of its three choices scores lower
# on validation with history kept (README). Trained with cross-entropy over all items (METHOD.md's choice:
# distillation needs a full distribution).
class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x)) with FFN d -> ffn -> d."""

    def __init__(self, d, heads, dropout, ffn):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):  # x (B, L, d), mask (B, 1, L, L) True = may attend
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))  # (B, L, d)
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    """The CRM: causal self-attention over item ids; z_c = h_u . E^T scores every item."""

    def __init__(self, num_items, cfg):
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, cfg.d, padding_idx=0)  # E_c; row 0 = padding
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d)  # position = distance from the newest item
        self.drop = nn.Dropout(cfg.crm_dropout)
        self.blocks = nn.ModuleList(Block(cfg.d, cfg.crm_heads, cfg.crm_dropout, cfg.crm_ffn)
                                    for _ in range(cfg.crm_blocks))
        self.ln = nn.LayerNorm(cfg.d)
        for p in [p for p in self.parameters() if p.dim() == 2]:  # small init: N(0, 1) embeddings train badly here
            nn.init.normal_(p, std=0.02)
        self.item_emb.weight.data[0] = 0

    def hidden(self, seq):  # seq (B, L) left-padded item ids -> (B, L, d)
        B, L = seq.shape
        valid = seq > 0
        pos = torch.arange(L - 1, -1, -1, device=seq.device)  # (L,) distance from the right end
        x = self.drop(self.item_emb(seq) + self.pos_emb(pos))  # (B, L, d)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        # a query may see earlier real items, and always itself (so padding rows are never empty)
        mask = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=seq.device)  # (B, L, L)
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.ln(x)

    def score(self, h, cand=None):  # h (M, d); cand None -> (M, N) over items 1..N, else (M, C)
        return h @ self.item_emb.weight[1:].T if cand is None else torch.einsum("md,mcd->mc", h, self.item_emb(cand))


# ----------------------------------------------------------------------------------------------------
# LLM-centric recommender (E4SRec, Li et al. 2023): instruction tokens, then soft tokens W_in . E_c[item]


INSTRUCTION = "Given the user's purchase history, predict next possible item to be purchased. ### Input:"


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with B = 0 at start, so the adapted layer equals the base layer."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base, self.scale, self.drop = base, alpha / r, nn.Dropout(dropout)
        self.A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (self.drop(x) @ self.A.T @ self.B.T) * self.scale


def add_lora(model, targets, r, alpha, dropout):
    """Freeze model and wrap its nn.Linear children named in targets with LoRA adapters; return the count."""
    model.requires_grad_(False)
    hits = [(m, n) for m in model.modules() for n, c in m.named_children() if n in targets and isinstance(c, nn.Linear)]
    for m, n in hits:
        setattr(m, n, LoRALinear(getattr(m, n), r, alpha, dropout))
    return len(hits)


def load_backbone(cfg):
    """(backbone without token head, prompt token ids). 'tiny' is built from a config; anything else loaded."""
    from transformers import AutoModel, AutoTokenizer, Qwen2Config
    if cfg.llm == "tiny":  # NOTE: deviation: random init, trained fully (the paper: pretrained Qwen1.5-0.5B + LoRA)
        vocab = {w: i for i, w in enumerate(sorted(set(INSTRUCTION.split())))}  # the prompt's own words: no download
        ids = [vocab[w] for w in INSTRUCTION.split()]
        conf = Qwen2Config(vocab_size=len(vocab), hidden_size=cfg.llm_dim, intermediate_size=4 * cfg.llm_dim,
                           num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                           num_key_value_heads=cfg.llm_heads, max_position_embeddings=cfg.max_len + len(ids),
                           attention_dropout=cfg.llm_dropout, initializer_range=0.02)
        return AutoModel.from_config(conf, attn_implementation="sdpa"), ids
    local = os.path.isdir(cfg.llm)
    for offline in (True, False):  # the local cache first, so that an offline machine answers at once
        try:  # fp32 weights; bf16 compute comes from autocast on CUDA
            tok = AutoTokenizer.from_pretrained(cfg.llm, local_files_only=offline)
            model = AutoModel.from_pretrained(cfg.llm, local_files_only=offline, attn_implementation="sdpa",
                                              dtype=torch.float32)
            break
        except Exception as e:
            where = ("a local folder" if local else "not a local folder, not in the local cache, and the hub is "
                     "unreachable") if offline else "from the hub"
            if not offline or local or not hub_reachable():
                raise UserError(f"--llm {cfg.llm}: cannot load ({where}): {str(e).splitlines()[0][:200]}") from None
    n = add_lora(model, set(cfg.lora_targets.split(",")), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    if n == 0:
        raise UserError(f"--lora-targets {cfg.lora_targets}: no such nn.Linear modules in {cfg.llm}")
    return model, tok(INSTRUCTION).input_ids


def hub_reachable(timeout=3.0):  # from_pretrained retries for about a minute before it fails offline
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class LLMScorer(nn.Module):
    """[instruction tokens][W_in . E_c[i_1]] ... [W_in . E_c[i_n]] -> last hidden states -> W_out -> z_l."""

    def __init__(self, backbone, prompt_ids, E_c, num_items, dropout):
        super().__init__()
        self.backbone, D = backbone, backbone.config.hidden_size
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long))
        self.register_buffer("E_c", E_c.detach().clone())  # (N+1, d) frozen; refreshed by the ID update
        self.W_in = nn.Linear(E_c.shape[1], D)
        self.W_out = nn.Linear(D, num_items, bias=False)  # one row per item 1..N
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.W_out.weight, std=0.02)

    # NOTE: deviation: E4SRec runs one forward per prefix, ending in a response prompt. We run one causal pass
    # over [instruction][i_1 .. i_n] and read the hidden state at every item, so all n targets cost one
    # forward; the response prompt is dropped (it cannot follow every prefix in one causal pass).
    def hidden(self, seq):  # seq (B, L) left-padded item ids -> (B, L, D)
        from transformers import DynamicCache
        B, L = seq.shape
        P = len(self.prompt_ids)
        valid = (seq > 0).long()
        soft = self.drop(self.W_in(self.E_c[seq]))  # (B, L, D) soft tokens
        att = torch.cat([torch.ones(B, P, dtype=torch.long, device=seq.device), valid], 1)  # padding sits between
        pos = P + (valid.cumsum(1) - 1).clamp(min=0)  # positions as if the padding were not there
        with torch.autocast("cuda", torch.bfloat16, enabled=seq.is_cuda and torch.cuda.is_bf16_supported()):
            # NOTE: deviation: the instruction is the same for every user and comes first, so its keys and values are
            # computed once per forward: the same outputs in evaluation, while in training the dropout on the
            # instruction's tokens (tiny: attention; pretrained: LoRA's) is shared by a length group's sequences.
            cache = DynamicCache(config=self.backbone.config)
            self.backbone(input_ids=self.prompt_ids[None], cache=cache, use_cache=True)
            cache.batch_repeat_interleave(B)
            h = self.backbone(inputs_embeds=soft.to(self.backbone.dtype), attention_mask=att, position_ids=pos,
                              cache=cache, use_cache=True).last_hidden_state
        return h.float()  # the state at item t predicts item t+1

    def score(self, h, cand=None):  # h (M, D) -> (M, N), or (M, C) over candidates
        return self.W_out(h) if cand is None else torch.einsum("md,mcd->mc", h, self.W_out.weight[cand - 1])


def build_llm(cfg, crm, num_items):
    import transformers
    backbone, prompt_ids = load_backbone(cfg)
    # LLMScorer.hidden passes the instruction's keys and values as `cache`; older transformers (5.17, for one) call it
    # past_key_values and ignore `cache` without a word, which would silently drop the instruction
    if "cache" not in inspect.signature(backbone.forward).parameters:
        raise UserError(f"--llm {cfg.llm}: {type(backbone).__name__}.forward takes no 'cache' argument under "
                        f"transformers {transformers.__version__}; install the version in requirements.txt")
    return LLMScorer(backbone, prompt_ids, crm.item_emb.weight, num_items, cfg.llm_dropout)


# ----------------------------------------------------------------------------------------------------
# Losses and sample-wise adaptive weights: the paper's definitions, then the fused form that training runs


def kd_loss(student_logits, teacher_logits, T):
    """L_down (student LLM, teacher CRM, T = T1) or L_up (student CRM, teacher LLM, T = T2), per sample:
    T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over items; the teacher is detached. (M,)"""
    log_p_t = F.log_softmax(teacher_logits.detach() / T, -1)
    log_p_s = F.log_softmax(student_logits / T, -1)
    return T * T * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def ranks(logits, target_idx):
    """r_c or r_l: rank of the target (0 = top), the number of other items not scoring below it, so ties never
    favour it; a NaN or infinite target score (a diverged model) gets the worst rank, N - 1. (M,)"""
    t = logits.gather(1, target_idx[:, None])
    r = logits.shape[1] - 1 - (logits < t).sum(1, dtype=torch.int32)
    return torch.where(torch.isfinite(t[:, 0]), r, logits.shape[1] - 1)


def adaptive_weight(r_student, r_teacher):
    """Large when the teacher ranks the true item better than the student, small when worse; in [0, 2]."""
    r_s, r_t = r_student.float(), r_teacher.float()
    up = 1 + (r_s - r_t) / r_t.clamp(min=1)  # teacher better (r_s > r_t)
    down = 1 - (r_t - r_s) / r_s.clamp(min=1)
    return torch.where(r_s > r_t, up, down).clamp(0, 2)


def adaptive_weights(r_c, r_l):
    """(w1, w2): w1 weights L_down (the LLM learning from the CRM), w2 weights L_up (the CRM learning from the LLM)."""
    return adaptive_weight(r_l, r_c), adaptive_weight(r_c, r_l)


def softmax_lse(x):
    """softmax(x) over the last dim and logsumexp(x), from one exp per element."""
    p = torch.softmax(x, -1)
    return p, x.amax(-1) - p.amax(-1).log()  # p at the arg-max is exp(max - lse) >= 1/N, so its log is safe


class _DistillCE(torch.autograd.Function):
    """CE(s, target) + c * kd_loss(s, t, T) per row, with each softmax computed once and the gradient written out:
    (p_s - onehot(target)) + c * T * (p_s^T - p_t^T). Speed only (autograd over kd_loss took 1.09-1.24x as long per
    batch at Beauty's size). Also returns the teacher's sum_j p_t,j log p_t,j per row, which is fixed while the
    teacher is: given back as t_negent, it spares a pass over the teacher's logits."""

    @staticmethod
    def forward(ctx, s, t, target, c, T, t_negent):
        ctx.T, ctx.dtype = T, s.dtype
        s, t, c = s.float(), t.float(), c.float()
        p_s, lse_s = softmax_lse(s)
        s_T, t_T = (s, t) if T == 1 else (s / T, t / T)
        p_sT, lse_sT = (p_s, lse_s) if T == 1 else softmax_lse(s_T)
        if t_negent is None:  # sum_j p_t,j log p_t,j with log p_t,j = t_j / T - lse(t / T)
            p_tT, lse_tT = softmax_lse(t_T)
            t_negent = torch.linalg.vecdot(p_tT, t_T) - lse_tT
        else:
            p_tT = torch.softmax(t_T, -1)
        # KL = sum_j p_t,j log p_t,j - sum_j p_t,j log p_s,j with log p_s,j = s_j / T - lse(s / T)
        kl = (t_negent - torch.linalg.vecdot(p_tT, s_T) + lse_sT).clamp_(min=0)
        loss = c * (T * T) * kl + lse_s - s.gather(1, target[:, None]).squeeze(1)
        ctx.save_for_backward(p_s, p_sT, p_tT, target, c)
        ctx.mark_non_differentiable(t_negent)
        return loss, t_negent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        p_s, p_sT, p_tT, target, c = ctx.saved_tensors
        k = (grad * c * ctx.T)[:, None]  # (M, 1) weight of the KD gradient per row
        if ctx.T == 1:  # p_s^T is p_s: two passes, (grad + k) p_s - k p_t
            g = p_s.mul_(grad[:, None] + k).addcmul_(p_tT, k, value=-1)
        else:
            g = p_sT.sub_(p_tT).mul_(k).add_(p_s.mul_(grad[:, None]))
        g.scatter_add_(1, target[:, None], -grad[:, None])
        return g.to(ctx.dtype), None, None, None, None, None


def distill_ce(student_logits, teacher_logits, target, c, T, t_negent=None):
    """CE(student, target) + c * kd_loss(student, teacher, T), fused (M,); and the teacher's sum p log p (M,)."""
    return _DistillCE.apply(student_logits, teacher_logits.detach(), target, c, T, t_negent)


# ----------------------------------------------------------------------------------------------------
# Evaluation: full ranking over all items


KS = (5, 10, 20)
KEYS = [f"HR@{k}" for k in KS] + [f"NDCG@{k}" for k in KS]
PROTOCOLS = ("kept", "excluded")  # the user's history kept in the ranking, or excluded from it


def first_item_column(x):
    """Index of the first column that is not padding in every row: the columns before it can be dropped."""
    return int((x > 0).any(0).long().argmax())


@torch.no_grad()
def evaluate(model, x, y, max_len, protocols=PROTOCOLS, batch=1024):
    """Rank of each target among all N items (0 = top): {protocol: (U,) int32}. 'kept' ranks the whole catalogue;
    'excluded' removes every item of the user's whole history x from the ranking, except the target itself."""
    model.eval()
    dev = next(model.parameters()).device
    order = (x[:, -max_len:] > 0).sum(1).argsort(stable=True)  # short histories together: little padding
    out = {p: torch.empty(len(y), dtype=torch.int32) for p in protocols}
    for i in range(0, len(y), batch):
        idx = order[i:i + batch]
        hist, tgt = x[idx][:, first_item_column(x[idx]):].to(dev), y[idx].to(dev)  # hist (B, H)
        scores = model.score(model.hidden(hist[:, -max_len:])[:, -1])  # (B, N); the last max_len columns hold items
        if "kept" in out:
            out["kept"][idx] = ranks(scores, tgt - 1).cpu()
        if "excluded" in out:
            seen = torch.zeros(len(tgt), scores.shape[1] + 1, dtype=torch.bool, device=dev).scatter_(1, hist, True)
            seen[:, 1:].scatter_(1, (tgt - 1)[:, None], False)
            out["excluded"][idx] = ranks(scores.masked_fill(seen[:, 1:], float("-inf")), tgt - 1).cpu()
    return out


def metrics(r):
    """HR@k and NDCG@k from the targets' ranks (0 = top)."""
    r = torch.as_tensor(r).double()
    return {**{f"HR@{k}": (r < k).double().mean().item() for k in KS},
            **{f"NDCG@{k}": torch.where(r < k, 1 / torch.log2(r + 2), 0.0).mean().item() for k in KS}}


def evaluate_splits(model, data, cfg):
    """({split: {protocol: metrics}}, the test ranks {protocol: (U,)})."""
    valid = evaluate(model, data.valid_x, data.valid_y, cfg.max_len)
    test = evaluate(model, data.test_x, data.test_y, cfg.max_len)
    return {"valid": {p: metrics(valid[p]) for p in PROTOCOLS}, "test": {p: metrics(test[p]) for p in PROTOCOLS}}, test


# ----------------------------------------------------------------------------------------------------
# Training: one stage = one model trained with CE (+ weighted KD from a frozen teacher), early stopping


@dataclass
class Teacher:
    """A stage's frozen teacher: SASRec in L_LLM = CE + lambda1 * w1 * L_down, the LLM in L_CRM = CE + lambda2 * w2 *
    L_up. In eval mode, what it gives a target is fixed: its hidden state (computed when the stage starts), its rank
    of the true item and sum p log p (kept from the first epoch); its logits are recomputed (targets x items)."""
    model: nn.Module
    T: float
    lam: float
    weighted: bool  # False: the --no-weight ablation, w = 1
    hidden: torch.Tensor  # (M_all, D) at every training target, in the order of data.train_y > 0
    rank: torch.Tensor  # (M_all,) rank of the true item, once known
    negent: torch.Tensor  # (M_all,) sum_j p_j log p_j at temperature T, once known
    known: bool = False  # rank and negent filled (from the second epoch; never with sampled candidates)


@torch.no_grad()
def make_teacher(model, data, T, lam, weighted, batch=512):
    model.eval()  # NOTE: deviation: the frozen teacher runs without dropout; the paper does not say
    dev = next(model.parameters()).device
    hidden = torch.cat([hidden_at_targets(model, data.train_x[i:i + batch].to(dev), data.train_y[i:i + batch].to(dev))
                        for i in range(0, len(data.train_x), batch)])
    return Teacher(model, T, lam, weighted, hidden, torch.zeros(len(hidden), dtype=torch.int32, device=dev),
                   torch.zeros(len(hidden), device=dev))


LENGTH_GROUPS = torch.tensor([4, 8, 16, 32])  # a step's windows of 1-4, 5-8, 9-16, 17-32, 33+ items: one forward each


def batches(data, size, gen):
    """Plain shuffled batches of `size` training windows; each step averages over their targets. Speed only: a batch
    runs as LENGTH_GROUPS, each padded to its own longest window (one padded batch took 1.7x (SASRec) and 2.2x (LLM)
    the time per target on Beauty, where most windows are short). [[group of window indices, ...], ...]"""
    group = torch.bucketize((data.train_x > 0).sum(1), LENGTH_GROUPS)  # (W,)
    return [[g for g in idx[group[idx].argsort(stable=True)].split(group[idx].bincount().tolist()) if len(g)]
            for idx in torch.randperm(len(data.train_x), generator=gen).split(size)]


def hidden_at_targets(model, x, y):
    """Hidden states at the training targets y > 0 of windows or prefixes x (W, L), row by row. (M, D)"""
    c = first_item_column(x)
    return model.hidden(x[:, c:])[y[:, c:] > 0]


CHUNK = 2048  # training targets whose (targets x items) logits are held at once


def objective(student, h, tidx, cand, teacher, rows):
    """The student's loss summed over the rows of h (M, D): CE, plus lam * w * T^2 * KL from the teacher (its entries
    `rows` belong to these targets); and how many rows the teacher ranks the true item better than the student."""
    logits = student.score(h, cand)  # (M, N) or (M, 1+K)
    if teacher is None:
        return F.cross_entropy(logits.float(), tidx, reduction="sum"), 0
    with torch.no_grad():
        t_logits = teacher.model.score(teacher.hidden[rows], cand)
    # NOTE: deviation: the student's rank (so w) comes from its training forward, dropout on; the paper does not say
    r_s = ranks(logits.detach(), tidx)
    r_t = teacher.rank[rows] if teacher.known else ranks(t_logits, tidx)
    w = adaptive_weight(r_s, r_t) if teacher.weighted else torch.ones_like(r_s, dtype=torch.float)  # w1 or w2
    loss, negent = distill_ce(logits, t_logits, tidx, teacher.lam * w, teacher.T,
                              teacher.negent[rows] if teacher.known else None)
    if not teacher.known:
        teacher.rank[rows], teacher.negent[rows] = r_t, negent
    return loss.sum(), (r_t < r_s).sum()


def backward(student, h, tidx, cand, teacher, rows):
    """Back-propagate the objective averaged over the rows of h (M, D), CHUNK rows at a time (the same gradient, with
    the (M x items) logits' memory bounded by the chunk); return its sum and the teacher-better count."""
    h_chunks = h.detach().requires_grad_()
    total, better = 0.0, 0
    for i in range(0, len(h), CHUNK):
        r = slice(i, i + CHUNK)
        loss, n_better = objective(student, h_chunks[r], tidx[r], None if cand is None else cand[r], teacher,
                                   None if rows is None else rows[r])
        (loss / len(h)).backward()
        total, better = total + loss.detach(), better + n_better
    h.backward(h_chunks.grad)
    return total, better


def train_stage(student, teacher, data, cfg, dev, *, lr, epochs, tag, gen):
    """Train `student` (with a Teacher, or CE alone) for at most `epochs`; keep the best weights on validation."""
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    flat = torch.cumsum((data.train_y > 0).flatten(), 0).view_as(data.train_y) - 1  # (W, L): a target's teacher row
    sel = "excluded" if cfg.exclude_seen else "kept"  # the protocol that selects: the only one needed here
    validate = lambda: metrics(evaluate(student, data.valid_x, data.valid_y, cfg.max_len, [sel])[sel])
    # NOTE: deviation: the paper gives no schedule; each stage is a fresh Adam with early stopping, and a
    # warm-started stage keeps its starting weights if no epoch beats them on validation.
    best = validate()["NDCG@10"] if tag[0] > 0 else -1.0
    best_state, bad, log = {k: v.clone() for k, v in student.state_dict().items()}, 0, []
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        student.train()
        tot, n, better = torch.zeros((), device=dev), 0, torch.zeros((), device=dev)  # summed on the device
        for groups in batches(data, cfg.batch_size, gen):
            idx = torch.cat(groups)
            m = data.train_y[idx] > 0
            target = data.train_y[idx][m].to(dev)  # (M,) in the order of the groups' hidden states
            cand, tidx = None, target - 1  # tidx: the target's column in the logits
            # NOTE: deviation (extension): sampled candidates replace the full softmax in training only
            if cfg.num_candidates > 0:  # target first, then K negatives drawn uniformly from the other items
                neg = torch.randint(1, data.num_items, (len(target), cfg.num_candidates), generator=gen).to(dev)
                cand = torch.cat([target[:, None], neg + (neg >= target[:, None]).long()], 1)  # (M, 1+K)
                tidx = torch.zeros_like(target)
            rows = flat[idx][m].to(dev) if teacher is not None else None
            h = torch.cat([hidden_at_targets(student, data.train_x[g].to(dev), data.train_y[g].to(dev))
                           for g in groups])  # (M, D)
            opt.zero_grad(set_to_none=True)
            loss, n_better = backward(student, h, tidx, cand, teacher, rows)
            opt.step()
            tot, n, better = tot + loss, n + len(target), better + n_better
        valid = validate()
        line = {"epoch": epoch, "loss": tot.item() / n, "valid": valid, "seconds": time.time() - t0}
        if teacher is not None:
            teacher.known = cfg.num_candidates == 0  # every target was visited once
            line["teacher_better"] = better.item() / n  # share of samples with r_teacher < r_student
        log.append(line)
        print(f"round {tag[0]} | {tag[1]:6s} | epoch {epoch:3d} | loss {line['loss']:.4f} | valid HR@10 "
              f"{valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f} | {line['seconds']:.1f} s", flush=True)
        if valid["NDCG@10"] > best and math.isfinite(line["loss"]):  # a diverged epoch is never kept
            best, bad = valid["NDCG@10"], 0
            best_state = {k: v.clone() for k, v in student.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    student.load_state_dict(best_state)
    return log


# ----------------------------------------------------------------------------------------------------
# The alternating loop


def stages(cfg):
    """Round 0: the SASRec and E4SRec baselines. Rounds 1..R: LLM (CE + L_down), then CRM (CE + L_up)."""
    return ([(0, "SASRec")] + [(0, "E4SRec")] * (cfg.llm_epochs > 0)
            + [(r, name) for r in range(1, cfg.rounds + 1) for name in ("LLM", "CRM")])


def baseline_stages(cfg):
    """How many stages round 0 has: after them a run writes baselines.pt."""
    return sum(r == 0 for r, _ in stages(cfg))


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if path.endswith(".npz"):
                np.savez_compressed(fh, **obj)
            elif path.endswith(".pt"):
                torch.save(obj, fh)
            else:  # bytes, or JSON
                fh.write(obj if isinstance(obj, bytes) else json.dumps(obj, indent=2).encode())
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def read_state(path, flag):
    """A checkpoint written by a finished stage (save_atomic never leaves half a file under this name)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{flag}: {path} cannot be read ({type(e).__name__}); it was not written by a finished stage")


def resume(cfg):
    """--resume OUT: the interrupted run's flags (flags given with it must agree) and its last checkpoint."""
    state = read_state(os.path.join(cfg.resume, "checkpoint.pt"), "--resume " + cfg.resume)
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    if set(state["config"]) != set(defaults) - {"resume", "overwrite"}:
        raise UserError(f"--resume {cfg.resume}: checkpoint.pt was written by another version of llmd4rec.py")
    saved = Config(**{**state["config"], "out": cfg.resume, "resume": cfg.resume})
    clash = [f"{flag(k)} {v} (the run: {getattr(saved, k)})" for k, v in dataclasses.asdict(cfg).items()
             if k not in ("resume", "overwrite") and v != defaults[k] and v != getattr(saved, k)]
    if clash:
        raise UserError(f"--resume {cfg.resume} continues with the flags the run was started with; "
                        f"given otherwise: {', '.join(clash)}")
    check_config(dataclasses.replace(saved, baselines=""))  # e.g. a CUDA run resumed on a machine without CUDA
    return saved, state


def prepare_out(cfg):
    """Refuse to touch an earlier run's results unless asked; return the checkpoint to start from, if any."""
    taken = [f for f in ("results.json", "models.pt", "checkpoint.pt") if os.path.exists(os.path.join(cfg.out, f))]
    if taken and not cfg.overwrite:
        raise UserError(f"--out {cfg.out} already holds {', '.join(taken)}; pass --overwrite, --resume {cfg.out} "
                        "or another --out")
    folder = Path(cfg.out)
    while not folder.exists():  # the part of --out that exists must be a folder
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"--out {cfg.out}: {folder} is a file; expected a folder")
    if not cfg.baselines:
        return None
    state = read_state(cfg.baselines, "--baselines")  # round 0 needs the same data and model flags
    leave_out = ("out", "resume", "overwrite", "baselines", "rounds", "T1", "T2", "lambda1", "lambda2", "direction",
                 "no_weight", "no_id_update")
    then, now = ({k: v for k, v in c.items() if k not in leave_out} for c in (state["config"], dataclasses.asdict(cfg)))
    if then != now:
        diff = ", ".join(f"{flag(k)} {then.get(k)} (now {v})" for k, v in now.items() if then.get(k) != v)
        raise UserError(f"--baselines: the flags differ from those of the run that wrote {cfg.baselines}: {diff}")
    n0 = baseline_stages(cfg)
    if state["done"] != n0:  # a later checkpoint.pt would skip the rounds and report its own run's
        raise UserError(f"--baselines: {cfg.baselines} was written after stage {state['done']} of its run, not after "
                        f"round 0 (stage {n0}); pass that run's baselines.pt")
    return state


def trained_state(model):
    """The model's state without frozen pretrained weights (reloaded from --llm): what a stage changes, and buffers."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in frozen}


def load_trained(model, state):
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(not model.get_parameter(k).requires_grad for k in missing), missing


MODELS = ("SASRec", "LLMD4Rec_C", "E4SRec", "LLMD4Rec_L")


def run(cfg, stop_after=None):
    """Train the baselines and R rounds, write OUT/results.json, ranks.npz, models.pt; stop_after (tests): a kill."""
    check_config(cfg)
    cfg, state = resume(cfg) if cfg.resume else (cfg, None)
    cfg = dataclasses.replace(cfg, llm_lr=cfg.llm_lr or (5e-4 if cfg.llm == "tiny" else 3e-4))
    data = load_data(cfg)
    crm_data, crm_cfg = data, cfg  # what the SASRec stages train on, and their batch size
    if cfg.crm_prefixes:  # a batch of prefixes holds as many targets, on average, as a batch of windows
        crm_data = load_data(cfg, prefixes=True)
        crm_cfg = dataclasses.replace(cfg, batch_size=round(cfg.batch_size * crm_data.train_y.count_nonzero().item()
                                                            / len(data.train_y)))
    if cfg.num_candidates >= data.num_items:
        raise UserError(f"--num-candidates must be < the number of items ({data.num_items})")
    state = prepare_out(cfg) if state is None else state
    dev = torch.device("cuda" if cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    fewer_page_faults()
    set_seed(cfg.seed)
    crm = SASRec(data.num_items, cfg).to(dev)
    llm = build_llm(cfg, crm, data.num_items).to(dev) if cfg.llm_epochs > 0 else None
    set_seed(cfg.seed + 1)  # training draws the same dropout whether or not an LLM was built (--llm-epochs 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    cfg_dict = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite")}
    res = {"dataset": {"name": data.name, "users": data.num_users, "items": data.num_items,
                       "interactions": data.num_interactions, "train_targets": int((data.train_y > 0).sum()),
                       "eval_users": len(data.test_y)},
           "protocol": f"leave-one-out, full ranking over all items, rank = other items scoring >= target, the user's "
                       f"history kept and excluded (selection: {'excluded' if cfg.exclude_seen else 'kept'}), "
                       f"max_len {cfg.max_len}", "models": {}, "rounds": [], "timing": {}}
    done, reported, test_ranks = 0, {}, {}  # the reported models' weights and per-user test ranks
    if state is not None:
        crm.load_state_dict(state["crm"])
        if llm is not None:
            load_trained(llm, state["llm"])
        res, done, reported, test_ranks = state["results"], state["done"], state["reported"], state["ranks"]
        torch.set_rng_state(state["rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:  # dropout on the GPU draws from its own stream
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        gen.set_state(state["gen"])
        print(f"starting from {cfg.resume or cfg.baselines} after stage {done} of {len(stages(cfg))}")
    print(f"data {data.name}: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions | "
          f"device {dev} | protocol: {res['protocol']}")
    os.makedirs(cfg.out, exist_ok=True)
    for i, (rnd, name) in enumerate(stages(cfg)):
        if i < done:
            continue
        t0 = time.time()
        # NOTE: deviation: the paper gives no rates for the rounds; a round's LLM stage, which starts from an LLM at
        # its validation peak, trains at half the LLM's rate (selected on validation: README, Variants of the method)
        model, lr, epochs, stage_data, stage_cfg = ((crm, cfg.crm_lr, cfg.crm_epochs, crm_data, crm_cfg)
                                                     if name in ("SASRec", "CRM") else
                                                     (llm, cfg.llm_lr / (2 if rnd else 1), cfg.llm_epochs, data, cfg))
        if name == "E4SRec":  # the E4SRec baseline reads the SASRec baseline's embeddings
            llm.E_c.copy_(crm.item_emb.weight.detach())
        teacher = None
        if name == "LLM" and cfg.direction != "up":  # L_LLM = CE + lambda1 * w1 * L_down, SASRec teaching
            teacher = make_teacher(crm, data, cfg.T1, cfg.lambda1, not cfg.no_weight)
        if name == "CRM" and cfg.direction != "down":  # L_CRM = CE + lambda2 * w2 * L_up, the LLM teaching
            teacher = make_teacher(llm, crm_data, cfg.T2, cfg.lambda2, not cfg.no_weight)
        log = train_stage(model, teacher, stage_data, stage_cfg, dev, lr=lr, epochs=epochs, tag=(rnd, name), gen=gen)
        scores, ranks_now = evaluate_splits(model, data, cfg)
        seconds = time.time() - t0
        res["rounds"].append({"round": rnd, "stage": name, **scores, "seconds": seconds, "epochs": log})
        res["timing"][f"round {rnd} {name}"] = {"seconds": seconds, "epochs": len(log),
                                                "seconds_per_epoch": sum(e["seconds"] for e in log) / len(log)}
        if rnd == 0:
            res["models"][name] = {"round": 0, **scores}
        select_best(res, "excluded" if cfg.exclude_seen else "kept")
        for key in ("SASRec", "LLMD4Rec_C") if model is crm else ("E4SRec", "LLMD4Rec_L"):
            if res["models"].get(key, {}).get("round") == rnd:  # a model results.json reports: keep it
                reported[key], test_ranks[key] = trained_state(model), ranks_now
        if name == "CRM" and not cfg.no_id_update:  # ID embedding update: the LLM's soft tokens follow SASRec
            llm.E_c.copy_(crm.item_emb.weight.detach())
        state = {"config": cfg_dict, "crm": crm.state_dict(), "llm": trained_state(llm) if llm else None,
                 "results": res, "done": i + 1, "reported": reported, "ranks": test_ranks,
                 "rng": torch.get_rng_state(), "gen": gen.get_state(),
                 "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        save_atomic(state, os.path.join(cfg.out, "checkpoint.pt"))
        if i + 1 == baseline_stages(cfg):  # the baselines, for --baselines
            save_atomic(state, os.path.join(cfg.out, "baselines.pt"))
        if stop_after is not None and i + 1 >= stop_after:
            return None
    save_atomic({"config": cfg_dict, "items": data.items, "models": reported}, os.path.join(cfg.out, "models.pt"))
    save_atomic({f"{n}/{p}": r.numpy() for n, rr in test_ranks.items() for p, r in rr.items()},
                os.path.join(cfg.out, "ranks.npz"))
    save_atomic(cfg_dict, os.path.join(cfg.out, "config.json"))
    save_atomic(res, os.path.join(cfg.out, "results.json"))
    print_table(res)
    if cfg.data == "synthetic":
        print("synthetic data: it checks the machinery, not the method; both baselines already sit at the data's "
              "ceiling, so the rounds cannot show a gain (README, 'The default run')")
    return res


def select_best(res, protocol):
    """LLMD4Rec_C / _L: the CRM / LLM of the round with the best validation NDCG@10 (never a test metric)."""
    for key, stage in (("LLMD4Rec_C", "CRM"), ("LLMD4Rec_L", "LLM")):
        cands = [s for s in res["rounds"] if s["stage"] == stage]
        if cands:
            best = max(cands, key=lambda s: s["valid"][protocol]["NDCG@10"])
            res["models"][key] = {"round": best["round"], "valid": best["valid"], "test": best["test"]}


def print_table(res):
    names = [n for n in MODELS if n in res["models"]]
    for p in PROTOCOLS:
        print(f"\ntest, history {p:8s} " + "".join(f"{n:>12s}" for n in names))
        for k in KEYS:
            print(f"{k:>8s}{'':17s}" + "".join(f"{res['models'][n]['test'][p][k]:12.4f}" for n in names))


def load_models(out):
    """The models that OUT/results.json reports, as they were evaluated, on the CPU: (Config, items, {name: model}),
    items[j] the dataset's id of the item in score column j."""
    saved = read_state(os.path.join(out, "models.pt"), "--evaluate " + out)
    saved["config"].setdefault("crm_ffn", saved["config"]["d"])  # a run from before --crm-ffn: FFN d -> d
    cfg, items, models = Config(**saved["config"]), saved["items"], {}
    for name, state in saved["models"].items():
        crm = SASRec(len(items), cfg)
        models[name] = crm if name in ("SASRec", "LLMD4Rec_C") else build_llm(cfg, crm, len(items))
        load_trained(models[name], state)
    return cfg, items, models


def evaluate_run(out):
    """--evaluate OUT: the reported models reloaded from OUT/models.pt and evaluated on the test split again."""
    cfg, _, models = load_models(out)
    data = load_data(cfg)
    ranks_of = {name: evaluate(model, data.test_x, data.test_y, cfg.max_len) for name, model in models.items()}
    res = {"models": {name: {"test": {p: metrics(r[p]) for p in PROTOCOLS}} for name, r in ranks_of.items()}}
    print_table(res)
    return res


def load_run(d):
    """(folder, results, test ranks) of a finished run, or of the stages so far of one stopped early."""
    if os.path.isfile(f"{d}/results.json") and os.path.isfile(f"{d}/ranks.npz"):
        return d, json.load(open(f"{d}/results.json")), np.load(f"{d}/ranks.npz")
    st = read_state(f"{d}/checkpoint.pt", f"--report {d}")
    return d, st["results"], {f"{n}/{p}": r.numpy() for n, rs in st["ranks"].items() for p, r in rs.items()}


def report(runs, controls=(), resamples=1000):
    """--report RUN [RUN ...]: mean ± sd over the runs (seeds) of the four models, both protocols; each run's gain of
    LLMD4Rec_C over SASRec, LLMD4Rec_L over E4SRec, with a 95% interval from a paired bootstrap over test users.
    controls (--control): one a run, the same budget without L_up; their SASRec side, LLMD4Rec_C's gain over it."""
    loaded, ctl = [load_run(d) for d in runs], [load_run(d) for d in controls]
    names = [n for n in MODELS if all(n in res["models"] for _, res, _ in loaded)]
    data = {d: res.get("dataset") for d, res, _ in loaded + ctl}  # results.json's name and counts
    if any(v != data[runs[0]] for v in data.values()):
        raise UserError("--report: the runs are not all on the same data: "
                        + ", ".join(f"{d} {(v or {}).get('name')}" for d, v in data.items()))
    if ctl and (len(ctl) != len(runs) or "LLMD4Rec_C" not in names
                or any("LLMD4Rec_C" not in c["models"] for _, c, _ in ctl)):
        raise UserError("--control: one run per --report run, in the same order, each with a CRM round (LLMD4Rec_C)")
    sd = (lambda v: f" ± {np.std(v, ddof=1):.4f}") if len(runs) > 1 else (lambda v: "")
    at10 = {"HR@10": lambda r: (r < 10) * 1.0, "NDCG@10": lambda r: np.where(r < 10, 1 / np.log2(r + 2.0), 0.0)}
    for p in PROTOCOLS:
        print(f"\ntest, history {p}, mean{' ± sd' * (len(runs) > 1)} over {len(runs)} run(s)\n\n| model | "
              + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
        rows = [(n, [res["models"][n] for _, res, _ in loaded]) for n in names]
        rows += [("control (no L_up)", [res["models"]["LLMD4Rec_C"] for _, res, _ in ctl])] if ctl else []
        for n, found in rows:
            vals = [[m["test"][p][k] for m in found] for k in KEYS]
            print(f"| {n} | " + " | ".join(f"{np.mean(v):.4f}{sd(v)}" for v in vals) + " |")
        print("\n| gain, 95% interval (paired bootstrap over test users) | run | HR@10 | NDCG@10 |\n|---|---|---|---|")
        pairs = [g for g in (("LLMD4Rec_C", "SASRec"), ("LLMD4Rec_L", "E4SRec")) if set(g) <= set(names)]
        gains = [(f"{new} - {old}", d, rk[f"{new}/{p}"], rk[f"{old}/{p}"]) for new, old in pairs for d, _, rk in loaded]
        gains += [("LLMD4Rec_C - control", d, rk[f"LLMD4Rec_C/{p}"], ck[f"LLMD4Rec_C/{p}"])
                  for (d, _, rk), (_, _, ck) in zip(loaded, ctl)]
        for label, d, new, old in gains:
            cells, rng = [], np.random.default_rng(0)  # the same resampled users for every gain
            for f in at10.values():
                diff = f(new) - f(old)  # (U,) per-user gain
                boot = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)  # resampled test users
                lo, hi = np.percentile(boot, [2.5, 97.5])
                cells.append(f"{diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")
            print(f"| {label} | {d} | " + " | ".join(cells) + " |")


def main(argv=None):
    cfg, commands = parse_args(argv)
    try:
        if commands["report"]:
            report(commands["report"], commands["control"])
        elif commands["control"]:
            raise UserError("--control goes with --report")
        elif commands["evaluate"]:
            evaluate_run(commands["evaluate"])
        else:
            run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
