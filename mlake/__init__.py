"""mlake, the application: stages, pipeline, report and the command line, on top of the
library (:mod:`mlake_core`), the techniques (:mod:`analysis`, :mod:`probes`) and the figures
(:mod:`figures`)."""
