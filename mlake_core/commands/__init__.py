"""Sub-commands of the ``mlake`` console script.

Each module here defines ``register(subparsers)``, which adds its sub-command(s) and sets
``func`` on the parser; :mod:`mlake_core.cli` calls every module listed in
:data:`COMMAND_MODULES`.  Adding a command means adding a module and one entry here.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "mlake_core.commands.data",
    "mlake_core.commands.models",
    "mlake_core.commands.eval",
    "mlake_core.commands.edit",
    "mlake_core.commands.trace",
    "mlake_core.commands.neurons",
    "mlake_core.commands.probe",
    "mlake_core.commands.relate",
    "mlake_core.commands.sweep",
    "mlake_core.commands.pipeline",
    "mlake_core.commands.figures",
)
