"""The five pipeline stages, one module each: dump, train, mask, score, reduce.

Each module defines `NAME`, `VERSION` (its output format version, part of every key), a frozen `Config`,
`plan(pipeline, upstream_plans) -> StagePlan` (keys and pieces, computed before anything runs) and
`run(pipeline, plan, piece)` (the job body). `stages.pipeline` ties them into a graph.
"""
