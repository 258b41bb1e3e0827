import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
L = 30
by = {}
for r in rows: by.setdefault(r["seq"], []).append(r)
fr, frsel, late, copied = [], [], 0, 0
for s, rs in by.items():
    for prev, r in zip(rs, rs[1:]):   # boundaries applying an indexer plan (the first re-applies the first plan)
        b = r["budget_blocks"]; sel = b - 1 - r["tail_blocks"]
        e = r["entered"][0]
        fr.append(e / b); frsel.append(e / sel)
        late += (r["cum_blocks_loaded_late"] - prev["cum_blocks_loaded_late"]) / L
        copied += (r["cum_blocks_copied"] - prev["cum_blocks_copied"]) / L
out = {"boundaries": len(fr), "sequences": len(by), "budget_blocks": sorted({r["budget_blocks"] for r in rows}),
       "tail_blocks": sorted({r["tail_blocks"] for r in rows}),
       "entered_over_budget_mean": round(st.mean(fr), 3), "median": round(st.median(fr), 3), "max": round(max(fr), 3), "min": round(min(fr), 3),
       "entered_over_selection_mean": round(st.mean(frsel), 3), "selection_max": round(max(frsel), 3),
       "copied_blocks_between_boundaries": copied, "loaded_late_blocks": late, "late_fraction": round(late / copied, 4) if copied else None,
       "misses": rows[-1]["misses"]}
print(json.dumps(out, indent=1))
