"""Build the benchmark's dumps: a real forward of an HF Llama under our hooks (golden), and its ATB-layout mirror.

The model is a ``LlamaForCausalLM`` with random weights built offline from a config shaped like a small real Llama
(TinyLlama/Llama-2 proportions at hidden 1024: intermediate 2.75x hidden, grouped KV heads, 32000-token
vocabulary). One prefill forward of ``seq`` tokens is dumped, so the dump grows linearly with ``seq``.

The ATB side reuses the test suite's mirror plan (``tests/atb_mirror.py``: topology, op folders, which torch tensor
each ATB tensor mirrors) but writes it faster than ``write_mirror``: each golden tensor is loaded and rounded to
bf16 once, not once per op that reads it.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))


@dataclass(frozen=True)
class ModelShape:
    """The Llama shape the dumps come from. ``seq`` is the prompt length of the one dumped forward."""

    hidden: int = 1024
    layers: int = 16
    intermediate: int = 2816
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    seq: int = 512

    def describe(self) -> str:
        return (f"LlamaForCausalLM hidden {self.hidden}, {self.layers} layers, intermediate {self.intermediate}, "
                f"{self.heads} heads / {self.kv_heads} KV heads, vocab {self.vocab}, one prefill of {self.seq} tokens")


@dataclass
class DumpTimes:
    forward_s: float  # the forward alone, no hooks
    hooked_forward_s: float  # the same forward under register_hook (writes the dump)
    plain_save_s: float  # torch.save of the same tensors, one file each, into a scratch dir
    mirror_s: float  # writing the ATB-layout mirror
    golden_bytes: int
    my_bytes: int
    files: int

    @property
    def dump_s(self) -> float:
        """What our hooks add to the forward."""
        return max(0.0, self.hooked_forward_s - self.forward_s)


def build_model(shape: ModelShape, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         max_position_embeddings=max(2048, shape.seq), rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _dir_bytes(root: Path) -> tuple[int, int]:
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += os.path.getsize(os.path.join(dirpath, name))
            files += 1
    return total, files


def make_golden(shape: ModelShape, out: Path) -> tuple[Path, float, float]:
    """Dump one prefill forward; returns (the {PID}_{device} dir, plain forward seconds, hooked forward seconds)."""
    import torch
    from pytest_ait_llm.dump.torch_hooks import DumpConfig, register_hook

    model = build_model(shape)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, shape.vocab, (1, shape.seq), generator=generator)
    with torch.inference_mode():
        model(ids)  # warm-up: the first forward pays one-off allocations
        plain = float("inf")
        for _ in range(2):  # the faster of two, so that a burst of outside load does not inflate our dump cost
            start = time.perf_counter()
            model(ids)
            plain = min(plain, time.perf_counter() - start)
        with register_hook(model, DumpConfig(dump_path=out, token_range=(0,))) as handle:
            start = time.perf_counter()
            model(ids)
            hooked = time.perf_counter() - start
    return handle.dump_dir, plain, hooked


def time_plain_save(golden_dir: Path, scratch: Path, batch_bytes: int = 512 * 1024**2) -> float:
    """Seconds ``torch.save`` takes for every tensor our dump wrote, one file each, tensors already in memory.

    Done in batches of ~512 MB, each deleted once timed, so the baseline never doubles the disk the bench uses.
    """
    import torch

    files = sorted(golden_dir.rglob("*.pth"))
    scratch.mkdir(parents=True, exist_ok=True)
    elapsed = 0.0
    start_index = 0
    while start_index < len(files):
        batch, size = [], 0
        while start_index < len(files) and (not batch or size < batch_bytes):
            tensor = torch.load(files[start_index], weights_only=True)
            batch.append(tensor)
            size += tensor.numel() * tensor.element_size()
            start_index += 1
        start = time.perf_counter()
        for i, tensor in enumerate(batch):
            torch.save(tensor, scratch / f"{start_index}_{i}.pth")
        elapsed += time.perf_counter() - start
        del batch
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return elapsed


def write_mirror_fast(golden_dir: Path, out: Path, layers: int) -> Path:
    """The ATB-layout bf16 mirror of ``tests/atb_mirror.write_mirror`` (same plan), each source converted once."""
    import torch
    from atb_mirror import MODEL, build
    from pytest_ait_llm.dump.atb_writer import AtbDumpWriter
    from pytest_ait_llm.formats.torch_layout import open_torch_dump

    golden = open_torch_dump(golden_dir)
    topology, plan, _ = build(golden, layers)
    writer = AtbDumpWriter(out, model_name=MODEL, pid=4242, device_id=0, token_range=[(0, 0)], time=3)
    writer.write_topology(topology)
    cache: OrderedDict = OrderedDict()
    placeholder = torch.zeros(1, dtype=torch.bfloat16)

    def load(src):
        if src == "weight":
            return placeholder
        if src in cache:
            cache.move_to_end(src)
            return cache[src]
        module, stem = src
        tensor = torch.load(golden.module_dir(0, module) / f"{stem}.pth", weights_only=True, mmap=True)
        tensor = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor.clone()
        cache[src] = tensor
        if len(cache) > 24:  # a layer's worth of sources: every reuse in the plan is within one layer
            cache.popitem(last=False)
        return tensor

    for rel, ins, outs in plan:
        writer.save_tensors(0, rel, [load(s) for s in ins], [load(s) for s in outs])
    return writer.root


def make_dumps(shape: ModelShape, work: Path) -> tuple[Path, Path, DumpTimes]:
    """Golden and ATB dumps under ``work``; returns (golden {PID}_{device} dir, ATB token dir, times)."""
    golden_dir, plain, hooked = make_golden(shape, work / "golden")
    save_s = time_plain_save(golden_dir, work / "plain_save")
    start = time.perf_counter()
    atb_root = write_mirror_fast(golden_dir, work / "atb", shape.layers)
    mirror_s = time.perf_counter() - start
    golden_bytes, golden_files = _dir_bytes(golden_dir)
    my_bytes, my_files = _dir_bytes(atb_root)
    token_dir = next((atb_root / "tensors").iterdir()) / "0"
    times = DumpTimes(plain, hooked, save_s, mirror_s, golden_bytes, my_bytes, golden_files + my_files)
    return golden_dir / "0", token_dir, times
