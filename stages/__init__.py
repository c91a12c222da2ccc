"""The five pipeline stages, one module each: dump, train, mask, score, reduce.

Each module provides what `graph.StageModule` declares: `NAME`, `VERSION` (its output format version, part of every
key), a frozen `Config`, `plan(pipeline, upstream) -> StagePlan[Info]` (keys, pieces and the typed record handed
downstream per artifact, computed before anything runs), `run(pipeline, plan, piece)` (the job body), and the optional
hooks `check`, `finalize` and `manifest_extra` (None when the stage has none). A stage module keeps to its stage: what
more than one stage needs lives in `saev/` (e.g. `saev.keepmask` reads the masks, `saev.scoring` the partials).
`stages.pipeline` ties the modules into a graph and runs or submits their pieces; `stages.graph` holds the contracts.
"""
