"""Output checks: what a user finally sees, compared per token from the final logits.

A port can pass every per-op tolerance and still pick another token at step 3 (two logits a rounding apart), or
breach one op and still produce the same text. So, beside the per-op verdicts, each token's logits (the lm_head
output, or the op/module the user names) are compared as a distribution: top-1 agreement over the positions,
top-k overlap, the KL divergence of the softmaxes (A is the reference); and across a dump's tokens, the greedy
token each side picks (argmax of the last position) with the first step where the two sides pick differently.
Each execution round of a dump is one step (the prefill is step 0).

Logits are found, unless named: on a torch dump, ``root/output_logits.pth`` (the dump hooks write it) or the
module whose name ends in ``lm_head``; on an ATB dump, the op that writes the topology's first output tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AitLlmError
from ..formats.atb_layout import AtbDump, op_files
from ..formats.atb_topology import AtbOp
from ..formats.torch_layout import TorchDump
from .result import Row

OUTPUT_CHECK = "output_check"  # the status of an output-check row
#: The values an output-check row carries (Row.extra; CSV columns), in order.
OUTPUT_COLUMNS = ("top1_agreement", "topk_overlap", "logits_kl", "golden_token", "my_token")

#: The k of the top-k overlap.
TOP_K = 5
#: Positions compared per step, the last ones: a decode step has one, a prefill as many as its prompt (the last
#: position picks the greedy token; the ones before it are teacher-forced predictions, a sample is enough).
MAX_POSITIONS = 64
#: Float64 elements per block of positions: the softmaxes of a block stay in cache, and memory stays small.
BLOCK_ELEMENTS = 1 << 17
#: Defaults: every position's top-1 agrees (hence every greedy token), and the softmaxes stay close. The KL bound:
#: the example's bf16 port is at ~2e-4 against its fp32 golden and against its fp16 build; a 5 % scale bug in one
#: RmsNorm reaches ~6e-4 (the per-op check is what catches that one).
OUTPUT_DEFAULTS = {"top1": 1.0, "logits_kl": 1e-3}


@dataclass
class StepCheck:
    """The comparison of one token's (step's) logits."""

    token: int
    positions: int
    top1: float  # share of positions whose argmax agrees
    topk: float  # mean share of the top-k ids both sides have
    logits_kl: float  # mean over positions of KL(softmax A || softmax B)
    a_token: int  # the greedy pick: argmax at the last position
    b_token: int
    a_path: str = ""
    b_path: str = ""

    @property
    def same_token(self) -> bool:
        return self.a_token == self.b_token


@dataclass
class OutputCheck:
    """The output check of one comparison: per step, and the verdict against the output bounds."""

    a_source: str  # where the logits are read: "root/output_logits", "15_LinearOperation"
    b_source: str
    steps: list[StepCheck] = field(default_factory=list)
    bounds: dict[str, float] = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    reason: str = ""  # why no step could be checked ("" when checked)

    @property
    def checked(self) -> bool:
        return bool(self.steps)

    @property
    def passed(self) -> bool | None:
        """None when nothing was checked (no logits found): that alone never fails a comparison."""
        return None if not self.steps else not self.breaches

    @property
    def first_token_mismatch(self) -> StepCheck | None:
        return next((s for s in self.steps if not s.same_token), None)

    def lines(self) -> list[str]:
        """The summary block: shown first in the CLI summary, the failure message and the HTML entry."""
        if not self.steps:
            return [f"output check: not done ({self.reason})"] if self.reason else []
        first = self.first_token_mismatch
        a_ids = [s.a_token for s in self.steps]
        b_ids = [s.b_token for s in self.steps]
        head = (f"output check ({self.a_source} vs {self.b_source}, {len(self.steps)} step(s)): "
                + ("PASS" if self.passed else "FAIL"))
        out = [head]
        if first is None:
            out.append(f"  greedy tokens agree at every step: {_ids(a_ids)}")
        else:
            out.append(f"  greedy tokens differ first at step {first.token}: A picks {first.a_token}, "
                       f"B picks {first.b_token} (A {_ids(a_ids)}, B {_ids(b_ids)})")
        worst_kl = max(s.logits_kl for s in self.steps)
        out.append(f"  top-1 agreement {min(s.top1 for s in self.steps):.4g} (worst step), top-{TOP_K} overlap "
                   f"{min(s.topk for s in self.steps):.4g}, logits KL {worst_kl:.3g} (worst step)")
        if first is not None and first is not self.steps[-1]:
            out.append(f"  (from step {first.token + 1} on, each side continues from its own token)")
        out.extend(f"  breach: {b}" for b in self.breaches)
        if self.reason:
            out.append(f"  note: {self.reason}")
        return out


def _ids(ids: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, ids[:16])) + (", ...]" if len(ids) > 16 else "]")


# --------------------------------------------------------------------------------------------------- metrics

def _softmax_log(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(a: np.ndarray, b: np.ndarray, *, k: int = TOP_K) -> tuple[float, float, float, int, int]:
    """(top-1 agreement, top-k overlap, mean KL(softmax a || softmax b), greedy id of a, of b) for two logits
    arrays [..., vocab] (the KL in float64 whatever their dtype). When the position counts differ (one side keeps
    the last position only), the last positions are compared."""
    a2 = a.reshape(-1, a.shape[-1])
    b2 = b.reshape(-1, b.shape[-1])
    n = min(len(a2), len(b2))
    a2, b2 = a2[len(a2) - n:], b2[len(b2) - n:]
    top_a, top_b = a2.argmax(axis=-1), b2.argmax(axis=-1)
    top1 = float(np.mean(top_a == top_b))
    k = min(k, a2.shape[-1])
    ka = np.argpartition(a2, -k, axis=-1)[:, -k:]  # the k largest, in no order (no negated copy)
    kb = np.argpartition(b2, -k, axis=-1)[:, -k:]
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ka.tolist(), kb.tolist())]))
    step = max(1, BLOCK_ELEMENTS // max(1, a2.shape[-1]))
    kl_rows = []
    for start in range(0, n, step):
        la = _softmax_log(a2[start:start + step].astype(np.float64))
        lb = _softmax_log(b2[start:start + step].astype(np.float64))
        kl_rows.append(np.sum(np.exp(la) * (la - lb), axis=-1))
    kl = float(np.mean(np.concatenate(kl_rows)))
    return top1, overlap, max(0.0, kl), int(top_a[-1]), int(top_b[-1])


def judge_steps(steps: Sequence[StepCheck], bounds: dict[str, float]) -> list[str]:
    """Breaches of the output bounds, the first differing greedy token first (what a user would notice)."""
    out = []
    first = next((s for s in steps if not s.same_token), None)
    if first is not None and "top1" in bounds and first.top1 < bounds["top1"]:
        out.append(f"greedy token differs at step {first.token}: A picks {first.a_token}, B picks {first.b_token}")
    for s in steps:
        if "top1" in bounds and s.top1 < bounds["top1"] and (s is not first or s.positions > 1):
            out.append(f"step {s.token}: top-1 agreement {s.top1:.4g} < {bounds['top1']:.4g}")
        if "topk" in bounds and s.topk < bounds["topk"]:
            out.append(f"step {s.token}: top-{TOP_K} overlap {s.topk:.4g} < {bounds['topk']:.4g}")
        if "logits_kl" in bounds and s.logits_kl > bounds["logits_kl"]:
            out.append(f"step {s.token}: logits KL {s.logits_kl:.3g} > {bounds['logits_kl']:.3g}")
    return out


def _unit(source: str) -> str:
    """The op or module a logits source belongs to (a row names ops and modules, not their files)."""
    return source.split("/output_logits")[0]


def output_rows(check: OutputCheck) -> list[Row]:
    """One report row per step (status "output_check"): the CSV shows them first, with their own columns."""
    rows = []
    for s in check.steps:
        own = [b for b in check.breaches if b.startswith(f"step {s.token}:")]
        row = Row(s.token, 0, -1, atb_op=_unit(check.b_source), torch_module=_unit(check.a_source),
                  golden_path=s.a_path,
                  my_path=s.b_path, status=OUTPUT_CHECK, rule="output check")
        row.passed = not own and (s.same_token or check.bounds.get("top1", 0.0) <= s.top1)
        row.reason = "; ".join(([] if s.same_token else [f"greedy token differs: A {s.a_token}, B {s.b_token}"]) + own)
        row.extra = dict(zip(OUTPUT_COLUMNS, (s.top1, s.topk, s.logits_kl, s.a_token, s.b_token)))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- finding logits

def _torch_logits(dump: TorchDump, name: str | None):
    """(label, token -> file) of a torch dump's logits."""
    tree_names = {m.name for m in dump.tree.walk()}
    if name:
        if name not in tree_names:
            return None
        module, stem = name, None
    else:
        module, stem = "root", "output_logits"
        if not any((d / "root" / "output_logits.pth").is_file() for d in dump.token_dirs.values()):
            heads = [m.name for m in dump.tree.walk() if m.name.rsplit(".", 1)[-1] == "lm_head"]
            if not heads:
                return None
            module, stem = heads[0], None
    files = {}
    for token in dump.tokens:
        outputs = dump.module_files(token, module).outputs
        picked = [f for f in outputs if stem is None or Path(f).stem == stem]
        if picked:
            files[token] = picked[0]
    return (module if stem is None else f"{module}/{stem}"), files


def _atb_logits(dump: AtbDump, name: str | None):
    rank = dump.ranks[0]
    topology = rank.topology()
    op: AtbOp | None = None
    if name:
        op = next((o for o in topology.walk() if name in (o.rel_dir, o.op_name)), None)
        if op is None:
            return None
    else:
        wanted = set(topology.out_tensors[:1])
        writers = [o for o in topology.walk() if o.is_leaf and wanted & set(o.out_tensors)]
        op = writers[0] if writers else (topology.ops[-1] if topology.ops else None)
        if op is None:
            return None
    files = {}
    for token, token_dir in rank.token_dirs.items():
        outs = op_files(token_dir, op).outputs
        if outs:
            files[token] = outs[0]
    return op.rel_dir, files


def _logits_files(dump, name: str | None):
    return _atb_logits(dump, name) if isinstance(dump, AtbDump) else _torch_logits(dump, name)


def _load(path: Path, allow_symlinks, positions: int = MAX_POSITIONS) -> np.ndarray:
    """The last ``positions`` rows of a logits file as [rows, vocab] (a prefill's full logits would be GBs in
    float64; the greedy token is the last row's): float32 for float32/float16/bfloat16 logits (exact, and half
    the bytes for the argmax and top-k), float64 otherwise."""
    from ..formats.atb_bin import read_bin
    from ..formats.dtypes import widen
    from ..formats.torch_layout import load_torch_tensor

    t = read_bin(path, allow_symlinks=allow_symlinks) if Path(path).suffix == ".bin" else \
        load_torch_tensor(path, allow_symlinks=allow_symlinks)
    vocab = t.shape[-1] if t.shape else 1
    if t.numel == 0 or vocab == 0 or t.data.size < t.numel:
        raise AitLlmError(f"{path}: logits of shape {list(t.shape)} hold no values")
    rows = t.numel // vocab
    tail = np.asarray(t.data).reshape(-1)[(rows - min(rows, positions)) * vocab:t.numel]
    if t.dtype == "bfloat16":
        values = (tail.astype(np.uint32) << 16).view(np.float32)
    elif t.dtype in ("float32", "float16"):
        values = tail.astype(np.float32)
    else:
        values = widen(tail, t.dtype)
    return values.reshape(-1, vocab)


def check_outputs(a, b, tokens: Sequence[int], bounds: dict[str, float], logits=None) -> OutputCheck:
    """The output check of dumps ``a`` (reference) and ``b`` (TorchDump/AtbDump) over ``tokens``.

    ``logits``: where the logits are, when not found by default: one name tried on both sides (a torch module
    name, an ATB op path or op name) or an (A name, B name) pair. Logits that cannot be found or read leave the
    check undone with the reason (it never fails a comparison by itself); a name that is given but found on
    neither side is an error.
    """
    names = (logits, logits) if isinstance(logits, str) or logits is None else tuple(logits)
    found_a, found_b = _logits_files(a, names[0]), _logits_files(b, names[1])
    if logits is not None and (found_a is None or found_b is None):
        side = "A" if found_a is None else "B"
        raise AitLlmError(f"logits={logits!r}: no such op/module on side {side} "
                          f"({(a if side == 'A' else b).root})")
    if found_a is None or found_b is None:
        side = "A" if found_a is None else "B"
        return OutputCheck("", "", reason=f"no logits found on side {side} (name them with logits=...)")
    (a_label, a_files), (b_label, b_files) = found_a, found_b
    check = OutputCheck(a_label, b_label, bounds=dict(bounds))
    missing = []
    for token in sorted(tokens):
        if token not in a_files or token not in b_files:
            missing.append(token)
            continue
        try:
            la = _load(a_files[token], getattr(a, "allow_symlinks", None))
            lb = _load(b_files[token], getattr(b, "allow_symlinks", None))
        except (AitLlmError, OSError) as exc:
            check.reason = f"step {token}: {exc}"
            break
        if la.shape[-1:] != lb.shape[-1:]:
            check.reason = f"step {token}: logits shapes {list(la.shape)} (A) and {list(lb.shape)} (B) differ in vocabulary"
            break
        if not (np.isfinite(la).all() and np.isfinite(lb).all()):
            check.reason = f"step {token}: logits hold NaN or inf"
            break
        top1, topk, kl, ta, tb = compare_logits(la, lb)
        check.steps.append(StepCheck(token, min(la.reshape(-1, la.shape[-1]).shape[0],
                                                lb.reshape(-1, lb.shape[-1]).shape[0]),
                                     top1, topk, kl, ta, tb, str(a_files[token]), str(b_files[token])))
    if check.reason:
        check.steps = []
    elif not check.steps:
        check.reason = f"no logits file dumped for the compared tokens {_ids(list(tokens))}"
    elif missing:
        check.reason = f"steps {_ids(missing)} have no logits file on one side"
    check.breaches = judge_steps(check.steps, check.bounds)
    return check
