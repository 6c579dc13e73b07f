"""flowray's entry points: `flowray <command>` and `python -m jobs.<name>`. Each reads its options,
connects to Ray where it needs it and calls the pipeline; the work itself lives in pipeline/.

    cli       the console script: a table of commands, each module imported when it runs
    config    each job's options read off its config dataclass (declared once): --config preset,
              then --set key=value, then flags; --address and -v/--verbose, named alike in every
              command
    errors    exit codes and the one-line report of an error a user can act on
    _batch    what score, sample, serve and models share: the Ray connection, the local GPU
              check, the tracking-server check
    prepare, train, score, sample, serve, models, scores, submit, demo, bench: one per command

May import: flowmodel, pipeline.{batch,train,serve,model,data,tracking},
pipeline.{config,storage,plots,submission,local_ray}.
jobs.bench may import: flowmodel, pipeline (the benchmarks too: it is their command).
jobs._batch may import: pipeline.{batch,model,data,tracking},
pipeline.{config,storage,plots,submission,local_ray} (score, sample, serve and models start
without the training code).
"""
