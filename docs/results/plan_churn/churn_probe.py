"""Plan churn on real text: runs `lsa eval` unchanged, with LSAPolicy.before_decode wrapped to
log every Level-1 boundary (per sequence): the resident set before and after the plan is applied,
the budget in blocks, and the copy counters. Writes one JSON line per boundary to $CHURN_LOG.
Usage: CHURN_LOG=churn.jsonl python churn_probe.py <lsa eval arguments...>"""
import json
import os
import sys

from cli import main
from engine.policies.lsa import LSAPolicy

_orig = LSAPolicy.before_decode
_log = open(os.environ.get("CHURN_LOG", "churn.jsonl"), "a")


def _before_decode(self, seq_ids):
    pre = {}
    for s in seq_ids:
        step = self._step[s]
        if step and step % self.config.cycle == 0:
            seq = self.cache.blocks.seqs[s]
            pre[s] = (step, [set(r) for r in seq.resident], self.cache.num_tokens(s))
    _orig(self, seq_ids)
    c = self.cache
    for s, (step, before, n) in pre.items():
        seq = c.blocks.seqs[s]
        after = [set(r) for r in seq.resident]
        nb = self.blocks_for(n + 1)
        _log.write(json.dumps({
            "seq": s, "step": step, "tokens": n, "blocks": nb, "budget_blocks": self.budget_blocks(nb),
            "tail_blocks": self.tail_size(nb), "groups": len(after), "layers_per_group": [len(g) for g in self.groups()],
            "resident_before": [len(b) for b in before], "resident_after": [len(a) for a in after],
            "entered": [len(a - b) for a, b in zip(after, before)],   # blocks brought in by this plan
            "left": [len(b - a) for a, b in zip(after, before)],
            "cum_blocks_copied": c.blocks_copied, "cum_blocks_prefetched": c.blocks_prefetched,
            "cum_blocks_loaded_late": c.blocks_loaded_late, "misses": self.misses}) + "\n")
        _log.flush()


LSAPolicy.before_decode = _before_decode

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
