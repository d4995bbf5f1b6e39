"""DashFusion's label-aware partner retrieval (``__gen_cos_matrix`` + ``__pre_sample``) without O(N²) Python.

Official semantics (method_dashfusion.md §5): row i ranks all N training samples by descending cosine similarity of
the pooled (t̄, v̄, ā) features (itself included, normally at rank 0). Scanning rank positions j:

* ss: the first k positions in the top window [0, int(N·window_top)) whose sample has the same label;
* sd: the first k there with a different label;
* dd: the first k with a different label scanning from the bottom, positions N−1, N−2, … down to
  N − int(N·window_bottom) + 1 (official ``range(-1, -int(N·w), -1)``).

Default (intended): pools hold **sample indices**, self excluded by id. ``rank_index_bug=True`` (released code): pools
hold the **rank positions** themselves (used as dataset indices by the official ``sample()``), and the self-skip
compares i with the position j (ss/sd only; it never fires in the bottom scan). Windows (official): MOSI 1 / 1, MOSEI
1/2 / 1/8, SIMS 1/1.6 / 1/2.

Algorithm (intended semantics): rows sorted by label, so each class is a contiguous column slice; per block of rows
one GEMM against all N rows, then plain top-k calls on slices: ss = top-(k+1) of the own class minus self, sd / dd =
top-k / bottom-k of the other classes. Windows are checked by counting similarities above the last pool member.
``rank_index_bug=True`` needs the rank positions themselves: the sorted top / bottom K = 64 of each row are scanned,
deepening (K × 4) for rows that do not fill their pools (rare labels) until the window is covered. Both equal a scan
of the full sort up to the order of exactly tied similarities (which ``torch.sort`` leaves unspecified too).
On CPU the top-k selections run in the C++ ``row_topk`` (one pass per row over column ranges, ties by column),
elsewhere ``torch.topk`` on slices.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("ss", "sd", "dd")
_FIRST_K = 64


def label_aware_partners(features: Tensor, labels: Tensor, k: int = 10, rank_index_bug: bool = False,
                         window_top: float = 1.0, window_bottom: float = 1.0, *, block: int = 2048,
                         device: Optional[Union[str, torch.device]] = None) -> dict[str, Tensor]:
    """features (N, F), labels (N,) (already rounded where the dataset asks) → {"ss", "sd", "dd"}: (N, k) int64 on
    the CPU, −1 where fewer than k qualify. ``device``: where the GEMMs run (default: the features' device)."""
    _check(features, labels, k, window_top, window_bottom)
    dev = torch.device(device) if device is not None else features.device
    x = F.normalize(features.detach().to(dev, torch.float32), dim=1)
    lab = labels.detach().to(dev)
    n = x.shape[0]
    w_top = min(int(n * window_top), n)
    w_bot = max(min(int(n * window_bottom), n) - 1, 0)  # number of bottom positions scanned
    if rank_index_bug:
        return _positions_scan(x, lab, k, w_top, w_bot, block)
    return _class_sliced(x, lab, k, w_top, w_bot, block)


def _class_sliced(x: Tensor, lab: Tensor, k: int, w_top: int, w_bot: int, block: int) -> dict[str, Tensor]:
    """Intended semantics. Rows sorted by label make every class a contiguous column slice, so per row block
    ss = top-(k+1) of the own-class slice minus self, sd / dd = top-k / bottom-k of the other slices, each a plain
    top-k on a view (no masks). When a rank window can bind, the lists are lengthened to K = 64: the rank position
    of a pool member is then the number of list entries above it (exact whenever both lists reach below it), and only
    the rare rows where they do not are counted over the full row."""
    n = x.shape[0]
    perm = torch.argsort(lab, stable=True)
    xp, lp = x[perm], lab[perm]
    _, counts = torch.unique_consecutive(lp, return_counts=True)
    bounds = torch.cumsum(counts, 0).tolist()
    seg = list(zip([0] + bounds[:-1], bounds))  # class slices [start, end) in permuted order
    check_top, check_bot = w_top < n, w_bot < n - 1
    len_top = max(_FIRST_K, k + 1) if check_top else k + 1
    len_bot = max(_FIRST_K, k) if check_bot else k
    out = {kind: torch.full((n, k), -1, dtype=torch.long, device=x.device) for kind in KINDS}
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        sim = xp[r0:r1] @ xp.T  # (b, N) permuted columns
        for cs, ce in seg:
            a, b = max(cs, r0), min(ce, r1)
            if a >= b:
                continue
            s = sim[a - r0:b - r0]
            me = torch.arange(a, b, device=x.device)
            others = [(0, cs), (ce, n)]
            own_v, own_i = _topk_slices(s, [(cs, ce)], len_top, True)
            # Others ranked above the k-th same-label member: about k·(N − N_c)/N_c; list them all (window check).
            len_oth = min(n, max(len_top, 2 * (k + 1) * n // (ce - cs))) if check_top else k
            oth_v, oth_i = _topk_slices(s, others, len_oth, True)
            bot_v, bot_i = _topk_slices(s, others, len_bot, False)
            not_me = own_i != me[:, None]
            order = (~not_me).to(torch.int8).argsort(dim=1, stable=True)[:, :k]  # self (if listed) to the end
            ss_v = own_v.gather(1, order).masked_fill(~not_me.gather(1, order), float("-inf"))
            ss_i = own_i.gather(1, order).masked_fill(~not_me.gather(1, order), -1)
            sd_v, sd_i = oth_v[:, :k], oth_i[:, :k]
            dd_v, dd_i = bot_v[:, :k], bot_i[:, :k]
            if check_top:
                ss_i = _window(s, ss_v, ss_i, [own_v, oth_v], True, lambda pos: pos < w_top)
                sd_i = _window(s, sd_v, sd_i, [own_v, oth_v], True, lambda pos: pos < w_top)
            if check_bot:
                own_bot, _ = _topk_slices(s, [(cs, ce)], len_bot, False)
                dd_i = _window(s, dd_v, dd_i, [own_bot, bot_v], False, lambda below: below <= w_bot - 1)
            for kind, idx in (("ss", ss_i), ("sd", sd_i), ("dd", dd_i)):
                out[kind][perm[a:b]] = torch.where(idx >= 0, perm[idx.clamp_min(0)], idx)
    return {kind: v.cpu() for kind, v in out.items()}


def _row_topk_kernel(s: Tensor):
    """The C++ ``row_topk`` (one pass per row over column ranges, OpenMP) for float32 CPU blocks, else None."""
    if s.device.type != "cpu" or s.dtype != torch.float32:
        return None
    from .._ext import cpp_extension

    return getattr(cpp_extension(), "row_topk", None)


def _topk_slices(s: Tensor, slices: list[tuple[int, int]], k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k over the union of column slices of s (b, N) → (values, column indices) (b, k), −1 / ∓inf padded."""
    kernel = _row_topk_kernel(s)
    if kernel is not None:
        return kernel(s, [c for sl in slices for c in sl], k, largest)
    fill = float("-inf") if largest else float("inf")
    vals, idxs = [], []
    for c0, c1 in slices:
        if c1 > c0:
            v, i = s[:, c0:c1].topk(min(k, c1 - c0), dim=1, largest=largest, sorted=True)
            vals.append(v)
            idxs.append(i + c0)
    if not vals:
        return (torch.full((s.shape[0], k), fill, device=s.device),
                torch.full((s.shape[0], k), -1, dtype=torch.long, device=s.device))
    v, i = torch.cat(vals, 1), torch.cat(idxs, 1)
    kk = min(k, v.shape[1])
    v2, pos = v.topk(kk, dim=1, largest=largest, sorted=True)
    i2 = i.gather(1, pos)
    return F.pad(v2, (0, k - kk), value=fill), F.pad(i2, (0, k - kk), value=-1)


def _window(s: Tensor, vals: Tensor, idx: Tensor, lists: list[Tensor], from_top: bool, inside) -> Tensor:
    """Drop pool members (vals/idx (b, k)) outside the rank window. ``inside`` gets, per member, the number of row
    entries strictly above it (from_top) or strictly below it (bottom scan). Counted in the sorted ``lists`` (the own-
    and other-class extremes, which partition the row) when they reach past the member, else over the full row."""
    beyond = (lambda lst, v: lst > v) if from_top else (lambda lst, v: lst < v)
    count = sum(beyond(lst[:, None, :], vals[:, :, None]).sum(-1) for lst in lists)
    covered = torch.stack([~beyond(lst[:, -1:], vals) for lst in lists]).all(0)  # list tail on the far side
    exact_rows = (~covered & (idx >= 0)).any(1).nonzero().flatten()
    for c0 in range(0, len(exact_rows), 64):
        rows = exact_rows[c0:c0 + 64]
        count[rows] = beyond(s[rows][:, None, :], vals[rows][:, :, None]).sum(-1)
    return torch.where(inside(count) | (idx < 0), idx, torch.full_like(idx, -1))


def _positions_scan(x: Tensor, lab: Tensor, k: int, w_top: int, w_bot: int, block: int) -> dict[str, Tensor]:
    """``rank_index_bug=True``: the pools hold rank positions, found by scanning the sorted top / bottom of each row
    (``_scan``); the released self-skip compares the anchor index with the position."""
    n = x.shape[0]
    out = {kind: torch.full((n, k), -1, dtype=torch.long) for kind in KINDS}
    for r0 in range(0, n, block):
        rows = torch.arange(r0, min(r0 + block, n), device=x.device)
        sim = x[rows] @ x.T
        ss, sd = _scan(sim, rows, lab, k, w_top, True, True)
        _, dd = _scan(sim, rows, lab, k, w_bot, False, True)
        out["ss"][rows.cpu()], out["sd"][rows.cpu()], out["dd"][rows.cpu()] = ss.cpu(), sd.cpu(), dd.cpu()
    return out


def _scan_lists(idx: Tensor, rows: Tensor, lab: Tensor, k: int, window: int, descending: bool,
                rank_index_bug: bool, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """First-k same / different-label pools from the first ``idx.shape[1]`` ranks (idx: sample index per rank slot,
    from the top or the bottom) → (same (b, k), diff (b, k), complete (b,) bool: no deeper scan needed)."""
    depth = idx.shape[1]
    slot = torch.arange(depth, device=idx.device).expand_as(idx)
    position = slot if descending else n - 1 - slot
    same = lab[idx] == lab[rows][:, None]
    if rank_index_bug:
        keep = (slot != rows[:, None]) if descending else torch.ones_like(same)
        value = position
    else:
        keep = idx != rows[:, None]
        value = idx
    s_pool = _first_k(same & keep, value, k)
    d_pool = _first_k(~same & keep, value, k)
    full = (d_pool[:, -1] >= 0) & ((s_pool[:, -1] >= 0) | (not descending))
    return s_pool, d_pool, full | (depth >= window)


def _scan(sim: Tensor, rows: Tensor, lab: Tensor, k: int, window: int, descending: bool,
          rank_index_bug: bool) -> tuple[Tensor, Tensor]:
    """Scan up to ``window`` rank positions of full similarity rows ``sim`` (b, N) from the top or the bottom with
    growing depth → (same-label, different-label) first-k pools (b, k)."""
    b, n = sim.shape
    same_out = torch.full((b, k), -1, dtype=torch.long, device=sim.device)
    diff_out = torch.full((b, k), -1, dtype=torch.long, device=sim.device)
    todo = torch.arange(b, device=sim.device)
    kk = min(_FIRST_K, n)
    while len(todo) and window > 0:
        depth = min(kk, window)
        _, idx = _topk_slices(sim[todo], [(0, n)], depth, descending)
        s_pool, d_pool, done = _scan_lists(idx, rows[todo], lab, k, window, descending, rank_index_bug, n)
        same_out[todo], diff_out[todo] = s_pool, d_pool
        todo = todo[~done]
        kk *= 4
    return same_out, diff_out


def _first_k(mask: Tensor, value: Tensor, k: int) -> Tensor:
    """Per row, ``value`` at the first k True slots of ``mask`` (slot order), −1 padded. mask/value (t, depth)."""
    t, depth = mask.shape
    slot = torch.arange(depth, device=mask.device).expand(t, depth)
    key = torch.where(mask, slot, torch.full_like(slot, depth))
    kk = min(k, depth)
    keys, cols = key.topk(kk, dim=1, largest=False, sorted=True)
    picked = torch.where(keys < depth, value.gather(1, cols), torch.full_like(cols, -1))
    return F.pad(picked, (0, k - kk), value=-1)


def official_partner_loop(features: Tensor, labels: Tensor, k: int = 10, rank_index_bug: bool = False,
                          window_top: float = 1.0, window_bottom: float = 1.0,
                          rows: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Plain Python loop of the official ``__pre_sample`` over a full fp64 ranking (reference for tests and
    benchmarks; O(N²) Python). ``rows`` restricts the loop to some anchors (the others stay −1)."""
    _check(features, labels, k, window_top, window_bottom)
    n = features.shape[0]
    x = F.normalize(features.detach().double().cpu(), dim=1)
    lab = labels.detach().cpu().tolist()
    out = {kind: torch.full((n, k), -1, dtype=torch.long) for kind in KINDS}
    anchors = range(n) if rows is None else rows.tolist()
    for i in anchors:
        rank = torch.sort(x[i] @ x.T, descending=True).indices.tolist()
        ss: list[int] = []
        sd: list[int] = []
        dd: list[int] = []
        for j in range(int(n * window_top)):
            idx = rank[j]
            if (i == j) if rank_index_bug else (idx == i):
                continue
            target = ss if lab[i] == lab[idx] else sd
            target.append(j if rank_index_bug else idx)
        for j in range(-1, -int(n * window_bottom), -1):
            idx = rank[j]
            if not rank_index_bug and idx == i:
                continue
            if lab[i] != lab[idx]:
                dd.append(n + j if rank_index_bug else idx)  # negative position j ≡ row n + j as a dataset index
        for kind, pool in (("ss", ss), ("sd", sd), ("dd", dd)):
            pool = pool[:k]
            if pool:
                out[kind][i, :len(pool)] = torch.tensor(pool)
    return out


def _check(features: Tensor, labels: Tensor, k: int, window_top: float, window_bottom: float) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, F) tensor, got {getattr(features, 'shape', None)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf values")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (features.shape[0],):
        raise ValueError(f"labels must be a ({features.shape[0]},) tensor, got {getattr(labels, 'shape', None)}")
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError("labels contain NaN or inf values")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, w in (("window_top", window_top), ("window_bottom", window_bottom)):
        if not 0.0 < w <= 1.0:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {w}")
