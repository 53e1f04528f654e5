"""The four stages, each an artifact in and an artifact out: `embed` (data -> embeddings), `stratify` (embeddings ->
strata), `select` (strata -> selection), `export` (selection -> pruned data). The CLI parses and calls them; the
methods, the proxy and io are below them, and none of those imports a stage."""
