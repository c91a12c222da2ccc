"""The pipeline stages, one module each: dump, train, mask, kept, score, reduce.

Each module provides what `saev.engine.plan.StageModule` declares: `NAME`, `VERSION` (its output format version, part
of every key), a frozen `Config` (None without settings), `Inputs` (a NamedTuple naming the upstream stages it reads,
each typed `StagePlan[TheirInfo]`), `plan(pipeline, inputs) -> StagePlan[Info]` (keys, pieces and the typed record
handed downstream per artifact, computed before anything runs), `run(pipeline, own, inputs, piece)` (the job body),
and the optional hooks `check`, `finalize`, `manifest_extra`, `slurm_resources` and `explain_key` (None when the stage
has none). A stage module keeps to its stage: what more than one stage needs lives in `saev/` (e.g. `saev.keepmask`
reads the masks, `saev.scoring` the partials). `stages.graph` holds the plan records stages hand downstream
(`DumpInfo`, ...); `stages.pipeline` the root config (`Pipeline`) and the registry the engine (`saev.engine`) runs.
"""
