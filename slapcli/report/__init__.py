"""`slap report` (an HTML page of what a run kept and why) and `slap inspect DATA` (a diagnosis before pruning).

One job per module: `neighbours` (cosine neighbours and duplicate groups), `numbers` (the numbers behind each
figure, pure functions), `damage` (suspected damaged rows), `inputs` (finding and reading a run's artifacts),
`figures` (matplotlib, an optional extra), `page` (the self-contained HTML), `build` (report end to end) and
`diagnose` (the diagnosis of a data file).
"""
