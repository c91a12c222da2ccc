"""The engine: a content-hashed graph of stages, its store checks and the executors, knowing no stage.

It receives the stage registry (`plan.Registry`, an ordered list of stage modules) and the root config (anything
with `root` and `slurm`, `plan.RootConfig`); the stages and the root config live in `stages/`.

    plan.py       the records: `Piece`, `StagePlan`, `Plan`, what a stage module provides (`StageModule`) and the
                  `Registry` that plans the graph
    store.py      the store before a run: checks of configs and inputs, repair, `--verify`, `--status`'s reasons
                  (`explain`), what was made from what (`downstream`), and garbage collection (`gc`)
    job.py        the job body: check the inputs, run pieces under their locks, seal artifacts (`run_pieces`, `seal`)
    executors.py  how pieces get run: in this process (`Local`) or submitted to Slurm with `afterok` chains
                  (`Slurm`), with the job `Ledger` that keeps a piece from being submitted twice
"""
