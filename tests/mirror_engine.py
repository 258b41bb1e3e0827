"""What the quantized host-mirror tests share (test_int4_mirror.py, test_fp8_mirror.py): an engine
over a mirror of a given format, the two prompts they run, the logits of every sampled token, and
a check of every block the cache brings back from the mirror."""
import torch

from engine.config import PolicyConfig
from engine.hooks import LogitsObserver
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
from tiny import engine_config


def mirror_engine(model, host_dtype: str | None, **policy) -> LLMEngine:
    """16-token blocks, a pool of 96, 2 sequences, 64-token prefill chunks, a host mirror in
    ``host_dtype`` (None: the model's dtype); ``policy``: PolicyConfig fields (full attention
    unless ``name`` says otherwise, no minimum of resident tokens unless given)."""
    device = str(next(model.parameters()).device)
    return LLMEngine(model, engine_config(16, 96, max_num_seqs=2, device=device, host_dtype=host_dtype,
                                          policy=PolicyConfig(**{"min_resident_tokens": 0, **policy})))


def prompts() -> list[list[int]]:
    """Two prompts, of 300 and 250 tokens."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (300, 250)]


def logits_of(engine: LLMEngine, ids: list[list[int]], max_tokens: int):
    """(sequences, per sequence the logits of every sampled token [n, V])."""
    rows = {}
    engine.hooks.append(LogitsObserver(lambda seq, row: rows.setdefault(seq.seq_id, []).append(row.float().cpu())))
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in ids]
    while engine.has_work():
        engine.step()
    return seqs, [torch.stack(rows[s.seq_id]) for s in seqs]


def check_loads(cache, check) -> list[int]:
    """From now on every ``cache.load`` calls ``check(device_block, host_id)`` for each block it
    brought back (the block's slot in the pool [L, 2, H, B, D], the mirror row it came from).
    Returns the list of the blocks checked, which grows as loads happen."""
    checked, load = [], cache.load

    def load_and_check(seq_id, group, blocks):
        load(seq_id, group, blocks)
        resident = cache.blocks.seqs[seq_id].resident[group]
        for j in blocks:
            check(cache.pool[:, :, resident[j]], cache.host_blocks(seq_id)[j])
            checked.append(j)

    cache.load = load_and_check
    return checked
