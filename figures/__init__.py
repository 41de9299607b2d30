"""Figures: one function per figure, taking result objects (from :mod:`analysis`,
:mod:`probes`) and returning a matplotlib ``Figure``; saving is the caller's job
(:mod:`mlake.pipeline.figures` writes a pipeline run's figures).  One shared style
(:mod:`figures.style`).  This layer never reads run folders or stage internals."""
